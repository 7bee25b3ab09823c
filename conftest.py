"""Make the tests import the *installed* securefml, never the bare checkout folder.

``protocols/``, ``defenses/`` and ``attacks/`` sit beside ``securefml/`` and only become
``securefml.protocols`` etc. once installed (the strict editable install of ``make setup``
links them into place; a wheel copies them).  ``python -m pytest`` puts the checkout root first
on ``sys.path``, where ``securefml/`` lacks those three, so the root is dropped here, before any
test module imports securefml.  A strict editable install links files, not folders: a module
added since the last ``make setup`` is reported here instead of failing later as a bare
``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent
_FOLDERS = {"securefml": ".", "protocols": "protocols", "defenses": "defenses", "attacks": "attacks"}

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]


def _unlinked(installed: Path) -> list[str]:
    missing = []
    for folder, inside in _FOLDERS.items():
        for source in sorted((_ROOT / folder).rglob("*.py")):
            if not (installed / inside / source.relative_to(_ROOT / folder)).exists():
                missing.append(str(source.relative_to(_ROOT)))
    return missing


_spec = importlib.util.find_spec("securefml")
if _spec is None or _spec.origin is None:
    pytest.exit("securefml is not installed in this interpreter: run `make setup`", returncode=4)
_installed = Path(_spec.origin).parent
if "__editable__" in str(_installed):
    _missing = _unlinked(_installed)
    if _missing:
        pytest.exit(f"the editable install predates {', '.join(_missing[:5])}: run `make setup`", returncode=4)
