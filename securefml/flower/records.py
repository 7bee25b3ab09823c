"""How securefml's bytes and vectors travel in Flower records (no pickle anywhere).

Every protocol message is ``bytes`` (``securefml.protocols.halves``); on Flower it rides in a
``ConfigRecord`` under the key ``"securefml"`` with the stage name, the round and the party it
is addressed to or comes from.  Model vectors ride in an ``ArrayRecord`` (Flower serializes a
numpy array with ``np.save(..., allow_pickle=False)``).  The helpers below are the only place
that knows these keys, so the strategy and the client mod cannot disagree on them.

Threat model: everything here is parsed from an untrusted peer.  ``read_stage`` refuses a
record that lacks a field or carries the wrong type with a ``MalformedMessageError`` naming
the sender, before any protocol code sees the payload.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from securefml.errors import MalformedMessageError

__all__ = [
    "PROTOCOL_KEY",
    "GLOBAL_KEY",
    "UPDATE_KEY",
    "METRICS_KEY",
    "ROUND_KEY",
    "StageRecord",
    "write_stage",
    "read_stage",
    "write_vector",
    "read_vector",
]

PROTOCOL_KEY = "securefml"
GLOBAL_KEY = "securefml.global"
UPDATE_KEY = "securefml.update"
METRICS_KEY = "securefml.metrics"
#: The strategy's public facts of the round (round index, cohort size), sent with the first stage.
ROUND_KEY = "securefml.round"
_VECTOR = "vector"


@dataclass(frozen=True)
class StageRecord:
    """One protocol message as it crosses Flower: stage, round, party and the bytes."""

    stage: str
    round_idx: int
    party: int
    payload: bytes


def write_stage(content: RecordDict, record: StageRecord) -> RecordDict:
    """Put ``record`` into ``content`` (in place; returned for chaining)."""
    content[PROTOCOL_KEY] = ConfigRecord(
        {"stage": record.stage, "round": int(record.round_idx), "party": int(record.party),
         "payload": bytes(record.payload)}
    )
    return content


def read_stage(message: Message, *, sender: int | None = None) -> StageRecord:
    """The protocol message inside ``message``, checked field by field.

    Raises
    ------
    MalformedMessageError
        If the record is missing or a field is absent or of the wrong type.
    """
    content = message.content
    if PROTOCOL_KEY not in content.config_records:
        raise MalformedMessageError("the Flower message carries no securefml record", sender=sender)
    rec = content.config_records[PROTOCOL_KEY]
    try:
        stage, rnd, party, payload = rec["stage"], rec["round"], rec["party"], rec["payload"]
    except KeyError as exc:
        raise MalformedMessageError(f"securefml record lacks field {exc}", sender=sender) from None
    if not (isinstance(stage, str) and isinstance(rnd, int) and isinstance(party, int)
            and isinstance(payload, bytes)):
        raise MalformedMessageError("securefml record has a field of the wrong type", sender=sender)
    return StageRecord(stage, rnd, party, payload)


def write_vector(content: RecordDict, key: str, vector: torch.Tensor) -> RecordDict:
    """Put a flat float32 vector into ``content[key]`` as a one-array ``ArrayRecord``."""
    arr = vector.detach().to("cpu", torch.float32).reshape(-1).numpy()
    content[key] = ArrayRecord({_VECTOR: Array(np.ascontiguousarray(arr))})
    return content


def read_vector(content: RecordDict, key: str, *, length: int | None = None, sender: int | None = None) -> torch.Tensor:
    """The flat float32 vector at ``content[key]``; its length is checked when ``length`` is given.

    Raises
    ------
    MalformedMessageError
        If it is missing, not a 1-d float32 array, of the wrong length, or not finite.
    """
    if key not in content.array_records or _VECTOR not in content.array_records[key]:
        raise MalformedMessageError(f"the Flower message carries no {key!r} array", sender=sender)
    arr = content.array_records[key][_VECTOR].numpy()
    if arr.ndim != 1 or arr.dtype != np.float32:
        raise MalformedMessageError(f"{key!r} must be a 1-d float32 array, got {arr.dtype} {arr.shape}", sender=sender)
    if length is not None and arr.size != length:
        raise MalformedMessageError(f"{key!r} has {arr.size} entries, expected {length}", sender=sender)
    if not np.isfinite(arr).all():
        raise MalformedMessageError(f"{key!r} contains NaN or Inf", sender=sender)
    return torch.from_numpy(arr.copy())


def metrics_of(content: RecordDict) -> dict[str, float]:
    """The numeric metrics a reply carries under ``METRICS_KEY`` (empty when absent)."""
    if METRICS_KEY not in content.metric_records:
        return {}
    rec: MetricRecord = content.metric_records[METRICS_KEY]
    return {k: float(v) for k, v in rec.items() if isinstance(v, (int, float))}
