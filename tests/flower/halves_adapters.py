"""SecAgg+ behind ``server_half``/``client_half``, built from the existing bytes halves.

``SecAggPlus.server_half`` is being ported on another branch; until it lands, these tests build
its halves directly from ``protocols/secagg_halves.py`` (``SecAggServerHalf`` /
``SecAggClientHalf``), with bucketed mode as one server half per bucket behind one composite
half, the partition derived exactly as ``SecAggPlus.run_round`` derives it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from securefml.errors import ConfigError, InvalidUpdateError, ProtocolAbort, ProtocolError
from securefml.protocols.base import HalvesSetup
from securefml.protocols.halves import ServerHalf, StageMessages
from securefml.protocols.secagg import SecAggPlus
from securefml.protocols.secagg_graph import bucket_partition, round_seed
from securefml.protocols.secagg_halves import SecAggClientHalf, SecAggServerHalf
from securefml.reveals import RevealedSums, Reveals
from securefml.rounds import ClientUpdate
from securefml.updates import LayerLayout


class BucketServerHalf(ServerHalf):
    """One SecAgg+ server half per bucket; a bucket that aborts drops out alone."""

    def __init__(self, halves: Sequence[SecAggServerHalf]) -> None:
        self.halves = list(halves)
        self.owner = {c: i for i, h in enumerate(self.halves) for c in h.plan.cohort}
        self.aborted: dict[int, str] = {}

    def _live(self) -> list[tuple[int, SecAggServerHalf]]:
        return [(i, h) for i, h in enumerate(self.halves) if i not in self.aborted]

    def next_stage(self) -> StageMessages | None:
        stage, messages = None, {}
        for _, h in self._live():
            opened = h.next_stage()
            if opened is None:
                continue
            stage = opened.stage
            messages.update(opened.messages)
        return None if stage is None else StageMessages(stage, messages)

    def receive(self, party: int, data: bytes) -> None:
        if party not in self.owner or self.owner[party] in self.aborted:
            raise ProtocolError("sender is in no live bucket", sender=party)
        self.halves[self.owner[party]].receive(party, data)

    def reject(self, party: int, error: ProtocolError | InvalidUpdateError) -> None:
        if party in self.owner and self.owner[party] not in self.aborted:
            self.halves[self.owner[party]].reject(party, error)

    def close_stage(self) -> None:
        for i, h in self._live():
            try:
                h.close_stage()
            except ProtocolAbort as exc:
                self.aborted[i] = str(exc)
        if len(self.aborted) == len(self.halves):
            raise ProtocolAbort("every bucket aborted: " + "; ".join(self.aborted.values()))

    def revealed(self) -> RevealedSums:
        parts = [h.revealed() for _, h in self._live()]
        rejected: dict[int, str] = {}
        for p in parts:
            rejected.update(p.rejected)
        return RevealedSums(
            kind=Reveals.BUCKETS,
            layers=parts[0].layers,
            sums=tuple(p.sums[0] for p in parts),
            total_weights=tuple(p.total_weights[0] for p in parts),
            contributors=tuple(p.contributors[0] for p in parts),
            error_bound=max(p.error_bound for p in parts),
            rejected=rejected,
        )


class SecAggHalves(SecAggPlus):
    """``SecAggPlus`` whose halves are the bytes halves (every layer uploaded; weights <= max_weight)."""

    def server_half(  # type: ignore[override]
        self, round_idx: int, layout: LayerLayout, cohort: Sequence[int], *, setup: HalvesSetup
    ) -> ServerHalf:
        max_w = setup.max_weight or self.max_weight
        if max_w is None:
            raise ConfigError("SecAgg+ halves need a public max_weight")
        layers = tuple(layout.layer_names)
        members = tuple(sorted(cohort))

        def half(group: Sequence[int]) -> SecAggServerHalf:
            return SecAggServerHalf(self.plan(round_idx, group, layout.numel, max_weight=max_w, layout=layout,
                                              layers=layers))

        if self.buckets < 2:
            return half(members)
        seed = round_seed(round_idx, members, self.public_seed, "buckets")
        return BucketServerHalf([half(g) for g in bucket_partition(members, len(members) // self.buckets, seed)])

    def client_half(self, round_idx: int, layout: LayerLayout, update: ClientUpdate) -> SecAggClientHalf:  # type: ignore[override]
        if tuple(update.layers) != tuple(layout.layer_names):
            raise ConfigError("these SecAgg+ halves upload every layer")
        vec = update.vector.detach().to(torch.float32).cpu().numpy()
        return SecAggClientHalf(update.client_id, vec, update.weight, round_idx=round_idx,
                                identity=self.identity(update.client_id) if self.signatures else None)
