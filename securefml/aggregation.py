"""The one aggregation step: run the defense on what a protocol revealed.

A protocol's server half ends with a typed ``securefml.reveals.Revealed`` value; this step, and
only this step, turns it into the round's aggregate: it checks that the defense can run on what
was revealed (``Defense.runs_on``), runs it (on updates, or on bucket means), and places the
result in the full layout with the weight behind each layer.  Protocols never call a defense
themselves on this path, so a defense is written once for every protocol.

A Gram-revealing protocol (CKKS) asks for its decision mid-round through ``gram_combiner`` and
then reveals the decided combination (``RevealedGram``); this step applies the rule's typed
post-processing (``AggregationResult.noise_std``, e.g. FLAME's noise) to it after decryption.
Per-layer means (CKKS under the weighted mean, ``RevealedLayerMeans``) pass through.  The
same-layers check (``check_same_layers``) exists here once, for every protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from securefml.defenses.base import Defense
from securefml.defenses.buckets import aggregate_buckets
from securefml.errors import ConfigError, ProtocolAbort
from securefml.gram import Gram
from securefml.reveals import (
    GramCombiner,
    GramDecision,
    Revealed,
    RevealedGram,
    RevealedLayerMeans,
    RevealedSums,
    RevealedUpdates,
    Reveals,
)
from securefml.rounds import ClientUpdate, RoundOutput, nothing_accepted, weighted_layer_mean
from securefml.updates import LayerLayout

__all__ = ["aggregate", "aggregate_plain", "check_same_layers", "gram_combiner", "streaming_weighted_mean"]


def aggregate(
    revealed: Revealed,
    defense: Defense,
    layout: LayerLayout,
    *,
    context: Mapping[str, object] | None = None,
    bytes_uploaded: int = 0,
    round_idx: int = -1,
    offered: int = 0,
) -> RoundOutput:
    """The round's aggregate from ``revealed``, decided by ``defense``.

    ``round_idx`` and ``offered`` (how many clients were asked) only word the error of a round
    in which nothing was accepted.

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
            raise nothing_accepted(round_idx, offered, rejected)
        clients = [
            ClientUpdate(c, v, layers, w)
            for c, v, layers, w in zip(revealed.client_ids, revealed.vectors, revealed.layer_sets, revealed.weights)
        ]
        return aggregate_plain(layout, clients, defense, rejected, bytes_uploaded, context)
    if isinstance(revealed, RevealedLayerMeans):
        return _aggregate_layer_means(revealed, defense, layout, rejected, bytes_uploaded)
    if isinstance(revealed, RevealedGram):
        return _aggregate_gram(revealed, layout, rejected, bytes_uploaded, context)
    return _aggregate_sums(revealed, defense, layout, rejected, bytes_uploaded, context)


def check_same_layers(defense: Defense, layer_sets: Sequence[tuple[str, ...]]) -> None:
    """The same-layers check, once for every protocol: a rule other than the weighted mean
    needs every client to upload the same layers (a server-dictated selection plan).

    A protocol that must decide before anything is revealed (CKKS packs the Gram's frame from
    the clients' announced manifests) calls it on the announcements; ``aggregate_plain`` calls it
    on the decoded updates.

    Raises
    ------
    ConfigError
        If the sets differ and ``defense`` is not the weighted mean.
    """
    if len(set(layer_sets)) > 1 and not defense.is_weighted_mean:
        raise ConfigError(
            f"defense {defense!r} needs every client to upload the same layers; "
            "use a server-dictated selection plan with robust rules"
        )


def _with_stats(out: RoundOutput, revealed: RevealedLayerMeans | RevealedGram) -> RoundOutput:
    if revealed.stats is not None:
        out.extras.update(revealed.stats.to_dict())
    return out


def _aggregate_layer_means(
    revealed: RevealedLayerMeans,
    defense: Defense,
    layout: LayerLayout,
    rejected: dict[int, str],
    bytes_uploaded: int,
) -> RoundOutput:
    """Per-layer weighted means (CKKS mean mode) -> the round's output; only the mean runs on them."""
    if not defense.is_weighted_mean:
        raise ConfigError(f"defense {defense!r} cannot run on per-layer sums; only the weighted mean can")
    out = RoundOutput(revealed.mean.to(torch.float32), dict(revealed.layer_weight), revealed.client_ids, rejected,
                      bytes_uploaded=bytes_uploaded)
    out.extras.update(withheld_layers=tuple(revealed.withheld_layers), layer_counts=dict(revealed.layer_counts),
                      error_bound=revealed.error_bound)
    return _with_stats(out, revealed)


