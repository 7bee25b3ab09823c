"""securefml: secure, robust, personalized federated meta-learning.

The package itself imports only its error tree: ``Gram`` and ``LayerLayout`` (which need torch)
load on first access, so ``securefml --help`` starts without importing torch.

``protocols/``, ``defenses/`` and ``attacks/`` sit beside this folder in a checkout and are
installed inside it (``securefml.protocols`` ...).  When Python imports this package straight
from a checkout (``python -c ...`` run in the checkout root puts the root first on
``sys.path``, ahead of the installed package), the checkout root is added to this package's
search path so those three still resolve, to the same files.  An installed package (wheel or
strict editable link tree) has them inside and is left as it is.
"""

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securefml.errors import (
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
if not (_HERE / "protocols").is_dir() and (_HERE.parent / "setup.py").is_file() and (
    _HERE.parent / "protocols" / "__init__.py"
).is_file():  # imported from a checkout, not an installed package: see the module docstring
    __path__.append(str(_HERE.parent))

__version__ = "0.1.0"

__all__ = [
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
