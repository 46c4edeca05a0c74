"""The values and the Keras semantics: records, the config walk, the mode rules, the
diagnostics, layer selection, ``check`` expectations and flag assignments.

Nothing here reads or writes a file, imports Keras, or renders output.
"""
