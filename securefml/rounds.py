"""The values one round passes between its parties, protocol-neutral.

A client's update before encoding (``ClientUpdate``), the seam where messages travel
(``Transport``), and what the aggregation step hands the server's optimizer (``RoundOutput``).
They live outside ``securefml.protocols`` so that the one aggregation step
(``securefml.aggregation``) and the protocols both import them without importing each other.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from securefml.errors import InvalidUpdateError, ProtocolAbort
from securefml.updates import LayerLayout

if TYPE_CHECKING:  # pragma: no cover
    from securefml.defenses.base import AggregationResult

__all__ = [
    "ClientUpdate",
    "RoundOutput",
    "Transport",
    "weighted_layer_mean",
    "check_finite",
    "nothing_accepted",
]

log = logging.getLogger(__name__)


@dataclass
class ClientUpdate:
    """One client's contribution before encoding.

    Attributes
    ----------
    client_id:
        Stable id of the client.
    vector:
        The client's update for ``layers`` only, laid out by the round's ``LayerLayout``.
    layers:
        The layers uploaded (layout order); every other layer costs zero bytes.
    weight:
        Aggregation weight, usually the client's sample count.
    """

    client_id: int
    vector: torch.Tensor
    layers: tuple[str, ...]
    weight: float = 1.0


@dataclass
class RoundOutput:
    """What the server half produced for one round."""

    aggregate: torch.Tensor  # full-length, zeros where no client uploaded
    layer_weight: dict[str, float]  # total weight behind each layer (0 = keep global value)
    accepted: tuple[int, ...]
    rejected: dict[int, str] = field(default_factory=dict)
    flagged: tuple[int, ...] = ()  # excluded / down-weighted by the rule (its action)
    bytes_uploaded: int = 0
    defense: AggregationResult | None = None
    extras: dict[str, object] = field(default_factory=dict)
    suspected: tuple[int, ...] = ()  # flagged by the rule's detector, acted on or not (AggregationResult.suspected)


class Transport:
    """Carries message bytes from a client to the server; returns None if the client dropped.

    The default delivers everything untouched.  Tests and protocol attacks subclass it to
    drop, delay, replay or tamper with messages at a named stage.
    """

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        return data


def check_finite(vector: torch.Tensor, sender: int) -> None:
    if not torch.isfinite(vector).all():
        raise InvalidUpdateError("update contains NaN or Inf", sender=sender)


def weighted_layer_mean(
    layout: LayerLayout,
    vectors: Sequence[torch.Tensor],
    layer_sets: Sequence[tuple[str, ...]],
    weights: Sequence[float] | torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-layer weighted mean over the clients that uploaded each layer.

    Returns the full-length aggregate (zeros where nobody uploaded) and the total weight
    behind each layer.  Accumulates in float64 so the mean does not depend on client order.
    """
    full = torch.zeros(layout.numel, dtype=torch.float64)
    totals = dict.fromkeys(layout.layer_names, 0.0)
    w = [float(x) for x in weights]
    for vec, layers, wi in zip(vectors, layer_sets, w):
        if wi == 0:
            continue
        pos = 0
        v = vec.to(torch.float64)
        for name, s in layout.slices(layers).items():
            size = s.stop - s.start
            full[s] += wi * v[pos : pos + size]
            totals[name] += wi
            pos += size
    for name, s in layout.slices().items():
        if totals[name] != 0:
            full[s] /= totals[name]
    return full.to(torch.float32), totals


def nothing_accepted(round_idx: int, offered: int, rejected: Mapping[int, str]) -> ProtocolAbort:
    """The ``ProtocolAbort`` every protocol raises when no client's update reached the aggregate.

    An all-zero aggregate would otherwise train nothing without a word (a user's glue bug, a
    transport that drops everything, a layout mismatch on every client).  Names up to five of
    the rejected clients and why.
    """
    reasons = "; ".join(f"client {cid}: {why}" for cid, why in list(rejected.items())[:5])
    more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
    detail = f": {reasons}{more}" if reasons else ""
    return ProtocolAbort(f"round {round_idx}: none of the {offered} offered updates was accepted{detail}")
