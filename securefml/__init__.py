"""securefml: secure, robust, personalized federated meta-learning.

The package itself imports only its error tree: ``Gram`` and ``LayerLayout`` (which need torch)
load on first access, so ``securefml --help`` starts without importing torch.

``protocols/``, ``defenses/`` and ``attacks/`` sit beside this folder in a checkout and are
installed inside it (``securefml.protocols`` ...).  When Python imports this package straight
from a checkout (``python -c ...`` or ``python -m pytest`` run in the checkout root put the root
first on ``sys.path``, ahead of the installed package), a finder for exactly those three names
is added so they still resolve, to the same files, as setuptools' default editable install
does.  An installed package (wheel or strict editable link tree) has them inside and adds
nothing.
"""

import importlib
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securefml.errors import (
    AggregateOutOfRange,
    ConfigError,
    DataError,
    DecryptionError,
    InvalidUpdateError,
    MalformedMessageError,
    PrivacyBudgetExceeded,
    ProtocolAbort,
    ProtocolError,
    ReplayError,
    SecureFMLError,
)

if TYPE_CHECKING:
    from securefml.gram import Gram
    from securefml.updates import LayerLayout

_LAZY = {"Gram": "securefml.gram", "LayerLayout": "securefml.updates"}

_HERE = Path(__file__).resolve().parent
_SIBLINGS = ("protocols", "defenses", "attacks")


class _CheckoutFinder:
    """Finds ``securefml.protocols|defenses|attacks`` in a checkout's sibling folders (see above)."""

    @staticmethod
    def find_spec(fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        head, _, name = fullname.partition(".")
        if head != "securefml" or name not in _SIBLINGS:
            return None
        folder = _HERE.parent / name
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


if (
    not (_HERE / "protocols").is_dir()
    and (_HERE.parent / "setup.py").is_file()
    and all((_HERE.parent / s / "__init__.py").is_file() for s in _SIBLINGS)
    and not any(isinstance(f, type) and f.__name__ == "_CheckoutFinder" for f in sys.meta_path)
):  # imported from a checkout, not an installed package: see the module docstring
    sys.meta_path.append(_CheckoutFinder)  # type: ignore[arg-type]

__version__ = "0.1.0"

__all__ = [
    "AggregateOutOfRange",
    "ConfigError",
    "DataError",
    "DecryptionError",
    "InvalidUpdateError",
    "MalformedMessageError",
    "PrivacyBudgetExceeded",
    "ProtocolAbort",
    "ProtocolError",
    "ReplayError",
    "SecureFMLError",
    "Gram",
    "LayerLayout",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
