"""One exception tree for the whole library, so callers can catch ``SecureFMLError`` once.

Leaves also subclass a builtin where it fits (``ConfigError`` is a ``ValueError``), so
pre-existing ``except ValueError`` handlers keep working.  Every failed decrypt, unmask or
authentication check becomes one ``DecryptionError`` whichever check failed: an attacker
learns nothing from which one it was.
"""

from __future__ import annotations

__all__ = [
    "SecureFMLError",
    "ConfigError",
    "DataError",
    "InvalidUpdateError",
    "ProtocolError",
    "MalformedMessageError",
    "ReplayError",
    "DecryptionError",
    "ProtocolAbort",
    "AggregateOutOfRange",
    "PrivacyBudgetExceeded",
    "PolicyViolation",
]


class SecureFMLError(Exception):
    """Root of every error raised by securefml."""


class ConfigError(SecureFMLError, ValueError):
    """A configuration value is invalid or a combination of options cannot work."""


class DataError(SecureFMLError, ValueError):
    """A dataset or a client's task is unusable (e.g. an empty support set)."""


class InvalidUpdateError(SecureFMLError, ValueError):
    """A client's update is unusable (NaN/Inf, wrong shape); the round goes on without it.

    Attributes
    ----------
    sender:
        The id of the client whose update was rejected, or ``None`` if unknown.
    """

    def __init__(self, message: str, *, sender: int | None = None) -> None:
        super().__init__(message if sender is None else f"client {sender}: {message}")
        self.sender = sender


class ProtocolError(SecureFMLError):
    """A protocol message or step is invalid; names the sender so the round can drop it.

    Attributes
    ----------
    sender:
        The id of the party whose message was rejected, or ``None`` if it cannot be told.
    """

    def __init__(self, message: str, *, sender: int | None = None) -> None:
        super().__init__(message if sender is None else f"sender {sender}: {message}")
        self.sender = sender


class MalformedMessageError(ProtocolError):
    """Bytes that do not decode to a well-formed message (truncated, oversized, bad version)."""


class ReplayError(ProtocolError):
    """A message from another round, a wrong sender, or a duplicate."""


class DecryptionError(ProtocolError):
    """Any failed decryption, unmasking or authentication, folded into one error type."""


class ProtocolAbort(ProtocolError):
    """The round (or one secure sum) stopped without an aggregate: too few clients survived to
    finish safely, or a party caught the server deviating; nothing was revealed."""


class AggregateOutOfRange(ProtocolAbort):
    """A decoded secure sum that no set of in-range inputs can produce (total weight outside
    ``(0, m * max_weight]``, an entry beyond ``clip`` times the total weight, or an infinite
    error bound): some client sent a ring element outside the code, and the sum is discarded.
    The masks hide who it was, so nobody is named."""


class PrivacyBudgetExceeded(SecureFMLError):
    """A privacy budget (epsilon at the given delta) would be exceeded."""


class PolicyViolation(ProtocolError):
    """A party refuses a request outside its stated policy (e.g. the CKKS key holder asked to
    decrypt something other than a signed combination of enough clients); nothing was revealed."""
