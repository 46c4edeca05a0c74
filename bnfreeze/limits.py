"""Limits enforced before anything large is allocated. The README's "Guarantees" quote them.

A model file is untrusted input: a few kilobytes can claim gigabytes (a zip bomb, a member
size that lies) or nest JSON deep enough to exhaust Python's stack in any recursive consumer
(``copy.deepcopy``, ``json.dumps``, a config walk). Each limit below is checked on what the
file *claims* or on raw bytes, before the claimed amount is read, inflated or parsed:

* :data:`MAX_CONFIG_BYTES`: the largest ``config.json`` / ``metadata.json`` / ``model_config``
  read, checked on the zip's declared size (then enforced while inflating, so a lying size
  cannot get more) or the file's size. EfficientNetV2L's config is about 1 MiB.
* :data:`MAX_EXPANSION_RATIO`: a compressed member over 1 MiB may inflate at most this many
  times its compressed size (deflate tops out near 1032:1 on zeros; real JSON and HDF5 stay
  under 20:1), checked on the declared sizes before inflating.
* :data:`MAX_JSON_DEPTH`: the deepest nesting of arrays and objects in a JSON member, checked
  on the raw bytes before ``json.loads`` (:func:`json_depth_exceeds`). A Keras config nests
  about 3 levels per nested model, so this leaves room for :data:`MAX_NESTING_DEPTH` models.
* :data:`MAX_NESTING_DEPTH`: models and wrappers nested below the top level (the walk).
* :data:`MAX_LAYERS`: layers in one model, all levels (the walk).
* :data:`INFLATE_PIECE`: the most bytes of one zip member held in memory while it is
  inflated, checksummed or copied (:mod:`bnfreeze.formats.integrity`); only the JSON members
  above, at most :data:`MAX_CONFIG_BYTES`, are held whole.
"""

from __future__ import annotations

MAX_CONFIG_BYTES = 64 * 2**20  # the largest config.json / model_config read
MAX_EXPANSION_RATIO = 200  # a compressed zip member over 1 MiB may expand at most this much
MAX_JSON_DEPTH = 256  # arrays/objects nested in one JSON document
MAX_NESTING_DEPTH = 64  # nested models / wrappers below the top level
MAX_LAYERS = 100_000  # layers in one model, all levels
INFLATE_PIECE = 8 * 2**20  # bytes of a member held at a time while inflating or copying it

# Brackets and quotes kept, braces turned into brackets: the structure is all that is left.
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
# A JSON string, escapes included (the "unrolled loop" form: linear, no backtracking).
_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'


def _depth_at_most(brackets: bytes, limit: int) -> bool | None:
    """True when ``brackets`` (only ``[`` and ``]``) nest at most ``limit`` deep, False when
    deeper, None when they do not balance. Each round deletes the innermost pairs in C, so a
    normal config takes about as many fast passes as it is deep."""
    run = b"[" * (limit + 1)
    for _ in range(limit):
        if not brackets:
            return True
        if run in brackets:
            return False
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            return None
        brackets = shorter
    return not brackets  # still some left after ``limit`` rounds: deeper


def json_depth_exceeds(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text ``raw`` nests arrays and objects more than ``limit`` deep.

    Decided on the bytes, before parsing, in a few passes at C speed (about 2 ms per MiB of
    Keras config). Brackets inside strings do not count: when no string holds a bracket (no
    string's quotes are separated by one once everything else is deleted), the brackets left
    are exactly the structure; otherwise the strings are removed exactly with a regular
    expression first (about 50 ms per MiB). Text that does not balance is not JSON and is
    left for ``json.loads`` to reject (False).
    """
    structure = raw.translate(_BRACKETS, _NOT_STRUCTURE)
    if b'\\"' not in raw:
        outside = structure.replace(b'""', b"")
        if b'"' not in outside:
            return _depth_at_most(outside, limit) is False
    import re

    outside = re.sub(_STRING, b"", raw).translate(_BRACKETS, _NOT_STRUCTURE)
    return _depth_at_most(outside, limit) is False
