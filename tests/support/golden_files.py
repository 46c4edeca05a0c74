"""Golden files: compare full CLI output with a file under ``tests/golden/``.

To accept a deliberate change, regenerate and review the diff:

    BNFREEZE_REGEN_GOLDEN=1 pytest tests/cli/test_inspect.py
"""

from __future__ import annotations

import os
from pathlib import Path

from paths import ROOT

REGEN = os.environ.get("BNFREEZE_REGEN_GOLDEN") == "1"


def check(folder: Path, name: str, text: str) -> None:
    """Fail unless ``text`` equals ``folder/name``; with BNFREEZE_REGEN_GOLDEN=1, write it."""
    path = (folder / name).resolve()
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing: run BNFREEZE_REGEN_GOLDEN=1 pytest"
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"output differs from {path.relative_to(ROOT)}"
