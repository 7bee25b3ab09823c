"""The reference protocol: no secrecy, the same interface and wire checks as the secure ones.

Speed (issue 15): the reference must not be slower than the secure protocols it anchors.
A client writes its float32 vector once into the message buffer; the server reads the
vector field as a view of the message and copies it once, checks finiteness with one sum
(an entry-by-entry check only when that sum is not finite), and, for the plain weighted
mean, accumulates the clients' vectors in place instead of stacking an ``[n, d]`` matrix.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from securefml.errors import ConfigError, MalformedMessageError, ProtocolError, ReplayError
from securefml.protocols.base import (
    AggregationProtocol,
    ClientUpdate,
    Reveals,
    RoundOutput,
    Transport,
    check_finite,
    nothing_accepted,
    weighted_layer_mean,
)
from securefml.protocols.wire import Envelope, decode, encode, unpack_array
from securefml.updates import LayerLayout

if TYPE_CHECKING:  # pragma: no cover
    from securefml.defenses.base import Defense

__all__ = ["Plaintext", "encode_manifest", "decode_manifest", "streaming_weighted_mean"]

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


class Plaintext(AggregationProtocol):
    """Clients send float32 updates in the clear; the server sees every coordinate.

    Threat model: none for privacy (declared leakage: every update).  Kept as the reference
    the secure protocols are measured against, and for defenses that need coordinates.
    """

    name = "plaintext"
    reveals = Reveals.UPDATES

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

    def run_round(
        self,
        round_idx: int,
        updates: Sequence[ClientUpdate],
        layout: LayerLayout,
        *,
        defense: Defense,
        transport: Transport | None = None,
        reference: torch.Tensor | None = None,
        context: Mapping[str, object] | None = None,
    ) -> RoundOutput:
        self.check_defense(defense)
        transport = transport or Transport()
        received: dict[int, ClientUpdate] = {}
        rejected: dict[int, str] = {}
        nbytes = 0
        for upd in updates:
            msg = transport.deliver(upd.client_id, "update", self.encode(round_idx, upd, layout))
            if msg is None:
                continue
            nbytes += len(msg)
            try:
                if upd.client_id in received:
                    raise ReplayError("duplicate message in this round", sender=upd.client_id)
                received[upd.client_id] = self.decode(round_idx, upd.client_id, msg, layout)
            except Exception as exc:  # typed errors recorded, anything else re-raised
                self.record_rejection(rejected, upd.client_id, exc)
        if not received:
            raise nothing_accepted(round_idx, len(updates), rejected)
        return aggregate_plain(layout, list(received.values()), defense, rejected, nbytes, context)


def _pack_float32(vector: torch.Tensor) -> bytes:
    """``pack_array(vector as float32)``, written straight into the message buffer (one copy)."""
    arr = vector.detach().to("cpu", torch.float32).reshape(-1).numpy()
    buf = bytearray(2 + 4 * arr.size)
    buf[:2] = b"f4"
    np.frombuffer(buf, dtype="<f4", offset=2)[:] = arr
    return cast(bytes, buf)


def streaming_weighted_mean(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i v_i / sum_i w_i`` accumulated in place, in float32, without stacking the vectors.

    Error bound as ``securefml.defenses.mean.weighted_mean``: ``(n + 2) * 2**-24 * sum_i
    |w_i v_i| / sum_i w_i`` per coordinate (a recursive float32 sum of rounded terms).
    """
    total = float(sum(weights))
    acc = np.zeros(vectors[0].numel(), dtype=np.float32)
    term = np.empty_like(acc)
    for vec, w in zip(vectors, weights):  # numpy: one thread, no intra-op barrier per vector
        np.multiply(vec.detach().to("cpu", torch.float32).reshape(-1).numpy(), np.float32(float(w) / total), out=term)
        np.add(acc, term, out=acc)
    return torch.from_numpy(acc)


def aggregate_plain(
    layout: LayerLayout,
    clients: Sequence[ClientUpdate],
    defense: Defense,
    rejected: dict[int, str],
    nbytes: int,
    context: Mapping[str, object] | None,
) -> RoundOutput:
    """Run ``defense`` on decoded plaintext updates and place the result in the full layout."""
    if not clients:
        return RoundOutput(torch.zeros(layout.numel), dict.fromkeys(layout.layer_names, 0.0), (), rejected,
                           bytes_uploaded=nbytes)
    ids = tuple(c.client_id for c in clients)
    weights = [c.weight for c in clients]
    layer_sets = {c.layers for c in clients}
    if len(layer_sets) > 1:
        if not defense.is_weighted_mean:
            raise ConfigError(
                f"defense {defense!r} needs every client to upload the same layers; "
                "use a server-dictated selection plan with robust rules"
            )
        agg, totals = weighted_layer_mean(layout, [c.vector for c in clients], [c.layers for c in clients], weights)
        return RoundOutput(agg, totals, ids, rejected, bytes_uploaded=nbytes)
    (layers,) = layer_sets
    total = float(sum(weights))
    totals = {name: (total if name in layers else 0.0) for name in layout.layer_names}
    if defense.is_weighted_mean:  # no robust decision: no [n, d] matrix needed
        mean = streaming_weighted_mean([c.vector for c in clients], weights)
        agg = mean if layers == tuple(layout.layer_names) else layout.scatter(mean, layers)
        return RoundOutput(agg, totals, ids, rejected, bytes_uploaded=nbytes)
    ctx = dict(context or {})
    ref = ctx.get("reference")
    if isinstance(ref, torch.Tensor) and ref.numel() == layout.numel:
        ctx["reference"] = layout.gather(ref, layers)  # the reference over the uploaded layers only
    result = defense(torch.stack([c.vector for c in clients]), weights, client_ids=ids, context=ctx)
    assert result.aggregate is not None
    agg = layout.scatter(result.aggregate.to(torch.float32), layers)
    return RoundOutput(agg, totals, ids, rejected, flagged=tuple(result.flagged), bytes_uploaded=nbytes,
                       defense=result)
