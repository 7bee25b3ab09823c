"""securefml: secure, robust, personalized federated meta-learning."""

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
from securefml.gram import Gram
from securefml.updates import LayerLayout

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
