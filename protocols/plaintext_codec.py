"""The plaintext wire format: one client's float32 update in a versioned envelope, checked on arrival.

Speed (issue 15): the reference must not be slower than the secure protocols it anchors.
A client writes its float32 vector once into the message buffer; the server reads the
vector field as a view of the message and copies it once, and checks finiteness with one sum
(an entry-by-entry check only when that sum is not finite).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch

from securefml.errors import MalformedMessageError, ProtocolError
from securefml.protocols.wire import Envelope, decode, encode, unpack_array
from securefml.rounds import ClientUpdate, check_finite
from securefml.updates import LayerLayout

__all__ = ["PlaintextCodec", "encode_manifest", "decode_manifest", "KIND"]

KIND = "plain-update"


def encode_manifest(layers: Sequence[str]) -> bytes:
    return "\n".join(layers).encode("utf-8")


def decode_manifest(data: bytes, layout: LayerLayout, *, sender: int) -> tuple[str, ...]:
    try:
        names = tuple(data.decode("utf-8").split("\n")) if data else ()
        canon = layout.canonical(names)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedMessageError(f"bad layer manifest: {exc}", sender=sender) from None
    if canon != names:
        raise MalformedMessageError("layer manifest is not in layout order or has duplicates", sender=sender)
    return canon


class PlaintextCodec:
    """Encodes a client's update (client side) and decodes it with every check (server side)."""

    # -- client half ------------------------------------------------------------------------
    def encode(self, round_idx: int, update: ClientUpdate, layout: LayerLayout) -> bytes:
        layers = layout.canonical(update.layers)
        fields = {
            "layout": layout.fingerprint(),
            "layers": encode_manifest(layers),
            "weight": struct.pack(">d", float(update.weight)),
            "vector": _pack_float32(update.vector),
        }
        return encode(Envelope(KIND, round_idx, update.client_id, fields))

    # -- server half ------------------------------------------------------------------------
    def decode(self, round_idx: int, sender: int, data: bytes, layout: LayerLayout) -> ClientUpdate:
        env = decode(data, sender=sender, max_bytes=16 * layout.numel + 65536, views=("vector",))
        env.expect(kind=KIND, round=round_idx, sender=sender)
        if env.field("layout") != layout.fingerprint():
            raise ProtocolError("update was built for another model layout", sender=sender)
        layers = decode_manifest(env.field("layers"), layout, sender=sender)
        raw_w = env.field("weight")
        if len(raw_w) != 8:
            raise MalformedMessageError("weight field must be 8 bytes", sender=sender)
        (weight,) = struct.unpack(">d", raw_w)
        if not np.isfinite(weight) or weight <= 0:
            raise MalformedMessageError(f"weight must be positive and finite, got {weight}", sender=sender)
        arr = unpack_array(env.field("vector"), expected_len=layout.numel_of(layers), sender=sender)
        out = arr.astype(np.float32, copy=True)  # the one copy out of the message
        vec = torch.from_numpy(out)
        if not np.isfinite(out.sum()):  # NaN/Inf propagate through the sum; else it overflowed
            check_finite(vec, sender)
        return ClientUpdate(sender, vec, layers, weight)


def _pack_float32(vector: torch.Tensor) -> bytes:
    """``pack_array(vector as float32)``, written straight into the message buffer (one copy)."""
    arr = vector.detach().to("cpu", torch.float32).reshape(-1).numpy()
    buf = bytearray(2 + 4 * arr.size)
    buf[:2] = b"f4"
    np.frombuffer(buf, dtype="<f4", offset=2)[:] = arr
    return cast(bytes, buf)
