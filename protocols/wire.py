"""Message encoding for every protocol: versioned, length-checked, bound to round and sender.

Never pickle.  An envelope is::

    magic "SFML" | version u8 | kind (u8 len + ascii) | round u32 | sender u32 |
    nfields u16 | { key (u8 len + ascii) | value (u32 len + bytes) } * nfields

Decoding checks every length against the bytes actually present and against ``max_bytes``,
so a truncated, oversized or padded blob is a ``MalformedMessageError``; ``expect`` checks
round, sender and kind so a replayed or redirected message is a ``ReplayError``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from securefml.errors import MalformedMessageError, ReplayError

__all__ = ["WIRE_VERSION", "Envelope", "encode", "decode", "pack_array", "unpack_array", "DEFAULT_MAX_BYTES"]

WIRE_VERSION = 1
MAGIC = b"SFML"
DEFAULT_MAX_BYTES = 1 << 31
_HEADER = struct.Struct(">4sB")
_ROUND_SENDER = struct.Struct(">II")


@dataclass(frozen=True)
class Envelope:
    """A decoded message: its kind, round, sender and named byte fields."""

    kind: str
    round: int
    sender: int
    fields: Mapping[str, bytes] = field(default_factory=dict)

    def expect(self, *, kind: str, round: int, sender: int | None = None) -> Envelope:
        """Raise ``ReplayError`` unless this message is of ``kind`` for ``round`` from ``sender``."""
        if self.kind != kind:
            raise ReplayError(f"expected a {kind!r} message, got {self.kind!r}", sender=self.sender)
        if self.round != round:
            raise ReplayError(f"message is for round {self.round}, this is round {round}", sender=self.sender)
        if sender is not None and self.sender != sender:
            raise ReplayError(f"message claims sender {self.sender} but arrived from {sender}", sender=sender)
        return self

    def field(self, name: str) -> bytes:
        try:
            return self.fields[name]
        except KeyError:
            raise MalformedMessageError(f"{self.kind!r} message lacks field {name!r}", sender=self.sender) from None


def encode(env: Envelope) -> bytes:
    kind = env.kind.encode("ascii")
    if len(kind) > 255 or len(env.fields) > 65535:
        raise MalformedMessageError("kind or field count too large to encode", sender=env.sender)
    out = [_HEADER.pack(MAGIC, WIRE_VERSION), bytes([len(kind)]), kind, _ROUND_SENDER.pack(env.round, env.sender)]
    out.append(struct.pack(">H", len(env.fields)))
    for key, value in env.fields.items():
        k = key.encode("ascii")
        if len(k) > 255:
            raise MalformedMessageError(f"field name {key!r} too long", sender=env.sender)
        value = value if isinstance(value, (bytes, bytearray, memoryview)) else bytes(value)
        size = value.nbytes if isinstance(value, memoryview) else len(value)
        out += [bytes([len(k)]), k, struct.pack(">I", size), value]  # joined below: no extra copy
    return b"".join(out)


class _Reader:
    def __init__(self, data: bytes, sender: int | None) -> None:
        self.view = memoryview(data)
        self.pos = 0
        self.sender = sender

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.view):
            raise MalformedMessageError("message is truncated", sender=self.sender)
        chunk = self.view[self.pos : self.pos + n]
        self.pos += n
        return chunk


def decode(
    data: bytes,
    *,
    sender: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    views: frozenset[str] | set[str] | tuple[str, ...] = (),
) -> Envelope:
    """Decode an envelope; ``sender`` is who the transport says sent it (for error messages).

    Fields named in ``views`` are returned as read-only ``memoryview`` slices of ``data``
    instead of copies (for large payloads such as masked vectors).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessageError(f"message must be bytes, got {type(data).__name__}", sender=sender)
    if len(data) > max_bytes:
        raise MalformedMessageError(f"message of {len(data)} bytes exceeds the limit {max_bytes}", sender=sender)
    r = _Reader(bytes(data), sender)
    magic, version = _HEADER.unpack(r.take(_HEADER.size))
    if magic != MAGIC:
        raise MalformedMessageError("not a securefml message (bad magic)", sender=sender)
    if version != WIRE_VERSION:
        raise MalformedMessageError(f"unsupported wire version {version}", sender=sender)
    try:
        kind = bytes(r.take(r.take(1)[0])).decode("ascii")
        rnd, snd = _ROUND_SENDER.unpack(r.take(_ROUND_SENDER.size))
        (nfields,) = struct.unpack(">H", r.take(2))
        fields: dict[str, bytes] = {}
        for _ in range(nfields):
            key = bytes(r.take(r.take(1)[0])).decode("ascii")
            (length,) = struct.unpack(">I", r.take(4))
            if key in fields:
                raise MalformedMessageError(f"duplicate field {key!r}", sender=sender)
            chunk = r.take(length)
            # a zero-copy view where asked (see above): bytes-like for every reader of the field
            fields[key] = cast(bytes, chunk) if key in views else bytes(chunk)
    except UnicodeDecodeError:
        raise MalformedMessageError("non-ascii kind or field name", sender=sender) from None
    if r.pos != len(r.view):
        raise MalformedMessageError(f"{len(r.view) - r.pos} trailing bytes after the message", sender=sender)
    return Envelope(kind, rnd, snd, fields)


_DTYPES = {"f4": np.float32, "f8": np.float64, "u2": np.uint16, "u4": np.uint32, "i8": np.int64, "u8": np.uint64}


def pack_array(arr: np.ndarray) -> bytes:
    """A 1-D numeric array as ``dtype code (2 ascii) | little-endian data``."""
    a = np.ascontiguousarray(arr).reshape(-1)
    code = next((c for c, t in _DTYPES.items() if a.dtype == t), None)
    if code is None:
        raise MalformedMessageError(f"unsupported dtype {a.dtype}")
    return code.encode() + a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def unpack_array(data: bytes, *, expected_len: int | None = None, sender: int | None = None) -> np.ndarray:
    """Inverse of ``pack_array``; checks dtype code, alignment and the expected length."""
    code = bytes(data[:2]).decode("ascii", "replace")
    if code not in _DTYPES:
        raise MalformedMessageError(f"unknown array dtype code {code!r}", sender=sender)
    dt = np.dtype(_DTYPES[code]).newbyteorder("<")
    body = data[2:]
    if len(body) % dt.itemsize:
        raise MalformedMessageError("array payload is not a whole number of items", sender=sender)
    arr = np.frombuffer(body, dtype=dt)
    if expected_len is not None and arr.size != expected_len:
        raise MalformedMessageError(f"array has {arr.size} entries, expected {expected_len}", sender=sender)
    return arr.astype(_DTYPES[code], copy=False)
