"""Utility of record-level and user-level DP, and the cost of record-level DP on the clients.

Runs FOMAML (the learner every DP mode fully covers) on ``digits-fewshot`` (personalized accuracy)
and ``sine`` (personalized MSE) at target epsilon in {1, 3, 8, inf} for record-level and
user-level DP, plus the non-private run, all with the same seed, cohorts and budget of rounds.
``inf`` keeps the clipping but adds no noise, separating the cost of clipping from that of noise.

Client time is the time spent in the learners' client step (``update``) summed over the run; the
DP runs' time is reported as a ratio to the non-private run measured in the same process.
Accounting time (epsilon once per round) is reported separately.

Prints JSON and writes ``results/privacy/privacy.png`` and ``privacy.json``.

Usage: ``python benchmarks/privacy.py [--rounds 20] [--clients-per-round 10] [--out results/privacy]``
"""

from __future__ import annotations

import argparse
import json
import math
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
from securefml.privacy import PrivacyConfig, setup_privacy
from securefml.protocols import PROTOCOLS
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
    """A small federated run through ``Server`` with the privacy seam plugged in."""
    data = load_dataset(dataset, seed=seed)
    hp = default_hyperparameters(data.kind, algorithm)
    model = make_model(data, seed=seed, device=device)
    learner = LEARNERS.create(algorithm, model=model,
                              config=MetaConfig(hp["inner_steps"], hp["inner_lr"], hp["outer_lr"], hp["outer_steps"]))
    gen = torch.Generator().manual_seed(seed)
    train = list(data.train)
    local = min(len(t.support_y) + len(t.query_y) for t in train)
    setup = setup_privacy(privacy, learner, n_train_clients=len(train), clients_per_round=clients_per_round,
                          rounds=rounds, dataset_kind=data.kind, algorithm_name=algorithm, local_dataset_size=local,
                          device=device, generator=torch.Generator().manual_seed(seed + 1))
    timer = _Timed(setup.learner)
    server = Server(setup.learner, PROTOCOLS.create("plaintext"), make_defense("mean"),
                    server_optimizer=hp["server_opt"], server_lr=hp["server_lr"], device=device,
                    update_hook=setup.update_hook, aggregate_hook=setup.aggregate_hook)
    clients = [Client.build(t) for t in train]
    accounting = 0.0
    rejected = 0
    for rnd in range(rounds):
        idx = torch.randperm(len(clients), generator=gen)[:clients_per_round].tolist()
        rec = server.run_round(rnd, [clients[i] for i in sorted(idx)], generator=gen)
        rejected += len(rec.rejected)
        start = time.perf_counter()
        setup.end_round(rnd)
        accounting += time.perf_counter() - start
    steps = max(10, hp["inner_steps"]) if data.kind == "regression" else max(5, hp["inner_steps"])
    report = personalize(setup.learner, server.params, data.heldout, steps=steps, device=device)
    priv = setup.report()
    return {
        "metric": report.metric,
        "score": report.to_dict()[report.metric],
        "client_seconds": timer.seconds,
        "accounting_seconds": accounting,
        "epsilon_max": priv["epsilon_max"],
        "noise_multiplier": priv.get("noise_multiplier"),
        "rejected_budget": rejected,
    }


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4))
    labels = ["1", "3", "8", "inf"]
    for ax, (dataset, res) in zip(axes, results.items()):
        for mode, marker in (("record", "o"), ("user", "s")):
            ys = [res[mode][lab]["score"] for lab in labels]
            ax.plot(range(len(labels)), ys, marker=marker, label=f"{mode}-level DP")
        ax.axhline(res["none"]["score"], color="gray", linestyle="--", label="non-private")
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
    parser.add_argument("--out", default="results/privacy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for dataset in ("digits-fewshot", "sine"):
        kw = dict(rounds=args.rounds, clients_per_round=args.clients_per_round)
        res: dict[str, Any] = {"none": run_private(dataset, args.algorithm, PrivacyConfig(), **kw)}
        base_time = res["none"]["client_seconds"]
        for mode in ("record", "user"):
            res[mode] = {}
            for eps in EPSILONS:
                cfg = PrivacyConfig(mode=mode, target_epsilon=eps, delta=args.delta, clip=args.clip,
                                    max_grad_norm=args.max_grad_norm, sample_rate=args.sample_rate)
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
        "record_client_time_ratio_max": max(r["client_time_ratio"] for res in results.values()
                                            for r in res["record"].values()),
        "png": str(out / "privacy.png"),
    }
    (out / "privacy.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
