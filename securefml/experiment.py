"""Assemble a federated run from a config: the one code path behind ``securefml run`` and ``eval``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from securefml.attacks import Attack, make_attack
from securefml.bayes import LEARNERS  # the learner registry, with the Bayesian learners added
from securefml.client import Client
from securefml.data import load_dataset
from securefml.data.base import FederatedDataset
from securefml.defenses import (
    BYZANTINE_KEY,
    Defense,
    DetectionTracker,
    byzantine_budget,
    cumulative_detection,
    make_defense,
)
from securefml.errors import ConfigError
from securefml.meta import MetaConfig
from securefml.models import make_model
from securefml.personalize import personalize
from securefml.privacy import PrivacyConfig, setup_privacy
from securefml.protocols import PROTOCOLS, Transport
from securefml.registry import parse_spec
from securefml.selection import chunk_layout, make_selector
from securefml.server import RoundRecord, Server

__all__ = ["RunConfig", "RunResult", "run_experiment", "default_hyperparameters", "resolve_device",
           "prepare_out_dir"]


def resolve_device(spec: str | torch.device) -> torch.device:
    """The torch device named by ``spec``, checked usable *now*, before any work.

    A name torch does not know (``"tpu"``), a backend this build lacks (``"cuda"`` on a CPU
    build) or an index past the devices present all raise ``ConfigError`` with one line, instead
    of a traceback from deep inside the first round.  The check allocates an empty tensor there,
    which is what every backend needs anyway, so nothing here assumes CUDA.
    """
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {spec!r}: {_first_line(exc)}") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, AttributeError) as exc:
        raise ConfigError(f"device {spec!r} is not usable on this machine: {_first_line(exc)}") from None
    return device


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create the output folder and check it takes files, so a bad ``--out`` fails before the run.

    An existing *file*, a path under a file, or a folder that cannot be created or written raise
    ``ConfigError`` naming the path (results are otherwise lost at the end of a long run).
    """
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output path {str(path)!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".securefml-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write results to {str(path)!r}: {exc.strerror or exc}") from None
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

# (dataset kind, algorithm) -> inner_steps, inner_lr, outer_lr, server_opt, server_lr.
# Chosen on these machines with benchmarks/meta.py (same seed, same budget for every learner).
#: one budget for every second-order-style classification learner, so they compare at equal cost
_CLASSIFICATION_META: dict[str, Any] = dict(inner_steps=5, inner_lr=0.1, outer_lr=1.0, server_opt="adam",
                                            server_lr=0.005)

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
    ("classification", "maml"): _CLASSIFICATION_META,
    ("classification", "fomaml"): dict(inner_steps=2, inner_lr=0.2, outer_lr=1.0, server_opt="adam",
                                       server_lr=0.005),
    ("classification", "metasgd"): _CLASSIFICATION_META,
    # securefml.bayes: the same budget as Meta-SGD/MAML; pFedBayes' outer_lr is its step towards q
    ("classification", "metasgd-ts"): _CLASSIFICATION_META,
    ("classification", "metasgd-ts-cv"): _CLASSIFICATION_META,
    ("classification", "bayes-metasgd"): _CLASSIFICATION_META,
    ("classification", "bayes-maml"): _CLASSIFICATION_META,
    ("classification", "pfedbayes"): {**_CLASSIFICATION_META, "outer_lr": 0.5},
}

