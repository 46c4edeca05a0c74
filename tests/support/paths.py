"""Where the suite's files are: the repository, its sample models and the tests' own data.

Test modules live one folder deep (``tests/<package>/``) and helpers in ``tests/support/``,
so every path is taken from here rather than counted in ``parent`` steps from a test file.
"""

from pathlib import Path

#: ``tests/``
TESTS = Path(__file__).resolve().parent.parent
#: The repository's root (``pyproject.toml``, ``README.md``).
ROOT = TESTS.parent
SAMPLES = ROOT / "sample_models"
#: Golden views, one folder per command (``BNFREEZE_REGEN_GOLDEN=1`` rewrites them).
GOLDEN = TESTS / "golden"
#: Every crash a fuzzer ever found, kept (see ``tests/regressions/README.md``).
REGRESSIONS = TESTS / "regressions"
#: The helpers' folder, for subprocesses that import them (``sys.path``).
SUPPORT = TESTS / "support"
