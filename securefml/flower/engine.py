"""``securefml run --engine flower``: the same experiment through ``flwr.simulation.run_simulation``.

The ServerApp runs ``SecureStrategy`` with the run's protocol and defense; every client of the
dataset (training clients, then held-out clients) is one SuperNode running
``meta_client_app``.  The cohort of each round is drawn exactly as ``run_experiment`` draws it
(the same ``torch.Generator`` seeded with the run's seed: the malicious ids first, then one
``randperm`` per round), the server optimizer takes the same step, and the defense context
carries the same Byzantine budget and behavioural ``forward``; so with a deterministic attack
the two engines train the same model up to float rounding and quantization error (the interop
test compares them).  What differs on Flower: a malicious node attacks alone (no colluding
group: ``AttackContext.n_malicious == 1``), poisons its data with its own generator, and the
personalization report has no out-of-task AUROC (one node does not see other nodes' inputs).

The simulation runtime of Flower 1.42 is Ray: the backend is given one actor that takes every
CPU, so each node's ClientApp (and the client half it keeps between protocol stages) stays in
one process.  ``result.json`` has the in-process keys plus ``config.engine == "flower"``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from securefml.attacks import Attack
from securefml.defenses import BYZANTINE_KEY, Defense, DetectionTracker, byzantine_budget, make_defense
from securefml.errors import ConfigError
from securefml.experiment import RunConfig, RunResult, _build_protocol, resolve_device
from securefml.flower.ckks_parties import CKKSDeployment
from securefml.flower.meta_app import MetaAppConfig, MetaNode, meta_client_app
from securefml.flower.provision import provision_in_subprocess
from securefml.flower.records import GLOBAL_KEY, write_vector
from securefml.flower.strategy import SecureStrategy, StrategyConfig
from securefml.protocols.base import AggregationProtocol
from securefml.protocols.ckks_params import KEY_HOLDER_PARTY
from securefml.registry import parse_spec
from securefml.rounds import Transport

__all__ = ["run", "prepare", "FlowerRun", "backend_config"]

log = logging.getLogger(__name__)


def backend_config(cpus: int | None = None) -> dict[str, Any]:
    """Ray settings for ``run_simulation``: one actor with every CPU, quiet, no dashboard."""
    n = int(cpus or os.cpu_count() or 1)
    return {"client_resources": {"num_cpus": n, "num_gpus": 0.0},
            "init_args": {"num_cpus": n, "include_dashboard": False, "logging_level": logging.ERROR,
                          "log_to_driver": False}}


def _check_supported(config: RunConfig, defense: Defense) -> None:
    """Refuse, before Ray starts, what the Flower engine does not run yet (named, with why)."""
    if config.privacy_config().mode != "none":
        raise ConfigError("--engine flower does not wire differential privacy yet; use the in-process engine")
    if config.aggregation != "mean" or config.architectures is not None:
        raise ConfigError("--engine flower runs one global aggregate (aggregation=mean, no architectures)")
    if config.select != "all":
        raise ConfigError("--engine flower uploads every layer for now (--select all)")
    if getattr(defense, "needs_reference", False):
        raise ConfigError(f"defense {config.defense!r} needs the server's reference update, not wired to Flower yet")
    if getattr(config, "engine", "flower") not in ("flower", "inprocess"):
        raise ConfigError(f"unknown engine {config.engine!r}")


@dataclass
class FlowerRun:
    """A prepared Flower run: the strategy, the ClientApp, how many SuperNodes, and the result builder."""

    strategy: SecureStrategy
    client_app: ClientApp
    num_supernodes: int
    node_config: dict[int, dict[str, int]]
    initial: torch.Tensor
    finish: Callable[[float], RunResult]
    #: a key directory this run provisioned itself (a temporary one), removed by ``close``
    owned_keys: str | None = None

    def close(self) -> None:
        """Remove the temporary CKKS key set this run provisioned (no secret key is left on disk)."""
        if self.owned_keys is not None:
            shutil.rmtree(self.owned_keys, ignore_errors=True)
            self.owned_keys = None

    def initial_as_arrays(self) -> ArrayRecord:
        """The initial global vector as the ``ArrayRecord`` Flower's ``Strategy.start`` takes."""
        return write_vector(RecordDict(), GLOBAL_KEY, self.initial).array_records[GLOBAL_KEY]

    def server_app(self, rounds: int, timeout: float) -> ServerApp:
        """The ServerApp that runs ``strategy`` for ``rounds`` rounds."""
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            self.strategy.start(grid=grid, initial_arrays=self.initial_as_arrays(), num_rounds=rounds, timeout=timeout)

        return app


