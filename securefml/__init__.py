"""securefml: secure, robust, personalized federated meta-learning.

The package itself imports only its error tree: ``Gram`` and ``LayerLayout`` (which need torch)
load on first access, so ``securefml --help`` starts without importing torch.
"""

import importlib
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