#: learners whose learned per-parameter rates are calibrated for their trained number of inner steps
_LEARNED_RATES = ("metasgd", "metasgd-ts", "metasgd-ts-cv", "bayes-metasgd")


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
    #: "inprocess" (``run_experiment``) or "flower" (``securefml.flower.engine.run``, the ``[flower]`` extra)
    engine: str = "inprocess"
    #: personalized score also after each of the last ``last_k`` rounds; their mean is reported
    #: beside the final one (``metrics["personalized_last_k"]``): one final evaluation is noisy
    last_k: int = 1

    def __post_init__(self) -> None:
        if self.rounds <= 0:
            raise ConfigError(f"rounds must be positive, got {self.rounds}")
        if self.engine not in ("inprocess", "flower"):
            raise ConfigError(f"engine must be 'inprocess' or 'flower', got {self.engine!r}")
        if self.clients_per_round <= 0:
            raise ConfigError(f"clients_per_round must be positive, got {self.clients_per_round}")
        if self.last_k <= 0:
            raise ConfigError(f"last_k must be a positive number of rounds, got {self.last_k}")
        resolve_device(self.device)
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
            if self.algorithm in _LEARNED_RATES:  # its learned rates are calibrated for this many steps
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
        target = prepare_out_dir(out_dir) / "result.json"
        target.write_text(self.to_json())
        target.chmod(0o644)
        return target


def _detection_scores(history: Sequence[RoundRecord], malicious_ids: Sequence[int],
                      ids_of: Callable[[RoundRecord], Sequence[int]], *, total_key: str) -> dict[str, Any]:
    """Per-round, overall and cumulative detection rates of one id set of the rounds' records
    (``flagged``: the defense's exclusions; ``suspected``: its detector's flags)."""
    tracker = DetectionTracker(tuple(malicious_ids))
    for r in history:
        tracker.update(r.round, flagged=ids_of(r), cohort_ids=r.accepted)
    overall = tracker.overall()
    cumulative = cumulative_detection(((r.round, r.accepted, ids_of(r)) for r in history), malicious_ids)
    return {"tpr": overall.tpr, "fpr": overall.fpr, total_key: overall.tp + overall.fp, **tracker.to_dict(),
            "cumulative": [{"round": i, **c.to_dict()} for i, c in cumulative]}


def _json_default(obj: object) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def _build_protocol(spec: str, seed: int) -> Any:
    name, _ = parse_spec(spec)
    return PROTOCOLS.build(spec, seed=seed) if PROTOCOLS.accepts(name, "seed") else PROTOCOLS.build(spec)


