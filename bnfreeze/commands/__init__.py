"""The Click commands, by job: :mod:`~bnfreeze.commands.files` (read saved files),
:mod:`~bnfreeze.commands.edit` (write them), :mod:`~bnfreeze.commands.measure` (run Keras),
and what they share (:mod:`~bnfreeze.commands.support`). :mod:`bnfreeze.cli` gathers them
into the ``bnfreeze`` group."""
