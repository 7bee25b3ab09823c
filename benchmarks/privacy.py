"""Utility of record-level and user-level DP, and the cost of record-level DP on the clients.

Runs FOMAML (the learner every DP mode fully covers) on ``digits-fewshot`` (personalized accuracy)
and ``sine`` (personalized MSE) at target epsilon in {1, 3, 8, inf} for record-level DP, user-level
DP with central Gaussian noise (plaintext protocol) and user-level DP with distributed Skellam
noise inside SecAgg (``user-distributed``), plus the non-private run, all with the same seed and
budget of rounds.  ``inf`` keeps the clipping but adds no noise, separating the cost of clipping
from that of noise.  User-level runs sample Poisson cohorts with secret coins (as the accountant
assumes), give every client weight 1, release ``(sum + noise) / (q N)``, and report the epsilon
actually spent (central: against model observers, with amplification by sampling; distributed:
the largest per-client epsilon against the server, without amplification).

Client time: ``client_time`` is the median seconds per client step, non-private vs DP, measured
interleaved on the same tasks after a warm-up (the figure to quote); each run also reports its
summed client-step time as a ratio to the non-private run (noisier: different cohorts and
budget-exhausted clients).  Accounting time (epsilon once per round) is reported separately.

Prints JSON and writes ``results/privacy/privacy.png`` and ``privacy.json``.

Usage: ``python benchmarks/privacy.py [--rounds 20] [--clients-per-round 10] [--modes record user
user-distributed] [--datasets digits-fewshot sine] [--out results/privacy]``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from securefml.client import Client
from securefml.data import load_dataset
from securefml.defenses import make_defense
from securefml.experiment import default_hyperparameters
from securefml.meta import LEARNERS, MetaConfig, MetaLearner
from securefml.models import make_model
from securefml.personalize import personalize
from securefml.privacy import PrivacyConfig, secagg_clip_range, setup_privacy
from securefml.protocols import PROTOCOLS, SecAggPlus
from securefml.server import Server

EPSILONS = (1.0, 3.0, 8.0, math.inf)


class _Timed:
    """Sums the wall time of a learner's client step (``update``)."""

    def __init__(self, learner: MetaLearner) -> None:
        self.learner = learner
        self.seconds = 0.0
        original = learner.update

        def timed(params: Any, task: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(params, task)
            finally:
                self.seconds += time.perf_counter() - start

        learner.update = timed  # type: ignore[method-assign]


def run_private(dataset: str, algorithm: str, privacy: PrivacyConfig, *, rounds: int, clients_per_round: int,
                seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """A small federated run through ``Server`` with the privacy seam plugged in.

    Distributed user-level DP runs over SecAgg (its ``clip_range`` from ``secagg_clip_range``);
    every other run over the plaintext protocol.
    """
    data = load_dataset(dataset, seed=seed)
    hp = default_hyperparameters(data.kind, algorithm)
    model = make_model(data, seed=seed, device=device)
    learner = LEARNERS.create(algorithm, model=model,
                              config=MetaConfig(hp["inner_steps"], hp["inner_lr"], hp["outer_lr"], hp["outer_steps"]))
    gen = torch.Generator().manual_seed(seed)
    train = list(data.train)
    local = min(len(t.support_y) + len(t.query_y) for t in train)
    dim = sum(p.numel() for p in learner.init_params().values())
    if privacy.mode == "user" and privacy.placement == "distributed":
        protocol: Any = SecAggPlus(clip_range=secagg_clip_range(clip=privacy.clip, cohort=clients_per_round, dim=dim))
    else:
        protocol = PROTOCOLS.create("plaintext")
    defense = make_defense("mean")
    setup = setup_privacy(privacy, learner, n_train_clients=len(train), clients_per_round=clients_per_round,
                          rounds=rounds, dataset_kind=data.kind, algorithm_name=algorithm, local_dataset_size=local,
                          device=device, generator=torch.Generator().manual_seed(seed + 1), protocol=protocol,
                          defense=defense, dim=dim)
    timer = _Timed(setup.learner)
    server = Server(setup.learner, protocol, defense, server_optimizer=hp["server_opt"], server_lr=hp["server_lr"],
                    device=device, update_hook=setup.update_hook, aggregate_hook=setup.aggregate_hook,
                    equal_weights=setup.equal_weights)
    clients = [Client.build(t) for t in train]
    accounting = 0.0
    rejected = 0
    cohort_sizes = []
    for rnd in range(rounds):
        idx = setup.sample_cohort(rnd, len(clients))  # user level: Poisson with secret coins
        if idx is None:
            idx = torch.randperm(len(clients), generator=gen)[:clients_per_round].tolist()
        if len(idx) < setup.min_cohort:
            idx = []
        cohort_sizes.append(len(idx))
        rec = server.run_round(rnd, [clients[i] for i in sorted(idx)], generator=gen)
        rejected += len(rec.rejected)
        start = time.perf_counter()
        setup.end_round(rnd, accepted=rec.accepted)
        accounting += time.perf_counter() - start
    steps = max(10, hp["inner_steps"]) if data.kind == "regression" else max(5, hp["inner_steps"])
    report = personalize(setup.learner, server.params, data.heldout, steps=steps, device=device)
    floor = personalize(setup.learner, setup.learner.init_params(device), data.heldout, steps=steps, device=device)
    priv = setup.report()
    return {
        "metric": report.metric,
        "score": report.to_dict()[report.metric],
        "untrained_score": floor.to_dict()[floor.metric],
        "client_seconds": timer.seconds,
        "accounting_seconds": accounting,
        "epsilon_max": priv["epsilon_max"],
        "noise_multiplier": priv.get("noise_multiplier"),
        "mechanism": priv.get("mechanism"),
        "cohort_sizes": cohort_sizes,
        "min_survivors": priv.get("min_survivors"),
        "max_participations": priv.get("max_participations"),
        "deficit_rounds": priv.get("deficit_rounds"),
        "rejected_budget": rejected,
    }


def time_client_step(dataset: str, algorithm: str, *, delta: float, repeats: int = 7, n_tasks: int = 10,
                     seed: int = 0) -> dict[str, float]:
    """Median seconds per client step, non-private vs DP, interleaved in one process after a warm-up.

    Record level: the DP learner's ``update`` (per-example engines ``auto`` and ``vmap``, see
    ``securefml.privacy.dp_gradients``; ``benchmarks/dp_step.py`` times one step).  User level: the
    plain ``update`` plus the client-side clip (distributed noise shares are drawn inside SecAgg's
    mask job; their cost is in ``benchmarks/secagg.py``'s client time).
    """
    data = load_dataset(dataset, seed=seed)
    hp = default_hyperparameters(data.kind, algorithm)
    cfg = MetaConfig(hp["inner_steps"], hp["inner_lr"], hp["outer_lr"], hp["outer_steps"])
    learner = LEARNERS.create(algorithm, model=make_model(data, seed=seed), config=cfg)
    tasks = list(data.train[:n_tasks])
    local = min(len(t.support_y) + len(t.query_y) for t in tasks)
    plan = dict(n_train_clients=len(data.train), clients_per_round=n_tasks, rounds=repeats + 1,
                dataset_kind=data.kind, local_dataset_size=local, generator=torch.Generator().manual_seed(seed))
    record = {}
    for engine in ("auto", "vmap"):
        s = setup_privacy(PrivacyConfig(mode="record", noise_multiplier=1.0, delta=delta), learner, **plan)
        s.learner.per_sample = engine  # type: ignore[attr-defined]  # read when each client's state is built
        record[engine] = s.learner
    user = setup_privacy(PrivacyConfig(mode="user", noise_multiplier=1.0, delta=delta), learner, **plan)
    params = learner.init_params()
    layout_names = list(params)

    def user_step(t: Any) -> None:
        upd, _ = learner.update(params, t)
        assert user.update_hook is not None
        user.update_hook(t.client_id, torch.cat([upd[n].flatten() for n in layout_names]))

    steps = {"plain": lambda t: learner.update(params, t), "record": lambda t: record["auto"].update(params, t),
             "record_vmap": lambda t: record["vmap"].update(params, t), "user": user_step}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(repeats + 1):
        for name, fn in steps.items():
            start = time.perf_counter()
            for t in tasks:
                fn(t)
            if rep:  # the first pass is the warm-up (wrapping, tracing, caches)
                times[name].append((time.perf_counter() - start) / len(tasks))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "plain_ms": 1e3 * med["plain"],
        "record_ms": 1e3 * med["record"],
        "record_vmap_ms": 1e3 * med["record_vmap"],
        "user_ms": 1e3 * med["user"],
        "record_ratio": med["record"] / med["plain"],
        "record_vmap_ratio": med["record_vmap"] / med["plain"],
        "user_ratio": med["user"] / med["plain"],
    }


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4))
    labels = ["1", "3", "8", "inf"]
    for ax, (dataset, res) in zip(axes if len(results) > 1 else [axes], results.items()):
        for mode, marker in (("record", "o"), ("user", "s"), ("user-distributed", "^")):
            if mode not in res:
                continue
            ys = [res[mode][lab]["score"] for lab in labels]
            ax.plot(range(len(labels)), ys, marker=marker, label=f"{mode}-level DP")
        ax.axhline(res["none"]["score"], color="gray", linestyle="--", label="non-private")
        ax.axhline(res["none"]["untrained_score"], color="black", linestyle=":", label="untrained model, fine-tuned")
        ax.set_xticks(range(len(labels)), [f"eps={lab}" for lab in labels])
        ax.set_title(f"{dataset} ({res['none']['metric']}, personalized)")
        ax.set_ylabel(res["none"]["metric"])
        if res["none"]["metric"] == "mse":
            ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--algorithm", default="fomaml")
    parser.add_argument("--delta", type=float, default=1e-4)
    parser.add_argument("--clip", type=float, default=1.0, help="user-level S")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="record-level C")
    parser.add_argument("--sample-rate", type=float, default=0.5, help="record-level Poisson rate")
    parser.add_argument("--modes", nargs="+", default=["record", "user", "user-distributed"],
                        choices=["record", "user", "user-distributed"])
    parser.add_argument("--datasets", nargs="+", default=["digits-fewshot", "sine"])
    parser.add_argument("--out", default="results/privacy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    for dataset in args.datasets:
        timing[dataset] = time_client_step(dataset, args.algorithm, delta=args.delta)
        kw = dict(rounds=args.rounds, clients_per_round=args.clients_per_round)
        run_private(dataset, args.algorithm, PrivacyConfig(), rounds=1, clients_per_round=2)  # warm-up
        res: dict[str, Any] = {"none": run_private(dataset, args.algorithm, PrivacyConfig(), **kw)}
        base_time = res["none"]["client_seconds"]
        for mode in args.modes:
            res[mode] = {}
            for eps in EPSILONS:
                placement = "distributed" if mode == "user-distributed" else "central"
                cfg = PrivacyConfig(mode=mode.split("-")[0], target_epsilon=eps, delta=args.delta, clip=args.clip,
                                    max_grad_norm=args.max_grad_norm, sample_rate=args.sample_rate,
                                    placement=placement)
                r = run_private(dataset, args.algorithm, cfg, **kw)
                r["client_time_ratio"] = r["client_seconds"] / base_time
                res[mode]["inf" if math.isinf(eps) else str(int(eps))] = r
        results[dataset] = res
    _plot(results, out / "privacy.png")
    summary = {
        "algorithm": args.algorithm,
        "rounds": args.rounds,
        "clients_per_round": args.clients_per_round,
        "delta": args.delta,
        "threads": torch.get_num_threads(),
        "results": results,
        "epsilon_spent": {ds: {mode: {lab: r["epsilon_max"] for lab, r in res[mode].items()}
                               for mode in args.modes} for ds, res in results.items()},
        "client_time": timing,
        "record_client_time_ratio_max": max(t["record_ratio"] for t in timing.values()),
        "png": str(out / "privacy.png"),
    }
    (out / "privacy.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
