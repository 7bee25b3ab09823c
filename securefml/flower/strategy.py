"""A Flower Message-API strategy that drives any securefml protocol's server half, stage by stage.

Flower's own secure aggregation (``SecAggPlusWorkflow`` + ``secaggplus_mod``) hands the
strategy only the weighted average, so its robust strategies (FedMedian, Krum, ...) cannot run
under it.  ``SecureStrategy`` instead runs securefml's contract
(``securefml.protocols.halves``): the protocol's ``ServerHalf`` lives in the ServerApp, each
stage's server messages go out as Flower messages (bytes in a ``ConfigRecord``, see
``securefml.flower.records``), the replies come back into ``ServerHalf.receive``, and when the
last stage closes the one aggregation step (``securefml.aggregation.aggregate``) runs the
securefml defense on exactly what the protocol reveals: every update (plaintext), bucket sums
(bucketed SecAgg+), the sum (SecAgg+), or a Gram-chosen combination (CKKS statistics).

How a round maps onto Flower:

- ``configure_train`` picks the cohort (securefml client ids; each SuperNode tells the strategy
  its client id once, in a ``query`` message), builds the server half and sends the first
  stage's message, with the global model, as the ``train`` message;
- ``aggregate_train`` feeds those replies to the server half, then drives the remaining stages
  itself over the same ``Grid`` (``send_and_receive``), and finally aggregates and takes the
  server optimizer's step;
- a reply that never comes (timeout, an error reply, a node that left) is a dropout: the server
  half is simply not given that party's message, exactly as ``simulate`` does with a
  ``Transport`` that returns ``None``.  A ``Transport`` can also be passed to inject dropouts
  and tampering on the server side of the wire, with the same semantics as in-process.

Threat model: the one of the protocol it drives; this module adds no trust.  A reply's Flower
sender id is mapped to the client id the node announced; a reply for another stage, round or
party is rejected by name (``ProtocolError``) before the protocol sees it, and the round goes
on with the others.  The key holder of CKKS is a service party: it must run on a SuperNode of
its own (``service_nodes``), never inside the ServerApp's process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from securefml.aggregation import aggregate, gram_combiner
from securefml.defenses.base import Defense
from securefml.errors import ConfigError, InvalidUpdateError, ProtocolAbort, ProtocolError, SecureFMLError
from securefml.flower.optimizer import ServerOptimizer
from securefml.flower.records import (
    GLOBAL_KEY,
    ROUND_KEY,
    StageRecord,
    metrics_of,
    read_stage,
    write_stage,
    write_vector,
)
from securefml.protocols.base import AggregationProtocol, HalvesSetup
from securefml.protocols.halves import ServerHalf
from securefml.records import json_ready
from securefml.reveals import Reveals
from securefml.rounds import RoundOutput, Transport
from securefml.updates import LayerLayout

__all__ = ["SecureStrategy", "StrategyConfig", "FlowerRound", "HELLO_KEY", "HELLO_ACTION", "EVAL_KEY"]

log = logging.getLogger(__name__)

HELLO_KEY = "securefml.hello"
HELLO_ACTION = "securefml_hello"
EVAL_KEY = "securefml.eval"

#: ``cohort_fn(round_idx, client_ids) -> cohort``: which announced clients take part in a round.
CohortFn = Callable[[int, Sequence[int]], Sequence[int]]
#: ``context_fn(round_idx, global_vector) -> defense context`` (e.g. the Byzantine budget).
ContextFn = Callable[[int, torch.Tensor], Mapping[str, Any]]


@dataclass(frozen=True)
class StrategyConfig:
    """The strategy's knobs.

    Attributes
    ----------
    clients_per_round:
        Cohort size when the default cohort sampler is used.
    min_nodes:
        Wait until this many SuperNodes are connected before the first round.
    server_opt, server_lr:
        Server optimizer on the global vector (``"sgd"`` or ``"adam"``).
    timeout:
        Seconds to wait for one stage's replies; a reply later than that is a dropout.
    max_weight:
        Public bound on a client's weight (SecAgg+ sizes its ring with it).
    seed:
        Seed of the default cohort sampler (``torch.randperm``).
    """

    clients_per_round: int = 10
    min_nodes: int = 2
    server_opt: str = "sgd"
    server_lr: float = 1.0
    timeout: float = 600.0
    max_weight: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clients_per_round < 1 or self.min_nodes < 1:
            raise ConfigError("clients_per_round and min_nodes must be positive")
        if self.timeout <= 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout}")


@dataclass
class FlowerRound:
    """One round as the strategy saw it (the ``history`` entry written to ``result.json``)."""

    round: int
    cohort: list[int]
    accepted: list[int]
    rejected: dict[int, str]
    dropped: dict[int, str]
    flagged: list[int]
    bytes_uploaded: int
    bytes_downloaded: int
    train_loss: float
    update_norm: float
    seconds: float
    stages: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    #: the accepted clients the defense's detector flagged, excluded or not (``RoundOutput.suspected``)
    suspected: list[int] = field(default_factory=list)


class SecureStrategy(Strategy):
    """Run a securefml protocol and defense as a Flower strategy.

    Parameters
    ----------
    protocol:
        Any ``AggregationProtocol`` whose ``server_half``/``client_half`` are implemented (its
        ClientApps must run ``securefml.flower.client.securefml_mod`` with the same protocol).
    defense:
        The securefml rule, run on what the protocol reveals; refused before the first round
        if the protocol cannot show it what it needs.
    layout:
        The model's layer layout (the ClientApps use the same).
    initial:
        The initial global vector.
    config:
        ``StrategyConfig``.
    cohort_fn:
        Picks each round's cohort from the announced client ids (default: ``randperm`` with
        ``config.seed``, ``clients_per_round`` of them).
    context_fn:
        Extra defense context per round (merged over the layout, global vector and round).
    transport:
        Applied to every reply's bytes before the server half sees them (``None`` = dropout).
    service_nodes:
        Protocol service party -> the client id of the SuperNode that hosts it (CKKS key holder).
    evaluate_fn:
        ``evaluate_fn(round_idx, client_ids) -> client ids`` to evaluate after each round
        (default: none).  Their metrics land in ``evaluations``.
    """

    def __init__(
        self,
        protocol: AggregationProtocol,
        defense: Defense,
        layout: LayerLayout,
        initial: torch.Tensor,
        *,
        config: StrategyConfig | None = None,
        cohort_fn: CohortFn | None = None,
        context_fn: ContextFn | None = None,
        transport: Transport | None = None,
        service_nodes: Mapping[int, int] | None = None,
        evaluate_fn: Callable[[int, Sequence[int]], Sequence[int]] | None = None,
    ) -> None:
        protocol.check_defense(defense)
        self.protocol = protocol
        self.defense = defense
        self.layout = layout
        self.config = config or StrategyConfig()
        self.model = ServerOptimizer(layout, initial, name=self.config.server_opt, lr=self.config.server_lr)
        self._gen = torch.Generator().manual_seed(self.config.seed)
        self.cohort_fn = cohort_fn or self._random_cohort
        self.context_fn = context_fn
        self.transport = transport or Transport()
        self.service_nodes = dict(service_nodes or {})
        self.evaluate_fn = evaluate_fn
        self.history: list[FlowerRound] = []
        self.evaluations: dict[int, dict[int, dict[str, float]]] = {}
        self._grid: Grid | None = None
        self._nodes: dict[int, int] = {}  # client id -> Flower node id
        self._clients: dict[int, int] = {}  # Flower node id -> client id
        self._round: _OpenRound | None = None

    # -- Flower's Strategy interface ------------------------------------------------------------
    def summary(self) -> None:
        log.info("SecureStrategy: protocol %s (reveals %s), defense %r, %d parameters",
                 self.protocol.name, self.protocol.reveals, self.defense, self.layout.numel)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Pick the cohort, open the protocol's first stage, send it with the global model."""
        self._grid = grid
        self._discover(grid)
        round_idx = server_round - 1
        cohort = sorted(int(c) for c in self.cohort_fn(round_idx, self._announced()))
        unknown = [c for c in cohort if c not in self._nodes or c in self.service_nodes.values()]
        if unknown:
            raise ConfigError(f"cohort names clients no client SuperNode announced: {unknown[:5]}")
        ctx = self._context(round_idx)
        setup = HalvesSetup(
            defense=self.defense,
            combine=gram_combiner(self.defense, ctx) if Reveals.GRAM in self.defense.runs_on else None,
            reference=None,
            max_weight=self.config.max_weight,
        )
        server = self.protocol.server_half(round_idx, self.layout, cohort, setup=setup)
        self._round = _OpenRound(round_idx, cohort, server, ctx, time.perf_counter())
        return self._open_stage(first=True)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Take the first stage's replies, drive the remaining stages, aggregate, step."""
        rnd = self._round
        if rnd is None or rnd.round_idx != server_round - 1:
            raise ConfigError("aggregate_train without a matching configure_train")
        assert self._grid is not None
        try:
            self._take_replies(replies)
            while True:
                messages = self._open_stage(first=False)
                if rnd.finished:
                    break
                self._take_replies(self._grid.send_and_receive(messages, timeout=self.config.timeout))
            out = self._aggregate(rnd)
        except ProtocolAbort as exc:  # too few parties left at some stage: nothing revealed
            out = self._aborted(rnd, exc)
        self.model.step(out)
        record = self._record(rnd, out)
        self.history.append(record)
        self._round = None
        metrics = MetricRecord({"accepted": len(record.accepted), "dropped": len(record.dropped),
                                "rejected": len(record.rejected), "bytes_uploaded": record.bytes_uploaded,
                                "train_loss": record.train_loss})
        out_arrays = RecordDict()
        write_vector(out_arrays, GLOBAL_KEY, self.model.vector)
        return out_arrays.array_records[GLOBAL_KEY], metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model to the clients ``evaluate_fn`` names (personalization runs there)."""
        if self.evaluate_fn is None:
            return []
        self._discover(grid)
        targets = [c for c in self.evaluate_fn(server_round - 1, self._announced()) if c in self._nodes]
        out = []
        for cid in targets:
            content = RecordDict({EVAL_KEY: ConfigRecord({"round": server_round - 1, "party": int(cid)})})
            write_vector(content, GLOBAL_KEY, self.model.vector)
            out.append(grid.create_message(content, MessageType.EVALUATE, self._nodes[cid], f"eval-{server_round}"))
        return out

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Keep every client's metrics; return their mean weighted by ``num_examples`` (or plain)."""
        per_client: dict[int, dict[str, float]] = {}
        for msg in replies:
            if msg.has_error() or msg.metadata.src_node_id not in self._clients:
                continue
            per_client[self._clients[msg.metadata.src_node_id]] = metrics_of(msg.content)
        self.evaluations[server_round - 1] = per_client
        if not per_client:
            return None
        keys = sorted(set.intersection(*(set(m) for m in per_client.values())) - {"num_examples"})
        weights = {c: m.get("num_examples", 1.0) for c, m in per_client.items()}
        total = sum(weights.values()) or 1.0
        return MetricRecord({k: sum(weights[c] * m[k] for c, m in per_client.items()) / total for k in keys})

    # -- helpers --------------------------------------------------------------------------------
    def _random_cohort(self, round_idx: int, clients: Sequence[int]) -> list[int]:
        k = min(self.config.clients_per_round, len(clients))
        return [clients[i] for i in torch.randperm(len(clients), generator=self._gen)[:k].tolist()]

    def _announced(self) -> list[int]:
        """The client ids announced by client SuperNodes (service parties' nodes excluded)."""
        services = set(self.service_nodes.values())
        return sorted(c for c in self._clients.values() if c not in services)

    def _discover(self, grid: Grid) -> None:
        """Learn each SuperNode's client id (once per node) with a ``query`` message."""
        deadline = time.monotonic() + self.config.timeout
        while len(nodes := list(grid.get_node_ids())) < self.config.min_nodes:
            if time.monotonic() > deadline:
                raise ConfigError(f"only {len(nodes)} of {self.config.min_nodes} SuperNodes connected")
            time.sleep(0.2)
        new = [n for n in nodes if n not in self._clients]
        if not new:
            return
        kind = f"{MessageType.QUERY}.{HELLO_ACTION}"
        hello = [grid.create_message(RecordDict({HELLO_KEY: ConfigRecord({"ask": 1})}), kind, n, "hello") for n in new]
        for msg in grid.send_and_receive(hello, timeout=self.config.timeout):
            if msg.has_error() or HELLO_KEY not in msg.content.config_records:
                log.warning("SuperNode %s did not announce a securefml client id", msg.metadata.src_node_id)
                continue
            cid = msg.content.config_records[HELLO_KEY].get("client")
            if not isinstance(cid, int) or cid in self._nodes:
                log.warning("SuperNode %s announced an invalid or duplicate client id %r; ignored",
                            msg.metadata.src_node_id, cid)
                continue
            self._nodes[cid] = msg.metadata.src_node_id
            self._clients[msg.metadata.src_node_id] = cid
        missing = [p for p in self.service_nodes.values() if p not in self._nodes]
        if missing:
            raise ConfigError(f"service parties' SuperNodes did not announce themselves: {missing}")

    def _context(self, round_idx: int) -> dict[str, Any]:
        ctx: dict[str, Any] = {"layout": self.layout, "global_vector": self.model.vector, "round": round_idx,
                               "generator": self._gen}
        if self.context_fn is not None:
            ctx.update(self.context_fn(round_idx, self.model.vector))
        return ctx

    def _node_of(self, party: int) -> int | None:
        cid = self.service_nodes.get(party, party)
        return self._nodes.get(cid)

    def _open_stage(self, *, first: bool) -> list[Message]:
        rnd = self._round
        assert rnd is not None and self._grid is not None
        if not first:
            rnd.server.close_stage()
        opened = rnd.server.next_stage()
        if opened is None:
            rnd.finished = True
            return []
        rnd.stage = opened.stage
        rnd.stages.append(opened.stage)
        rnd.waiting = set()
        out = []
        for party, payload in sorted(opened.messages.items()):
            node = self._node_of(party)
            if party in rnd.stopped:
                continue
            if node is None:  # nobody to deliver to: a dropout at this stage
                rnd.stopped.add(party)
                rnd.dropped[party] = opened.stage
                continue
            content = write_stage(RecordDict(), StageRecord(opened.stage, rnd.round_idx, party, payload))
            if first:
                write_vector(content, GLOBAL_KEY, self.model.vector)
                content[ROUND_KEY] = ConfigRecord({"round": rnd.round_idx, "cohort_size": len(rnd.cohort)})
            rnd.bytes_down += len(payload)
            rnd.waiting.add(party)
            out.append(self._grid.create_message(content, MessageType.TRAIN, node, f"round-{rnd.round_idx}"))
        return out

    def _party_of(self, msg: Message) -> int | None:
        cid = self._clients.get(msg.metadata.src_node_id)
        if cid is None:
            return None
        services = {node_cid: party for party, node_cid in self.service_nodes.items()}
        return services.get(cid, cid)

    def _take_replies(self, replies: Iterable[Message]) -> None:
        rnd = self._round
        assert rnd is not None
        for msg in replies:
            party = self._party_of(msg)
            if party is None or party not in rnd.waiting:
                log.warning("round %d: reply from an unexpected node %s ignored", rnd.round_idx,
                            msg.metadata.src_node_id)
                continue
            rnd.waiting.discard(party)
            if msg.has_error():
                rnd.stopped.add(party)
                rnd.client_errors[party] = f"client stopped: {msg.error.reason}"
                continue
            try:
                rec = read_stage(msg, sender=party)
                if (rec.stage, rec.round_idx, rec.party) != (rnd.stage, rnd.round_idx, party):
                    raise ProtocolError(f"reply is for stage {rec.stage!r} round {rec.round_idx} party {rec.party}, "
                                        f"expected {rnd.stage!r} round {rnd.round_idx}", sender=party)
                if rnd.stage == rnd.stages[0]:
                    m = metrics_of(msg.content)
                    if "train_loss" in m:
                        rnd.losses.append(m["train_loss"])
                data = self.transport.deliver(party, rnd.stage, rec.payload)
                if data is None:
                    rnd.stopped.add(party)
                    rnd.dropped[party] = rnd.stage
                    continue
                rnd.bytes_up += len(data)
                rnd.server.receive(party, data)
            except (ProtocolError, InvalidUpdateError) as exc:
                log.warning("round %d: rejected %s at %s: %s", rnd.round_idx, party, rnd.stage, exc)
                rnd.server.reject(party, exc)
                rnd.stopped.add(party)
                rnd.rejected[party] = f"{type(exc).__name__}: {exc}"
        for party in sorted(rnd.waiting):  # replies that never came
            rnd.stopped.add(party)
            rnd.dropped[party] = rnd.stage
        rnd.waiting = set()

    def _aggregate(self, rnd: _OpenRound) -> RoundOutput:
        try:
            revealed = rnd.server.revealed()
            out = aggregate(revealed, self.defense, self.layout, context=rnd.context, bytes_uploaded=rnd.bytes_up,
                            round_idx=rnd.round_idx, offered=len(rnd.cohort))
        except SecureFMLError as exc:  # ProtocolAbort, or the server half never finished
            return self._aborted(rnd, exc)
        return self._settle(rnd, out)

    def _aborted(self, rnd: _OpenRound, exc: SecureFMLError) -> RoundOutput:
        """The round revealed nothing: the model stays as it is (as in ``securefml.server``)."""
        log.warning("round %d aborted: %s", rnd.round_idx, exc)
        out = RoundOutput(torch.zeros(self.layout.numel), dict.fromkeys(self.layout.layer_names, 0.0), (),
                          extras={"aborted": f"{type(exc).__name__}: {exc}"}, bytes_uploaded=rnd.bytes_up)
        return self._settle(rnd, out)

    def _settle(self, rnd: _OpenRound, out: RoundOutput) -> RoundOutput:
        out.rejected = {**rnd.client_errors, **rnd.rejected, **out.rejected}
        out.extras.setdefault("dropped", dict(rnd.dropped))
        return out

    def _record(self, rnd: _OpenRound, out: RoundOutput) -> FlowerRound:
        return FlowerRound(
            round=rnd.round_idx,
            cohort=list(rnd.cohort),
            accepted=list(out.accepted),
            rejected=dict(out.rejected),
            dropped=dict(rnd.dropped),
            flagged=list(out.flagged),
            bytes_uploaded=rnd.bytes_up,
            bytes_downloaded=rnd.bytes_down,
            train_loss=float(sum(rnd.losses) / len(rnd.losses)) if rnd.losses else float("nan"),
            update_norm=float(out.aggregate.norm()),
            seconds=time.perf_counter() - rnd.started,
            stages=list(rnd.stages),
            extras=json_ready(out.extras),
            suspected=list(out.suspected),
        )


@dataclass
class _OpenRound:
    """The strategy's state within one round (between configure_train and aggregate_train)."""

    round_idx: int
    cohort: list[int]
    server: ServerHalf
    context: dict[str, Any]
    started: float
    stage: str = ""
    stages: list[str] = field(default_factory=list)
    waiting: set[int] = field(default_factory=set)
    stopped: set[int] = field(default_factory=set)
    dropped: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    client_errors: dict[int, str] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    finished: bool = False
