"""The one aggregation step: run the defense on what a protocol revealed.

A protocol's server half ends with a typed ``securefml.reveals.Revealed`` value; this step, and
only this step, turns it into the round's aggregate: it checks that the defense can run on what
was revealed (``Defense.runs_on``), runs it (on updates, or on bucket means), and places the
result in the full layout with the weight behind each layer.  Protocols never call a defense
themselves on this path, so a defense is written once for every protocol.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from securefml.defenses.base import Defense
from securefml.defenses.buckets import aggregate_buckets
from securefml.errors import ConfigError, ProtocolAbort
from securefml.protocols.base import ClientUpdate, RoundOutput
from securefml.protocols.plaintext import aggregate_plain
from securefml.reveals import Revealed, RevealedSums, RevealedUpdates, Reveals
from securefml.updates import LayerLayout

__all__ = ["aggregate"]


def aggregate(
    revealed: Revealed,
    defense: Defense,
    layout: LayerLayout,
    *,
    context: Mapping[str, object] | None = None,
    bytes_uploaded: int = 0,
) -> RoundOutput:
    """The round's aggregate from ``revealed``, decided by ``defense``.

    Raises
    ------
    ConfigError
        If ``defense`` cannot run on what was revealed (e.g. a coordinate-wise rule on a single
        secure sum), or if clients uploaded different layers to a rule that needs the same ones.
    ProtocolAbort
        If nothing usable was revealed (every client rejected or dropped).
    """
    if revealed.kind not in defense.runs_on:
        raise ConfigError(
            f"defense {defense!r} cannot run on what the protocol revealed ({revealed.kind}); "
            f"it needs one of: {', '.join(sorted(defense.runs_on))}"
        )
    rejected = dict(revealed.rejected)
    if isinstance(revealed, RevealedUpdates):
        if not revealed.client_ids:
            raise ProtocolAbort(f"no client update was accepted this round (rejected: {rejected or 'none'})")
        clients = [
            ClientUpdate(c, v, layers, w)
            for c, v, layers, w in zip(revealed.client_ids, revealed.vectors, revealed.layer_sets, revealed.weights)
        ]
        return aggregate_plain(layout, clients, defense, rejected, bytes_uploaded, context)
    return _aggregate_sums(revealed, defense, layout, rejected, bytes_uploaded, context)


def _aggregate_sums(
    revealed: RevealedSums,
    defense: Defense,
    layout: LayerLayout,
    rejected: dict[int, str],
    bytes_uploaded: int,
    context: Mapping[str, object] | None,
) -> RoundOutput:
    usable = [i for i, w in enumerate(revealed.total_weights) if w > 0]
    if not usable:
        raise ProtocolAbort("no secure sum with positive weight survived this round")
    sums = torch.stack([revealed.sums[i].to(torch.float64) for i in usable])
    weights = [revealed.total_weights[i] for i in usable]
    members = [revealed.contributors[i] for i in usable]
    ctx = dict(context or {})
    if revealed.kind is Reveals.BUCKETS:
        result = aggregate_buckets(defense, sums.to(torch.float32), weights, members, context=ctx)
    else:
        result = defense((sums / weights[0]).to(torch.float32), weights, client_ids=(-1,), context=ctx)
    assert result.aggregate is not None
    full = layout.scatter(result.aggregate.to(torch.float32), revealed.layers)
    total = float(sum(weights))
    totals = {name: (total if name in revealed.layers else 0.0) for name in layout.layer_names}
    accepted = tuple(sorted(c for group in members for c in group))
    return RoundOutput(full, totals, accepted, rejected, flagged=tuple(result.flagged),
                       bytes_uploaded=bytes_uploaded, defense=result, extras={"error_bound": revealed.error_bound})