def _attacks(spec: str, given: Attack | None) -> list[Attack]:
    """The attack instances of ``spec`` (``"a+b"`` for several), or the user's own instance."""
    if given is not None:
        return [given]
    return [make_attack(part.strip()) for part in spec.split("+")]


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
    on_start: Callable[[], None] | None = None,
    model: Callable[[FederatedDataset], torch.nn.Module] | None = None,
) -> RunResult:
    """Run ``config.rounds`` rounds and evaluate personalization on the held-out clients.

    ``model(dataset)``, when given, builds the network instead of the bundled MLP (any
    ``nn.Module`` whose output fits the dataset's task: logits for classification, one value for
    regression; ``config.hidden`` is then ignored).  BatchNorm layers are run on batch
    statistics (``securefml.models.batchnorm_on_batch_statistics``).

    ``attack`` / ``defense`` instances, when given, are used instead of building
    ``config.attack`` / ``config.defense`` from their specs (users' own classes; the config
    fields then only label the run).  ``on_finish(server, data)`` is called after the last
    round; the mapping it returns is merged into ``metrics`` (e.g. a backdoor's success rate
    measured on the final model).  ``on_start()`` is called once everything is built and
    checked, right before the first round (the CLI starts its progress bar there).

    Everything a config can get wrong fails before the first round with a ``ConfigError``:
    unknown names and option names, an unusable device, and a cohort larger than the training
    clients.
    """
    if config.engine != "inprocess":
        raise ConfigError(f"engine {config.engine!r} runs through securefml.flower.engine.run, not run_experiment")
    started = time.perf_counter()
    attacks = _attacks(config.attack, attack) if config.malicious > 0 else []  # a bad spec fails before work
    data = dataset or load_dataset(config.dataset, seed=config.seed, **config.dataset_options)
    hp = config.resolved(data.kind)
    device = resolve_device(config.device)
    net = _user_model(model, data, config.seed, device) if model is not None else make_model(
        data, hidden=config.hidden, seed=config.seed, device=device)
    meta_cfg = MetaConfig(hp["inner_steps"], hp["inner_lr"], hp["outer_lr"], hp["outer_steps"])
    learner = LEARNERS.create(config.algorithm, model=net, config=meta_cfg)
    defense = defense if defense is not None else make_defense(config.defense)
    gen = torch.Generator().manual_seed(config.seed)
    train = list(data.train)
    needs_reference = bool(getattr(defense, "needs_reference", False))
    root = train.pop() if needs_reference else None  # the server's own clean data (FLTrust)
    if config.clients_per_round > len(data.train):
        raise ConfigError(
            f"clients_per_round={config.clients_per_round} but dataset {config.dataset!r} has only "
            f"{len(data.train)} training clients"
        )
    # a reference-based defense (FLTrust) takes one training client as the server's root set, so
    # "every client" then means every remaining one
    per_round = min(config.clients_per_round, len(train))
    pcfg = config.privacy_config()
    dim = sum(p.numel() for p in learner.init_params().values())
    protocol = _build_protocol(_dp_protocol_spec(config.protocol, pcfg, cohort=per_round, dim=dim), config.seed)
    selector = make_selector(config.select)
    priv = setup_privacy(
        pcfg, learner, n_train_clients=len(train), clients_per_round=per_round,
        rounds=config.rounds, dataset_kind=data.kind, algorithm_name=config.algorithm,
        local_dataset_size=min(t.n_samples for t in train), device=device,
        generator=torch.Generator().manual_seed(config.seed + 1), protocol=protocol, defense=defense,
        selector=selector, dim=dim,
    )
    hooks = [h for h in (update_hook, priv.update_hook) if h is not None]
    if config.aggregation != "mean":
        from securefml.relevance.experiment import build_relevance_server

        if hooks or priv.aggregate_hook is not None or config.select != "all":
            raise ConfigError("relevance aggregation runs without DP hooks and with --select all")
        server: Server = build_relevance_server(config.aggregation, priv.learner, protocol, defense, device=device)
    else:
        server = Server(
            priv.learner, protocol, defense, selector=selector, server_optimizer=hp["server_opt"],
            server_lr=hp["server_lr"], device=device, update_hook=_chain(hooks), aggregate_hook=priv.aggregate_hook,
            equal_weights=priv.equal_weights,
        )
        chunk_size = getattr(selector, "chunk_size", None)
        if callable(chunk_size):  # chunked selection: layers are split into chunks the protocols see as layers
            server.layout = chunk_layout(server.layout, chunk_size(server.layout.numel))
    n_mal = int(round(config.malicious * len(train)))
    mal_ids = set(torch.randperm(len(train), generator=gen)[:n_mal].tolist())
    attacks = attacks if n_mal else []
    # several attacks ("signflip+alie"): the malicious clients are dealt to them in turn, each
    # attack controls its own colluding group (securefml.adversary.Adversary)
    dealt = {cid: attacks[k % len(attacks)] for k, cid in enumerate(sorted(mal_ids))} if attacks else {}
    clients = [Client.build(t, attack=dealt.get(i), generator=gen) for i, t in enumerate(train)]
    malicious_ids = [c.client_id for c in clients if c.malicious]
    # rules built without f tolerate what a random cohort holds with 95% probability
    budget = byzantine_budget(n_mal / len(train), per_round, population=len(train)) if train else 0
    history: list[RoundRecord] = []
    steps = hp["finetune_steps"]
    last_k = min(config.last_k, config.rounds)
    last_scores: list[tuple[int, float]] = []  # (round, personalized score) before the final round
    probe_task = root if root is not None else (data.heldout[0] if data.heldout else train[0])
    stimulus = probe_task.support_x[:32].to(device)  # fixed inputs for behavioural detectors
    if on_start is not None:
        on_start()
    shift = getattr(data, "shift_round", None)  # digits-clusters: clients change task at that round
    for rnd in range(config.rounds):
        if shift is not None and rnd == shift:
            by_cid = {c.client_id: c for c in clients}
            for cid, task, _group in getattr(data, "shifted", ()):
                if cid in by_cid:
                    by_cid[cid].task = task
        cohort_idx = priv.sample_cohort(rnd, len(clients))  # user-level DP: Poisson, secret coins
        if cohort_idx is None:
            cohort_idx = torch.randperm(len(clients), generator=gen)[:per_round].tolist()
        if len(cohort_idx) < priv.min_cohort:  # SecAgg cannot sum fewer than 2: the round releases nothing
            cohort_idx = []
        cohort = [clients[i] for i in sorted(cohort_idx)]
        reference = None
        if root is not None:
            upd, _ = learner.update(server.params, root.to(device))
            reference = server.layout.flatten(upd)
        forward = _forward_fn(learner, server, stimulus)
        rec = server.run_round(rnd, cohort, transport=transport, generator=gen, reference=reference,
                               defense_context={"forward": forward, BYZANTINE_KEY: budget})
        epsilon = priv.end_round(rnd, accepted=rec.accepted)
        if epsilon is not None:
            rec.extras["epsilon"] = epsilon
        history.append(rec)
        if on_round is not None:
            on_round(rec)
        if config.rounds - last_k <= rnd < config.rounds - 1:  # the final round is scored below
            last_scores.append((rnd, personalize(learner, server.params, data.heldout, steps=steps,
                                                 device=device).mean))
    personalized = personalize(learner, server.params, data.heldout, steps=steps, device=device)
    last_scores.append((config.rounds - 1, personalized.mean))
    global_only = personalize(learner, server.params, data.heldout, steps=0, device=device)
    metrics = {
        "personalized": personalized.to_dict(),
        "global": global_only.to_dict(),
        "personalized_last_k": {
            "k": last_k, "metric": personalized.metric, "mean": sum(v for _, v in last_scores) / len(last_scores),
            "rounds": [r for r, _ in last_scores], "values": [v for _, v in last_scores],
        },
        "bytes_uploaded": int(sum(r.bytes_uploaded for r in history)),
        "rounds": config.rounds,
        "wall_seconds": time.perf_counter() - started,
        "rejected": int(sum(len(r.rejected) for r in history)),
        "detection": {
            "malicious_ids": malicious_ids,
            **_detection_scores(history, malicious_ids, lambda r: r.flagged, total_key="flagged_total"),
            # the same counts on the detector's flags (RoundRecord.suspected), before the
            # exclusion cap; all zero for a rule without a detector
            "detector": _detection_scores(history, malicious_ids, lambda r: r.suspected, total_key="suspected_total"),
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


def _user_model(
    factory: Callable[[FederatedDataset], torch.nn.Module], data: FederatedDataset, seed: int, device: torch.device
) -> torch.nn.Module:
    torch.manual_seed(seed)  # the factory's initialization is reproducible from the run's seed
    net = factory(data)
    if not isinstance(net, torch.nn.Module):
        raise ConfigError(f"the model factory returned {type(net).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in net.parameters()):
        raise ConfigError("the model factory returned a module without trainable parameters")
    return net.to(device)


def _dp_protocol_spec(spec: str, pcfg: PrivacyConfig, *, cohort: int, dim: int) -> str:
    """Distributed DP over SecAgg: add the ``clip_range`` that leaves room for the integer noise, unless given."""
    name, kwargs = parse_spec(spec)
    if pcfg.mode != "user" or pcfg.placement != "distributed" or name != "secagg" or "clip_range" in kwargs:
        return spec
    from securefml.privacy.distributed import secagg_clip_range  # imports Opacus: only under DP

    value = secagg_clip_range(clip=pcfg.clip, cohort=max(2, cohort), dim=dim)
    return spec + ("," if ":" in spec else ":") + f"clip_range={value!r}"


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
