"""The server's side of a round: plan, collect, aggregate, step.

The round flows one way (``docs/architecture.md``): the server broadcasts the model and an
``UploadPlan``; each client trains and prepares its own upload (``securefml.client``), the
round's ``Adversary`` rewrites the malicious clients' updates; the protocol's halves carry the
uploads as bytes and the server half reveals a typed value (``protocols.halves.simulate``); the
one aggregation step runs the defense on it (``securefml.aggregation``); the server optimizer
steps on the layers someone uploaded.  The server never reads a client's data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from securefml.adversary import Adversary, AdversaryReport
from securefml.client import Client, LocalResult, UploadPlan
from securefml.cohort import train_cohort
from securefml.context import RoundContext
from securefml.defenses.base import Defense
from securefml.errors import ProtocolAbort
from securefml.meta.base import MetaLearner, Params
from securefml.optimizer import ServerOptimizer
from securefml.protocols.base import AggregationProtocol, finish_round
from securefml.records import json_ready
from securefml.rounds import ClientUpdate, RoundOutput, Transport, nothing_accepted
from securefml.selection import AllLayers, LayerSelector, NamedLayers
from securefml.updates import LayerLayout, Role

__all__ = ["Server", "RoundRecord"]

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """One round's history entry (JSON-ready)."""

    round: int
    cohort: list[int]
    malicious: list[int]
    accepted: list[int]
    rejected: dict[int, str]
    flagged: list[int]
    bytes_uploaded: int
    train_loss: float
    update_norm: float
    seconds: float
    uploaded_layers: dict[str, int] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    #: the accepted clients the defense's detector flagged (``AggregationResult.suspected``),
    #: beside ``flagged``, the ones it excluded; empty for a rule without a detector
    suspected: list[int] = field(default_factory=list)


