"""The interface every aggregation protocol implements: a factory of its halves.

A protocol is a client half (answers the server's messages with bytes, built on the client's
device from its own update) and a server half (consumes the replies stage by stage and reveals a
typed value), plus, for protocols with more parties (the CKKS key holder, the reference party),
their halves too.  ``AggregationProtocol.run_round`` is one generic in-process driver over those
halves (``securefml.protocols.halves.simulate``) followed by the one aggregation step
(``securefml.aggregation.aggregate``); no protocol re-implements it.  Messages cross a
``Transport`` as bytes, so dropouts and tampering are injected there, never by hooks in the
protocol code.

To add a protocol: subclass ``AggregationProtocol`` in one file, declare ``reveals``, implement
``server_half`` and ``client_half`` (and ``service_halves`` if the protocol has parties other
than clients and server), and register it in ``securefml.protocols.PROTOCOLS``
(``docs/architecture.md`` walks through it with the plaintext protocol as the example).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from securefml.aggregation import aggregate, gram_combiner
from securefml.errors import ConfigError, InvalidUpdateError, ProtocolError
from securefml.protocols.halves import ClientHalf, RoundStats, ServerHalf, Transcript, simulate
from securefml.reveals import GramCombiner, Revealed, Reveals
from securefml.rounds import (
    ClientUpdate,
    RoundOutput,
    Transport,
    check_finite,
    nothing_accepted,
    weighted_layer_mean,
)
from securefml.updates import LayerLayout

if TYPE_CHECKING:  # pragma: no cover
    from securefml.defenses.base import Defense

__all__ = [
    "ClientUpdate",
    "RoundOutput",
    "Transport",
    "AggregationProtocol",
    "HalvesSetup",
    "RoundHalves",
    "Reveals",
    "finish_round",
    "weighted_layer_mean",
    "check_finite",
    "nothing_accepted",
]

log = logging.getLogger(__name__)


def finish_round(
    revealed: Revealed,
    transcript: Transcript,
    stats: RoundStats | None,
    defense: Defense,
    layout: LayerLayout,
    *,
    context: Mapping[str, object] | None,
    round_idx: int,
    offered: int,
) -> RoundOutput:
    """The aggregation step on what was revealed, with the driver's and the server half's record.

    Rejections name the client and why (clients that stopped on their own, e.g. on catching the
    server deviating, are listed as such); ``extras`` gain the dropouts and the server half's
    typed ``stats`` (``to_dict()``), so everything the protocol measured reaches the round record.
    """
    out = aggregate(revealed, defense, layout, context=context, bytes_uploaded=transcript.bytes_to_server,
                    round_idx=round_idx, offered=offered)
    out.rejected = {**{c: f"client stopped: {why}" for c, why in transcript.client_errors.items()},
                    **transcript.rejected, **out.rejected}
    out.extras.setdefault("dropped", dict(transcript.dropped))
    out.extras.setdefault("bytes_to_clients", transcript.bytes_to_clients)
    if stats is not None:
        out.extras = {**stats.to_dict(), **out.extras}
    return out


@dataclass(frozen=True)
class HalvesSetup:
    """What a protocol's server-side halves need to know about the round, beyond the cohort.

    All of it is public to the server: the rule it will run, how the aggregation step decides
    on a Gram matrix (``combine``, used by protocols that reveal ``Reveals.GRAM``), the
    server's own reference update for rules such as FLTrust, and a public bound on a client's
    weight (SecAgg+ sizes its ring with it; larger weights are clipped to it).
    """

    defense: Defense
    combine: GramCombiner | None = None
    reference: torch.Tensor | None = None
    max_weight: float | None = None


@dataclass
class RoundHalves:
    """One round's halves: the server's, every client's, and the protocol's other parties'."""

    server: ServerHalf
    clients: dict[int, ClientHalf] = field(default_factory=dict)
    services: dict[int, ClientHalf] = field(default_factory=dict)

    def parties(self) -> dict[int, ClientHalf]:
        """Every half the server addresses, clients and service parties together."""
        return {**self.clients, **self.services}


