"""Assemble a federated run from a config: the one code path behind ``securefml run`` and ``eval``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from securefml.attacks import Attack, make_attack
from securefml.client import Client
from securefml.data import load_dataset
from securefml.data.base import FederatedDataset
from securefml.defenses import Defense, DetectionTracker, make_defense
from securefml.errors import ConfigError
from securefml.meta import LEARNERS, MetaConfig
from securefml.models import make_model
from securefml.personalize import personalize
from securefml.privacy import PrivacyConfig, setup_privacy
from securefml.protocols import PROTOCOLS, Transport
from securefml.registry import parse_spec
from securefml.selection import make_selector
from securefml.server import RoundRecord, Server

__all__ = ["RunConfig", "RunResult", "run_experiment", "default_hyperparameters"]

# (dataset kind, algorithm) -> inner_steps, inner_lr, outer_lr, server_opt, server_lr.
# Chosen on these machines with benchmarks/meta.py (same seed, same budget for every learner).
_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("regression", "fedavg"): dict(inner_steps=5, inner_lr=0.02, server_opt="adam", server_lr=0.005),
    ("regression", "reptile"): dict(inner_steps=10, inner_lr=0.02, server_opt="adam", server_lr=0.005),
    ("regression", "maml"): dict(inner_steps=5, inner_lr=0.02, outer_lr=1.0, server_opt="adam", server_lr=0.005),
    ("regression", "fomaml"): dict(inner_steps=5, inner_lr=0.02, outer_lr=1.0, server_opt="adam", server_lr=0.005),
    # one learned step, as Li et al. do for regression: with 5 the learned rates grow until some
    # large-amplitude tasks overflow in the inner loop
    ("regression", "metasgd"): dict(inner_steps=1, inner_lr=0.01, outer_lr=1.0, server_opt="adam", server_lr=0.005),
    ("classification", "fedavg"): dict(inner_steps=5, inner_lr=0.1, server_opt="adam", server_lr=0.005),
    ("classification", "reptile"): dict(inner_steps=10, inner_lr=0.1, server_opt="adam", server_lr=0.005),
    ("classification", "maml"): dict(inner_steps=5, inner_lr=0.1, outer_lr=1.0, server_opt="adam", server_lr=0.005),
    ("classification", "fomaml"): dict(inner_steps=2, inner_lr=0.2, outer_lr=1.0, server_opt="adam",
                                       server_lr=0.005),
    ("classification", "metasgd"): dict(inner_steps=5, inner_lr=0.1, outer_lr=1.0, server_opt="adam",
                                        server_lr=0.005),
}


def default_hyperparameters(kind: str, algorithm: str) -> dict[str, Any]:
    base = dict(inner_steps=5, inner_lr=0.01, outer_lr=1.0, outer_steps=1, server_opt="adam", server_lr=0.005)
    return {**base, **_DEFAULTS.get((kind, algorithm), {})}


@dataclass
class RunConfig:
    """Every knob of a run.  ``None`` means "the default for this dataset and algorithm"."""

    dataset: str = "digits-fewshot"
    algorithm: str = "fomaml"
    rounds: int = 30
    clients_per_round: int = 10
    seed: int = 0
    device: str = "cpu"
    inner_steps: int | None = None
    inner_lr: float | None = None
    outer_lr: float | None = None
    outer_steps: int | None = None
    server_opt: str | None = None
    server_lr: float | None = None
    finetune_steps: int | None = None
    protocol: str = "plaintext"
    select: str = "all"
    defense: str = "mean"
    attack: str = "none"
    malicious: float = 0.0
    dataset_options: dict[str, Any] = field(default_factory=dict)
    hidden: tuple[int, ...] | None = None
    privacy: dict[str, Any] = field(default_factory=dict)
    #: "mean" (one global aggregate) or "relevance[:k=v,...]" (one aggregate per client)
    aggregation: str = "mean"
    #: heterogeneous Co-LoRA federation over these MLP shapes ("32,64,64x64"), or None
    architectures: str | None = None

    def __post_init__(self) -> None:
        if self.rounds <= 0:
            raise ConfigError(f"rounds must be positive, got {self.rounds}")
        if self.clients_per_round <= 0:
            raise ConfigError(f"clients_per_round must be positive, got {self.clients_per_round}")
        if not 0 <= self.malicious < 1:
            raise ConfigError(f"malicious must be a fraction in [0, 1), got {self.malicious}")
        if self.algorithm not in LEARNERS:
            LEARNERS.get(self.algorithm)  # raises ConfigError listing the valid names
        if self.attack != "none" and self.malicious == 0:
            raise ConfigError("an attack needs malicious clients: set --malicious to a fraction > 0")
        self.privacy_config()  # validate early
        if self.aggregation != "mean":
            from securefml.relevance.experiment import parse_relevance_spec

            parse_relevance_spec(self.aggregation)  # validate early

    def privacy_config(self) -> PrivacyConfig:
        """The DP settings (``privacy`` holds ``PrivacyConfig`` keyword arguments)."""
        return PrivacyConfig(**self.privacy)

    def resolved(self, kind: str) -> dict[str, Any]:
        """Hyper-parameters with the defaults filled in for a dataset of ``kind``."""
        d = default_hyperparameters(kind, self.algorithm)
        for key in list(d):
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        d.setdefault("finetune_steps", None)
        if self.finetune_steps is not None:
            d["finetune_steps"] = self.finetune_steps
        if d["finetune_steps"] is None:
            if self.algorithm == "metasgd":  # its learned rates are calibrated for this many steps
                d["finetune_steps"] = int(d["inner_steps"])
            else:
                d["finetune_steps"] = max(10 if kind == "regression" else 5, int(d["inner_steps"]))
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}")
        return cls(**data)


@dataclass
class RunResult:
    config: dict[str, Any]
    metrics: dict[str, Any]
    history: list[dict[str, Any]]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=_json_default)

    def save(self, out_dir: str | Path) -> Path:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        target = path / "result.json"
        target.write_text(self.to_json())
        return target


def _json_default(obj: object) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def _build_protocol(spec: str, seed: int) -> Any:
    name, kwargs = parse_spec(spec)
    if "_" in kwargs:
        raise ConfigError(f"protocol {name!r} takes keyword options only (name:key=value)")
    factory = PROTOCOLS.get(name)
    try:
        return factory(**kwargs, seed=seed)
    except TypeError:
        return PROTOCOLS.create(name, **kwargs)


def run_experiment(
    config: RunConfig,
    *,
    dataset: FederatedDataset | None = None,
    transport: Transport | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    update_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    attack: Attack | None = None,
    defense: Defense | None = None,
    on_finish: Callable[[Server, FederatedDataset], Mapping[str, Any] | None] | None = None,
) -> RunResult:
    """Run ``config.rounds`` rounds and evaluate personalization on the held-out clients.

    ``attack`` / ``defense`` instances, when given, are used instead of building
    ``config.attack`` / ``config.defense`` from their specs (users' own classes; the config
    fields then only label the run).  ``on_finish(server, data)`` is called after the last
    round; the mapping it returns is merged into ``metrics`` (e.g. a backdoor's success rate
    measured on the final model).
    """
    started = time.perf_counter()
    data = dataset or load_dataset(config.dataset, seed=config.seed, **config.dataset_options)
    hp = config.resolved(data.kind)
    device = torch.device(config.device)
    model = make_model(data, hidden=config.hidden, seed=config.seed, device=device)
    meta_cfg = MetaConfig(hp["inner_steps"], hp["inner_lr"], hp["outer_lr"], hp["outer_steps"])
    learner = LEARNERS.create(config.algorithm, model=model, config=meta_cfg)
    defense = defense if defense is not None else make_defense(config.defense)
    protocol = _build_protocol(config.protocol, config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    train = list(data.train)
    needs_reference = bool(getattr(defense, "needs_reference", False))
    root = train.pop() if needs_reference else None  # the server's own clean data (FLTrust)
    per_round = min(config.clients_per_round, len(train))
    priv = setup_privacy(
        config.privacy_config(), learner, n_train_clients=len(train), clients_per_round=per_round,
        rounds=config.rounds, dataset_kind=data.kind, algorithm_name=config.algorithm,
        local_dataset_size=min(t.n_samples for t in train), device=device,
        generator=torch.Generator().manual_seed(config.seed + 1),
    )
    hooks = [h for h in (update_hook, priv.update_hook) if h is not None]
    if config.aggregation != "mean":
        from securefml.relevance.experiment import build_relevance_server

        if hooks or priv.aggregate_hook is not None or config.select != "all":
            raise ConfigError("relevance aggregation runs without DP hooks and with --select all")
        server: Server = build_relevance_server(config.aggregation, priv.learner, protocol, defense, device=device)
    else:
        server = Server(
            priv.learner, protocol, defense, selector=make_selector(config.select), server_optimizer=hp["server_opt"],
            server_lr=hp["server_lr"], device=device, update_hook=_chain(hooks), aggregate_hook=priv.aggregate_hook,
        )
    n_mal = int(round(config.malicious * len(train)))
    mal_ids = set(torch.randperm(len(train), generator=gen)[:n_mal].tolist())
    attack = (attack if attack is not None else make_attack(config.attack)) if n_mal else None
    clients = [Client.build(t, attack=attack if i in mal_ids else None, generator=gen) for i, t in enumerate(train)]
    malicious_ids = [c.client_id for c in clients if c.malicious]
    history: list[RoundRecord] = []
    probe_task = root if root is not None else (data.heldout[0] if data.heldout else train[0])
    stimulus = probe_task.support_x[:32].to(device)  # fixed inputs for behavioural detectors
    shift = getattr(data, "shift_round", None)  # digits-clusters: clients change task at that round
    for rnd in range(config.rounds):
        if shift is not None and rnd == shift:
            by_cid = {c.client_id: c for c in clients}
            for cid, task, _group in getattr(data, "shifted", ()):
                if cid in by_cid:
                    by_cid[cid].task = task
        cohort_idx = torch.randperm(len(clients), generator=gen)[:per_round].tolist()
        cohort = [clients[i] for i in sorted(cohort_idx)]
        reference = None
        if root is not None:
            upd, _ = learner.update(server.params, root.to(device))
            reference = server.layout.flatten(upd)
        forward = _forward_fn(learner, server, stimulus)
        rec = server.run_round(rnd, cohort, transport=transport, generator=gen, reference=reference,
                               defense_context={"forward": forward})
        epsilon = priv.end_round(rnd)
        if epsilon is not None:
            rec.extras["epsilon"] = epsilon
        history.append(rec)
        if on_round is not None:
            on_round(rec)
    steps = hp["finetune_steps"]
    personalized = personalize(learner, server.params, data.heldout, steps=steps, device=device)
    global_only = personalize(learner, server.params, data.heldout, steps=0, device=device)
    tracker = DetectionTracker(tuple(malicious_ids))
    for r in history:
        tracker.update(r.round, flagged=r.flagged, cohort_ids=r.accepted)
    overall = tracker.overall()
    metrics = {
        "personalized": personalized.to_dict(),
        "global": global_only.to_dict(),
        "bytes_uploaded": int(sum(r.bytes_uploaded for r in history)),
        "rounds": config.rounds,
        "wall_seconds": time.perf_counter() - started,
        "rejected": int(sum(len(r.rejected) for r in history)),
        "detection": {
            "malicious_ids": malicious_ids,
            "tpr": overall.tpr,
            "fpr": overall.fpr,
            "flagged_total": overall.tp + overall.fp,
            **tracker.to_dict(),
        },
    }
    if config.aggregation != "mean" or config.architectures is not None or bool(getattr(data, "heldout_groups", None)):
        from securefml.relevance.experiment import heterogeneous_metrics, per_group, relevance_metrics
        from securefml.relevance.server import RelevanceServer

        groups = per_group(data, personalized.per_client)
        if groups is not None:
            metrics["personalized"] = {**personalized.to_dict(), "per_group": groups}
        if isinstance(server, RelevanceServer):
            metrics["relevance"] = relevance_metrics(server, data, steps=steps)
        if config.architectures is not None:
            metrics["heterogeneous"] = heterogeneous_metrics(
                data, config.architectures, rounds=config.rounds, clients_per_round=per_round,
                local_steps=hp["inner_steps"], lr=hp["inner_lr"], finetune_steps=steps, seed=config.seed,
                dataset_options=dict(config.dataset_options), device=device)
    if on_finish is not None:
        metrics.update(on_finish(server, data) or {})
    if config.privacy_config().mode != "none":
        metrics["privacy"] = priv.report()
    cfg = asdict(config)
    cfg["resolved"] = hp
    return RunResult(cfg, metrics, [asdict(r) for r in history])


def _chain(
    hooks: list[Callable[[int, torch.Tensor], torch.Tensor]],
) -> Callable[[int, torch.Tensor], torch.Tensor] | None:
    if not hooks:
        return None

    def chained(client_id: int, update: torch.Tensor) -> torch.Tensor:
        for hook in hooks:
            update = hook(client_id, update)
        return update

    return chained


def _forward_fn(learner: Any, server: Server, stimulus: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Model outputs on a fixed stimulus batch for a full flat parameter vector (behavioural detectors)."""

    def forward(vector: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return learner.forward(server.layout.unflatten(vector.to(server.device)), stimulus)

    return forward