class Server:
    """Holds the meta-parameters and runs rounds.

    Parameters
    ----------
    learner:
        The meta-learner every honest client runs.
    protocol:
        How updates travel and are aggregated (plaintext, CKKS, SecAgg...).
    defense:
        The aggregation rule, checked against what the protocol reveals.
    server_optimizer:
        ``"sgd"`` or ``"adam"`` on the meta-parameters, fed the pseudo-gradient -aggregate.
    equal_weights:
        Give every client weight 1 instead of its sample count (user-level DP sizes its noise
        for one client's equal share: ``PrivacySetup.equal_weights``).
    vectorize:
        Run the local updates of clients whose tasks have the same shapes as one
        ``torch.func.vmap`` (``MetaLearner.update_many``) instead of one client at a time,
        when the learner supports it; the results agree with the loop to float rounding.
    """

    def __init__(
        self,
        learner: MetaLearner,
        protocol: AggregationProtocol,
        defense: Defense,
        *,
        selector: LayerSelector | None = None,
        server_optimizer: str = "sgd",
        server_lr: float = 1.0,
        device: torch.device | str = "cpu",
        update_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        aggregate_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        equal_weights: bool = False,
        vectorize: bool = True,
    ) -> None:
        protocol.check_defense(defense)
        self.equal_weights = equal_weights
        self.vectorize = bool(vectorize)
        self.learner = learner
        self.protocol = protocol
        self.defense = defense
        self.selector = selector or AllLayers()
        self.device = torch.device(device)
        self.params: Params = learner.init_params(self.device)
        layout = learner.layout(self.device)  # with the roles the learner declares
        self.update_hook = update_hook
        self.aggregate_hook = aggregate_hook
        self.model = ServerOptimizer(layout, layout.flatten(self.params), name=server_optimizer, lr=server_lr)
        self._last_aggregate: torch.Tensor | None = None

    # -- state -------------------------------------------------------------------------------
    @property
    def layout(self) -> LayerLayout:
        """The flat layout of the model (a chunked selection may replace it with a finer one)."""
        return self.model.layout

    @layout.setter
    def layout(self, value: LayerLayout) -> None:
        self.model.layout = value

    @property
    def global_vector(self) -> torch.Tensor:
        return self.model.vector

    def _sync_params(self) -> None:
        self.params = {n: t.clone() for n, t in self.layout.unflatten(self.model.vector).items()}

    # -- one round: plan -> (clients) -> collect -> aggregate -> step ------------------------------
    def plan(self, round_idx: int) -> UploadPlan:
        """What the server broadcasts with the model: the round's upload plan.

        A server-dictated selector fixes one layer set for the cohort.  Update-driven dictated
        selectors rank layers by the server's previous aggregate, which every client also
        received; before the first aggregate, every layer is sent.
        """
        layers: tuple[str, ...] | None = None
        if self.selector.server_dictated:
            needs_update = not isinstance(self.selector, (AllLayers, NamedLayers))
            if needs_update and self._last_aggregate is None:
                layers = self.layout.layer_names
            else:
                last = self._last_aggregate
                if last is None:
                    last = torch.zeros_like(self.global_vector)
                layers = tuple(self.selector.select(self.layout, last, self.global_vector))
        return UploadPlan(
            round=round_idx,
            layout=self.layout,
            global_vector=self.global_vector,
            layers=layers,
            selector=self.selector,
            error_feedback=bool(getattr(self.selector, "error_feedback", False)),
            update_hook=self.update_hook,
            equal_weights=self.equal_weights,
        )

    def context(
        self,
        round_idx: int,
        *,
        generator: torch.Generator | None = None,
        reference: torch.Tensor | None = None,
        defense_context: Mapping[str, Any] | None = None,
    ) -> RoundContext:
        """The round's public context for the defense and the adversary."""
        base = RoundContext.from_mapping(round_idx, defense_context)
        return replace(base, layout=self.layout, global_vector=self.global_vector, generator=generator,
                       reference=reference if reference is not None else base.reference)

    def collect(
        self,
        round_idx: int,
        updates: Sequence[ClientUpdate],
        context: RoundContext,
        *,
        transport: Transport | None = None,
    ) -> RoundOutput:
        """The protocol's halves over bytes, then the one aggregation step."""
        protocol, defense = self.protocol, self.defense
        if not updates:
            raise nothing_accepted(round_idx, 0, {})
        setup = protocol.halves_setup(defense, context=context, reference=context.reference)
        revealed, transcript, halves = protocol.collect(round_idx, updates, self.layout, setup=setup,
                                                        transport=transport)
        return finish_round(revealed, transcript, protocol.round_stats(halves), defense, self.layout,
                            context=context, round_idx=round_idx, offered=len(updates))

    def run_round(
        self,
        round_idx: int,
        cohort: Sequence[Client],
        *,
        transport: Transport | None = None,
        generator: torch.Generator | None = None,
        reference: torch.Tensor | None = None,
        defense_context: Mapping[str, Any] | None = None,
    ) -> RoundRecord:
        """One round: plan, the clients' work, the adversary, collect, aggregate, step."""
        start = time.perf_counter()
        context = self.context(round_idx, generator=generator, reference=reference, defense_context=defense_context)
        plan = self.plan(round_idx)
        # -- client work (batched by the simulator where shapes allow) --
        results, rejected = train_cohort(self.learner, self.params, self.layout, cohort, round_idx=round_idx,
                                         vectorize=self.vectorize, device=self.device)
        by_id = {c.client_id: c for c in cohort}
        report = self.adversary_step(cohort, results, context)
        updates = [by_id[r.client_id].prepare_upload(r, plan, self.learner, device=self.device) for r in results]
        layer_sets = {u.layers for u in updates}
        if len(layer_sets) == 1:  # one layer set for the whole cohort: rules with per-layer state need it
            context = replace(context, layers=next(iter(layer_sets)))
        # -- server work --
        try:
            out = self.collect(round_idx, updates, context, transport=transport)
        except ProtocolAbort as exc:  # too few survivors: nothing revealed, the model stays as it is
            log.warning("round %d aborted: %s", round_idx, exc)
            out = RoundOutput(torch.zeros(self.layout.numel), dict.fromkeys(self.layout.layer_names, 0.0), (),
                              {}, extras={"aborted": str(exc)})
        if self.aggregate_hook is not None and out.accepted:
            out.aggregate = self.aggregate_hook(len(out.accepted), out.aggregate)
        self._step(out)
        uploaded: dict[str, int] = {}
        for u in updates:
            for n in u.layers:
                uploaded[n] = uploaded.get(n, 0) + 1
        losses = [v for r in results for k, v in r.metrics.items() if k.endswith("loss")]
        extras = dict(out.extras)
        if report.groups:
            extras["adversary"] = report.to_dict()
        return RoundRecord(
            round=round_idx,
            cohort=[c.client_id for c in cohort],
            malicious=[c.client_id for c in cohort if c.malicious],
            accepted=list(out.accepted),
            rejected={**rejected, **out.rejected},
            flagged=list(out.flagged),
            bytes_uploaded=out.bytes_uploaded,
            train_loss=float(sum(losses) / len(losses)) if losses else float("nan"),
            update_norm=float(out.aggregate.norm()),
            seconds=time.perf_counter() - start,
            uploaded_layers=uploaded,
            extras=json_ready(extras),
            suspected=list(out.suspected),
        )

    def adversary_step(self, cohort: Sequence[Client], results: Sequence[LocalResult],
                       context: RoundContext) -> AdversaryReport:
        """The cohort's malicious clients rewrite their local results together (in place), as every round does."""
        adversary = Adversary({c.client_id: c.attack for c in cohort if c.attack is not None})
        return adversary.act(results, context, cohort_size=len(cohort), defense=self.defense,
                             lr_mask=self.layout.mask(self._learned_rate_layers()))

    def _learned_rate_layers(self) -> tuple[str, ...]:
        """The learned per-parameter rates the learner declared (Meta-SGD), for attacks on them."""
        return self.layout.layers_with_role(Role.LEARNED_RATE)

    def _step(self, out: RoundOutput) -> None:
        """Server optimizer step on the layers someone uploaded; the others keep their value."""
        if not out.accepted:
            return
        self.model.step(out)
        self._last_aggregate = out.aggregate.to(self.device, torch.float32)
        self._sync_params()
