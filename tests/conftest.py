"""Puts tests/ on sys.path, so that unit and kernel tests share `support` (one home for test helpers)."""
import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
