"""SecAgg+ vocabulary: stages, message kinds, and the fixed-size record codecs they carry.

Every message is a ``wire.Envelope`` (versioned, bound to round and sender, never pickle).
Variable parts are runs of fixed-size records, so a message's length is checked exactly
before anything is parsed: a truncated or padded record list is a ``MalformedMessageError``
naming the sender.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from enum import Enum

from securefml.errors import MalformedMessageError

__all__ = [
    "Stage",
    "SERVER_ID",
    "KIND",
    "pack_ids",
    "unpack_ids",
    "pack_records",
    "unpack_records",
    "check_subset",
]

SERVER_ID = 0xFFFFFFFF  # sender id of server -> client messages


class Stage(str, Enum):
    """The client -> server stages, in order (also the ``Transport`` stage names)."""

    ADVERTISE = "advertise"
    SHARE = "share"
    COMPLAINTS = "complaints"
    MASKED = "masked"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"


KIND = {
    # client -> server
    Stage.ADVERTISE: "secagg/advertise",
    Stage.SHARE: "secagg/share",
    Stage.COMPLAINTS: "secagg/complaints",
    Stage.MASKED: "secagg/masked",
    Stage.CONSISTENCY: "secagg/consistency",
    Stage.UNMASK: "secagg/unmask",
    # server -> client
    "keys": "secagg/keys",
    "shares": "secagg/shares",
    "exclusions": "secagg/exclusions",
    "survivors": "secagg/survivors",
    "request": "secagg/unmask-request",
}

_ID = struct.Struct(">I")


def pack_ids(ids: Iterable[int]) -> bytes:
    return b"".join(_ID.pack(i) for i in sorted(ids))


def unpack_ids(data: bytes, *, sender: int | None) -> tuple[int, ...]:
    if len(data) % 4:
        raise MalformedMessageError("id list is not a whole number of u32", sender=sender)
    ids = tuple(x for (x,) in _ID.iter_unpack(data))
    if list(ids) != sorted(set(ids)):
        raise MalformedMessageError("id list is not sorted or has duplicates", sender=sender)
    return ids


def pack_records(records: Iterable[tuple[int, bytes]], size: int) -> bytes:
    out = []
    for rid, body in sorted(records, key=lambda r: r[0]):
        if len(body) != size:
            raise MalformedMessageError(f"record body must be {size} bytes, got {len(body)}")
        out.append(_ID.pack(rid) + body)
    return b"".join(out)


def unpack_records(data: bytes, size: int, *, sender: int | None) -> list[tuple[int, bytes]]:
    """``(id, body)`` pairs from ``id u32 | body[size]`` records, ids strictly increasing."""
    step = 4 + size
    if len(data) % step:
        raise MalformedMessageError(f"record list is not a whole number of {step}-byte records", sender=sender)
    out: list[tuple[int, bytes]] = []
    for pos in range(0, len(data), step):
        (rid,) = _ID.unpack_from(data, pos)
        if out and rid <= out[-1][0]:
            raise MalformedMessageError("record ids are not strictly increasing", sender=sender)
        out.append((rid, bytes(data[pos + 4 : pos + step])))
    return out


def check_subset(ids: Sequence[int], allowed: Iterable[int], what: str, *, sender: int | None) -> None:
    extra = set(ids) - set(allowed)
    if extra:
        raise MalformedMessageError(f"{what} names clients outside the allowed set: {sorted(extra)[:5]}", sender=sender)
