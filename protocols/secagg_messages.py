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
from typing import NamedTuple

from securefml.errors import MalformedMessageError

__all__ = [
    "Stage",
    "LAYERS_STAGE",
    "SERVER_ID",
    "KIND",
    "pack_ids",
    "unpack_ids",
    "pack_records",
    "unpack_records",
    "check_subset",
    "Complaint",
    "pack_complaints",
    "unpack_complaints",
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


#: The stage before ``advertise`` in a round the factory plans (``SecAggPlus.server_half``): each
#: client names the layers it uploads (public: per-layer upload counts are declared leakage), so
#: the server can fix the plan every vector must match without seeing any update.
LAYERS_STAGE = "layers"

KIND = {
    # client -> server
    LAYERS_STAGE: "secagg/layers",
    Stage.ADVERTISE: "secagg/advertise",
    Stage.SHARE: "secagg/share",
    Stage.COMPLAINTS: "secagg/complaints",
    Stage.MASKED: "secagg/masked",
    Stage.CONSISTENCY: "secagg/consistency",
    Stage.UNMASK: "secagg/unmask",
    # server -> client
    "layers-request": "secagg/layers-request",
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


class Complaint(NamedTuple):
    """One client's signed complaint list, as the server forwards it with the exclusions."""

    accuser: int
    accused: tuple[int, ...]
    sig: bytes


_SIG_BYTES = 64


def pack_complaints(complaints: Iterable[Complaint]) -> bytes:
    """``accuser u32 | count u32 | accused u32 * count | sig[64]`` per complaint, accusers increasing."""
    out = []
    for c in sorted(complaints, key=lambda c: c.accuser):
        if len(c.sig) != _SIG_BYTES:
            raise MalformedMessageError(f"complaint signature must be {_SIG_BYTES} bytes, got {len(c.sig)}")
        out.append(_ID.pack(c.accuser) + _ID.pack(len(c.accused)) + pack_ids(c.accused) + c.sig)
    return b"".join(out)


def unpack_complaints(data: bytes, *, sender: int | None) -> list[Complaint]:
    """Inverse of ``pack_complaints``; every length is checked before it is used."""
    out: list[Complaint] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 8:
            raise MalformedMessageError("truncated complaint record", sender=sender)
        (accuser,) = _ID.unpack_from(data, pos)
        (count,) = _ID.unpack_from(data, pos + 4)
        end = pos + 8 + 4 * count + _SIG_BYTES
        if end > len(data):
            raise MalformedMessageError("truncated complaint record", sender=sender)
        if out and accuser <= out[-1].accuser:
            raise MalformedMessageError("complaint accusers are not strictly increasing", sender=sender)
        accused = unpack_ids(bytes(data[pos + 8 : end - _SIG_BYTES]), sender=sender)
        out.append(Complaint(accuser, accused, bytes(data[end - _SIG_BYTES : end])))
        pos = end
    return out