class AggregationProtocol(ABC):
    """A secure (or reference) aggregation protocol, as a factory of its halves.

    Subclasses declare ``reveals`` (what a defense may see) and implement ``server_half`` and
    ``client_half``.  ``check_defense`` refuses, before any work, a rule that cannot run on
    what the protocol reveals.
    """

    name: str = "protocol"
    reveals: Reveals = Reveals.UPDATES

    @abstractmethod
    def server_half(
        self, round_idx: int, layout: LayerLayout, cohort: Sequence[int], *, setup: HalvesSetup
    ) -> ServerHalf:
        """The aggregator's half for ``round_idx`` over ``cohort`` (client ids)."""

    @abstractmethod
    def client_half(self, round_idx: int, layout: LayerLayout, update: ClientUpdate) -> ClientHalf:
        """Client ``update.client_id``'s half: it learns the round's plan from the server's first message."""

    def service_halves(self, round_idx: int, layout: LayerLayout, *, setup: HalvesSetup) -> dict[int, ClientHalf]:
        """Halves of parties other than clients and server (e.g. a key holder); none by default."""
        return {}

    def round_halves(
        self, round_idx: int, updates: Sequence[ClientUpdate], layout: LayerLayout, *, setup: HalvesSetup
    ) -> RoundHalves:
        """Every half of one round, built the way a deployment builds them, each from its own inputs."""
        ids = [u.client_id for u in updates]
        if len(set(ids)) != len(ids):
            raise ConfigError("client ids in one round must be distinct")
        return RoundHalves(
            server=self.server_half(round_idx, layout, ids, setup=setup),
            clients={u.client_id: self.client_half(round_idx, layout, u) for u in updates},
            services=self.service_halves(round_idx, layout, setup=setup),
        )

    def halves_setup(
        self,
        defense: Defense,
        *,
        context: Mapping[str, object] | None = None,
        reference: torch.Tensor | None = None,
        max_weight: float | None = None,
    ) -> HalvesSetup:
        """The round's ``HalvesSetup``; the Gram decision is the aggregation step's (``gram_combiner``)."""
        combine = gram_combiner(defense, context) if self.reveals is Reveals.GRAM else None
        return HalvesSetup(defense=defense, combine=combine, reference=reference, max_weight=max_weight)

    def collect(
        self,
        round_idx: int,
        updates: Sequence[ClientUpdate],
        layout: LayerLayout,
        *,
        setup: HalvesSetup,
        transport: Transport | None = None,
    ) -> tuple[Revealed, Transcript, RoundHalves]:
        """Build every half of the round and drive them in this process over ``transport``.

        Returns what the server half reveals, the driver's transcript (bytes, dropouts, who
        stopped or was rejected and why) and the halves themselves (for ``round_stats``).
        """
        self.check_defense(setup.defense)
        if not updates:
            raise nothing_accepted(round_idx, 0, {})
        halves = self.round_halves(round_idx, updates, layout, setup=setup)
        transcript = Transcript()
        revealed = simulate(halves.server, halves.parties(), transport=transport, transcript=transcript)
        return revealed, transcript, halves

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
        max_weight: float | None = None,
    ) -> RoundOutput:
        """Drive one round in this process: the halves over bytes, then the aggregation step.

        A client whose message is invalid is rejected (``RoundOutput.rejected`` names it and
        why) and the round goes on with the others; ``ProtocolAbort`` if nothing usable was
        revealed.
        """
        setup = self.halves_setup(defense, context=context, reference=reference, max_weight=max_weight)
        revealed, transcript, halves = self.collect(round_idx, updates, layout, setup=setup, transport=transport)
        return finish_round(revealed, transcript, self.round_stats(halves), defense, layout, context=context,
                            round_idx=round_idx, offered=len(updates))

    def round_stats(self, halves: RoundHalves) -> RoundStats | None:
        """The round's typed statistics for its record: the server half's own by default.

        A protocol whose clients count something of their own (never sent) may add it here for
        in-process rounds, where the driver holds every half anyway.
        """
        return halves.server.stats

    def check_defense(self, defense: Defense) -> None:
        """Raise ``ConfigError`` if ``defense`` cannot run on what this protocol reveals."""
        if self.reveals not in defense.runs_on:
            need = ", ".join(sorted(defense.runs_on))
            raise ConfigError(
                f"defense {defense!r} cannot run under protocol {self.name!r} (it reveals {self.reveals!r}); "
                f"it needs a protocol that reveals one of: {need}"
            )

    @staticmethod
    def record_rejection(rejected: dict[int, str], sender: int, exc: Exception) -> None:
        if not isinstance(exc, (ProtocolError, InvalidUpdateError)):
            raise exc
        log.warning("round: rejected client %s: %s", sender, exc)
        rejected[sender] = f"{type(exc).__name__}: {exc}"