def prepare(
    config: RunConfig,
    *,
    protocol: AggregationProtocol | None = None,
    defense: Defense | None = None,
    attack: Attack | None = None,
    transport: Transport | None = None,
    timeout: float = 600.0,
    keys: str | Path | None = None,
) -> FlowerRun:
    """Build everything ``run`` runs (also driven by ``LocalGrid`` in fast tests); see ``run``."""
    resolve_device(config.device)
    defense = defense if defense is not None else make_defense(config.defense)
    _check_supported(config, defense)
    options = tuple(sorted(config.dataset_options.items()))
    data = MetaNode(MetaAppConfig(dataset=config.dataset, dataset_options=options, seed=config.seed,
                                  algorithm=config.algorithm, device=config.device)).data
    hp = config.resolved(data.kind)
    n_train = len(data.train)
    if config.clients_per_round > n_train:
        raise ConfigError(f"clients_per_round={config.clients_per_round} but dataset {config.dataset!r} has only "
                          f"{n_train} training clients")
    gen = torch.Generator().manual_seed(config.seed)  # consumed in run_experiment's order
    n_mal = int(round(config.malicious * n_train))
    mal_ids = tuple(sorted(data.train[i].client_id for i in torch.randperm(n_train, generator=gen)[:n_mal].tolist()))
    app_cfg = MetaAppConfig(
        dataset=config.dataset, dataset_options=options, seed=config.seed,
        algorithm=config.algorithm, inner_steps=int(hp["inner_steps"]), inner_lr=float(hp["inner_lr"]),
        outer_lr=float(hp["outer_lr"]), outer_steps=int(hp["outer_steps"]), finetune_steps=int(hp["finetune_steps"]),
        hidden=config.hidden, attack=config.attack if n_mal else "none", malicious=mal_ids, device=config.device,
    )
    node = MetaNode(app_cfg, attack if n_mal else None)
    nodes = n_train + len(data.heldout)
    ckks = None
    if protocol is None and parse_spec(config.protocol)[0] == "ckks":
        ckks = provisioned_ckks(config.protocol, [t.client_id for t in data.train], keys=keys,
                                key_holder_partition=nodes)
        log.info("CKKS keys provisioned in %s for %d clients", ckks.directory, len(data.train))
    proto = ckks.server_protocol() if ckks is not None else (
        protocol if protocol is not None else _build_protocol(config.protocol, config.seed))
    proto.check_defense(defense)
    per_round = config.clients_per_round
    train_ids = [t.client_id for t in data.train]
    heldout_ids = [t.client_id for t in data.heldout]
    budget = byzantine_budget(n_mal / n_train, per_round, population=n_train) if n_train else 0
    probe_task = data.heldout[0] if data.heldout else data.train[0]
    stimulus = probe_task.support_x[:32].to(node.device)
    layout = node.layout
    top = max(float(t.support_x.shape[0]) for t in data.train)
    max_weight = 2.0 ** math.ceil(math.log2(top)) if top > 0 else 1.0

    def cohort_fn(round_idx: int, _announced: Sequence[int]) -> list[int]:
        return sorted(train_ids[i] for i in torch.randperm(n_train, generator=gen)[:per_round].tolist())

    def context_fn(round_idx: int, vector: torch.Tensor) -> dict[str, Any]:
        def forward(v: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return node.learner.forward(layout.unflatten(v.to(node.device)), stimulus)

        return {"forward": forward, BYZANTINE_KEY: budget, "generator": gen, "layers": tuple(layout.layer_names)}

    def evaluate_fn(round_idx: int, _announced: Sequence[int]) -> list[int]:
        return list(heldout_ids) if round_idx == config.rounds - 1 else []

    initial = layout.flatten(node.learner.init_params(node.device)).detach().cpu()
    services = {KEY_HOLDER_PARTY: KEY_HOLDER_PARTY} if ckks is not None else {}
    strategy = SecureStrategy(
        proto, defense, layout, initial,
        config=StrategyConfig(clients_per_round=per_round, min_nodes=nodes + len(services),
                              server_opt=str(hp["server_opt"]),
                              server_lr=float(hp["server_lr"]), timeout=timeout, max_weight=max_weight,
                              seed=config.seed),
        cohort_fn=cohort_fn, context_fn=context_fn, transport=transport, evaluate_fn=evaluate_fn,
        service_nodes=services,
    )
    client_app = meta_client_app(app_cfg, ckks if ckks is not None else proto, attack=attack if n_mal else None,
                                 services=ckks)

    def finish(wall: float) -> RunResult:
        if len(strategy.history) != config.rounds:
            raise ConfigError(f"the Flower run finished {len(strategy.history)} of {config.rounds} rounds "
                              "(see Flower's log for why)")
        return _result(config, hp, strategy, heldout_ids, mal_ids, app_cfg.finetune_steps, data.kind, wall)

    total = nodes + len(services)  # the key holder's SuperNode comes last (partition id ``nodes``)
    return FlowerRun(strategy, client_app, total, {p: {"partition-id": p} for p in range(total)}, initial, finish,
                     owned_keys=ckks.directory if ckks is not None and keys is None else None)


def provisioned_ckks(spec: str, clients: Sequence[int], *, keys: str | Path | None = None,
                     key_holder_partition: int | None = None) -> CKKSDeployment:
    """Provision ``spec``'s CKKS keys in a separate process and return the deployment that reads them.

    ``keys`` is the directory to write (default: a fresh temporary one).  The options of
    ``ckks:...`` the Flower engine takes are ``preset`` and ``min_contributors``; others are
    refused by name (the key holder's policy is fixed at provisioning).
    """
    _, options = parse_spec(spec)
    unknown = sorted(set(options) - {"preset", "min_contributors"})
    if unknown:
        raise ConfigError(f"--engine flower takes ckks options preset and min_contributors, not {unknown}")
    where = Path(keys) if keys is not None else Path(tempfile.mkdtemp(prefix="securefml-ckks-"))
    provision_in_subprocess(where, clients, preset=str(options.get("preset", "stats")),
                            min_contributors=int(options.get("min_contributors", 2)))  # type: ignore[call-overload]
    return CKKSDeployment(str(where), key_holder_partition=key_holder_partition)


def run(
    config: RunConfig,
    *,
    protocol: AggregationProtocol | None = None,
    defense: Defense | None = None,
    attack: Attack | None = None,
    transport: Transport | None = None,
    backend: Mapping[str, Any] | None = None,
    timeout: float = 600.0,
    keys: str | Path | None = None,
) -> RunResult:
    """Run ``config`` on Flower's simulation runtime and return the same ``RunResult`` as in-process.

    Parameters
    ----------
    config:
        The run (``RunConfig``; ``config.engine`` is recorded as ``"flower"``).
    protocol, defense, attack:
        Instances to use instead of building ``config.protocol`` / ``defense`` / ``attack``.
    transport:
        Server-side fault injection on every reply (``None`` from it = a dropout).
    backend:
        ``run_simulation`` backend config (default: ``backend_config()``).
    timeout:
        Seconds to wait for one stage's replies.
    keys:
        Where to provision a CKKS run's keys (default: a fresh temporary directory).

    Raises
    ------
    ConfigError
        For a setting this engine does not run (privacy, relevance, selection, FLTrust) or a
        cohort larger than the training clients; before anything starts.
    """
    started = time.perf_counter()
    prepared = prepare(config, protocol=protocol, defense=defense, attack=attack, transport=transport, timeout=timeout,
                       keys=keys)
    try:
        run_simulation(server_app=prepared.server_app(config.rounds, timeout), client_app=prepared.client_app,
                       num_supernodes=prepared.num_supernodes, backend_config=dict(backend or backend_config()))
        return prepared.finish(time.perf_counter() - started)
    finally:
        prepared.close()


def _report(per_client: Mapping[int, Mapping[str, float]], ids: Sequence[int], prefix: str, metric: str,
            steps: int) -> dict[str, Any]:
    scores = [per_client[c][prefix] for c in ids if c in per_client and prefix in per_client[c]]
    values = torch.tensor(scores, dtype=torch.float64)
    out: dict[str, Any] = {
        "metric": metric,
        metric: float(values.mean()) if scores else float("nan"),
        "std": float(values.std(unbiased=False)) if len(scores) > 1 else 0.0,
        "per_client": scores,
        "steps": steps,
    }
    if metric == "accuracy":
        for name in ("ece", "ece_adaptive", "nll", "brier", "selective_accuracy", "ood_auroc"):
            got = [per_client[c][f"{prefix}.{name}"] for c in ids if f"{prefix}.{name}" in per_client.get(c, {})]
            out[name] = float(sum(got) / len(got)) if got else None
    return out


def _result(config: RunConfig, hp: Mapping[str, Any], strategy: SecureStrategy, heldout: Sequence[int],
            malicious: Sequence[int], steps: int, kind: str, wall: float) -> RunResult:
    metric = "accuracy" if kind == "classification" else "mse"
    evals = strategy.evaluations.get(config.rounds - 1, {})
    tracker = DetectionTracker(tuple(malicious))
    by_detector = DetectionTracker(tuple(malicious))  # on the detector's flags, before the exclusion cap
    history = []
    for rec in strategy.history:
        tracker.update(rec.round, flagged=rec.flagged, cohort_ids=rec.accepted)
        by_detector.update(rec.round, flagged=rec.suspected, cohort_ids=rec.accepted)
        entry = asdict(rec)
        entry["malicious"] = [c for c in rec.cohort if c in set(malicious)]
        history.append(entry)
    overall = tracker.overall()
    metrics = {
        "personalized": _report(evals, heldout, "personalized", metric, steps),
        "global": _report(evals, heldout, "global", metric, 0),
        "bytes_uploaded": int(sum(r.bytes_uploaded for r in strategy.history)),
        "rounds": config.rounds,
        "wall_seconds": wall,
        "rejected": int(sum(len(r.rejected) for r in strategy.history)),
        "dropped": int(sum(len(r.dropped) for r in strategy.history)),
        "detection": {"malicious_ids": list(malicious), "tpr": overall.tpr, "fpr": overall.fpr,
                      "flagged_total": overall.tp + overall.fp, **tracker.to_dict(),
                      "detector": {"tpr": by_detector.overall().tpr, "fpr": by_detector.overall().fpr,
                                   "suspected_total": by_detector.overall().tp + by_detector.overall().fp,
                                   **by_detector.to_dict()}},
    }
    cfg = asdict(config)
    cfg["engine"] = "flower"
    cfg["resolved"] = dict(hp)
    return RunResult(cfg, metrics, history)