def _aggregate_gram(
    revealed: RevealedGram,
    layout: LayerLayout,
    rejected: dict[int, str],
    bytes_uploaded: int,
    context: Mapping[str, object] | None,
) -> RoundOutput:
    """A Gram-decided combination -> the round's output, with the rule's post-processing noise.

    The rule ran mid-round (``gram_combiner``); here its typed ``noise_std`` is applied to the
    decrypted combination, before it leaves the aggregation step.  A combination that was not
    decrypted (policy refusal, too few clients) leaves the model as it is: zero weight on
    every layer, ``withheld_layers`` naming the layers it would have covered.
    """
    ids = revealed.client_ids
    zeros = torch.zeros(layout.numel)
    nothing = dict.fromkeys(layout.layer_names, 0.0)
    result = revealed.decision.result if revealed.decision is not None else None
    flagged = tuple(result.flagged) if result is not None else ()
    suspected = tuple(result.suspected) if result is not None else ()
    out = RoundOutput(zeros, nothing, ids, rejected, flagged=flagged, bytes_uploaded=bytes_uploaded, defense=result,
                      suspected=suspected)
    out.extras["layer_counts"] = dict(revealed.layer_counts)
    if revealed.gram is not None:
        out.extras["gram"] = revealed.gram
    if revealed.policy_refused is not None:
        out.extras["policy_refused"] = revealed.policy_refused
    if revealed.combination is None or result is None:
        out.extras["withheld_layers"] = tuple(revealed.layers) if ids else ()
        return _with_stats(out, revealed)
    vec = revealed.combination.detach().to("cpu", torch.float64).reshape(-1)
    if result.noise_std > 0:
        # post-processing (FLAME): added right after decryption, before the aggregate leaves this step
        gen = (context or {}).get("generator")
        noise = torch.randn(vec.shape, generator=gen if isinstance(gen, torch.Generator) else None,
                            dtype=torch.float64)
        vec = vec + float(result.noise_std) * noise
    out.aggregate = layout.scatter(vec.to(torch.float32), revealed.layers)
    out.layer_weight = {n: (float(revealed.kept_weight) if n in revealed.layers else 0.0) for n in layout.layer_names}
    out.extras["withheld_layers"] = ()
    return _with_stats(out, revealed)


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
    extras: dict[str, object] = {"error_bound": revealed.error_bound}
    if revealed.kind is Reveals.BUCKETS:  # positions among the revealed sums; a flag never names a client
        extras["flagged_buckets"] = list(result.flagged_buckets)
    return RoundOutput(full, totals, accepted, rejected, flagged=tuple(result.flagged),
                       bytes_uploaded=bytes_uploaded, defense=result, extras=extras,
                       suspected=tuple(result.suspected))


def gram_combiner(defense: Defense, context: Mapping[str, object] | None = None) -> GramCombiner:
    """How the aggregation step decides on a revealed Gram: ``defense.aggregate_gram``, checked.

    A Gram-revealing protocol (CKKS statistics) calls the returned function mid-round with the
    decrypted Gram and the clients' sample weights; it returns the per-client coefficients of
    the combination the protocol then reveals.  The defense runs here, not in the protocol.

    Raises
    ------
    ConfigError
        If the defense returns no finite coefficient per client.
    """
    ctx = dict(context or {})

    def combine(gram: Gram, sample_weights: torch.Tensor) -> GramDecision:
        result = defense.aggregate_gram(gram, sample_weights, context=ctx)
        coeffs = result.weights
        n = int(sample_weights.numel())
        if coeffs is None or coeffs.numel() != n or not torch.isfinite(coeffs).all():
            raise ConfigError(f"defense {defense!r} returned no valid per-client weights from the Gram")
        return GramDecision(coeffs.to(torch.float64), result)

    return combine


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
    """Run ``defense`` on decoded plaintext updates and place the result in the full layout.

    The same-layers check lives here, once: a rule other than the weighted mean needs every
    client to have uploaded the same layers (a server-dictated selection plan).
    """
    if not clients:
        return RoundOutput(torch.zeros(layout.numel), dict.fromkeys(layout.layer_names, 0.0), (), rejected,
                           bytes_uploaded=nbytes)
    ids = tuple(c.client_id for c in clients)
    weights = [c.weight for c in clients]
    layer_sets = {c.layers for c in clients}
    if len(layer_sets) > 1:
        check_same_layers(defense, [c.layers for c in clients])
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
                       defense=result, suspected=tuple(result.suspected))
