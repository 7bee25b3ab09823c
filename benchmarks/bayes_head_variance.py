"""How the output layer's posterior variance responds to each client's support set; prints JSON.

    python benchmarks/bayes_head_variance.py --runs-dir results/bayes_runs [--seeds 0 1 2] [--out FILE]

For the kept 200-round models of ``bayes-metasgd`` (local inference by gradient steps only) and
``bayes-metasgd-headvar`` (the closed-form head variance step of ``securefml.bayes.variance``
inside local inference and the meta-objective, ``benchmarks/bayes_variant.py``) and
``bayes-metasgd-allvar`` (the same step in every layer, ``BayesConfig.variance_step_layers``), on the same 60
held-out clients per seed as ``benchmarks/bayes_calibration.py`` (large query sets): per client,
the mean over the head's weights of ``posterior log-variance - prior log-variance``, then its mean
and spread across clients; the share of head weights whose variance the client's support set
narrowed by more than 10%; the prior's head standard deviation; and the Spearman correlation
across clients between the head's mean posterior log-variance and the client's query accuracy
(does a narrower posterior go with a client the model fits better?).  No retraining; scoring only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bayes_calibration import _build, max_query
from peers import write_report

from securefml.bayes import LOGVAR_PREFIX
from securefml.data.digits import make_digits_fewshot

LEARNERS = ("bayes-metasgd", "bayes-metasgd-headvar", "bayes-metasgd-allvar")


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def measure(algorithm: str, run: dict[str, Any], seed: int, data: Any) -> dict[str, Any]:
    learner, steps = _build(algorithm, data, seed)
    params = learner.layout().unflatten(torch.tensor(run["vector"], dtype=torch.float32))
    head = f"{LOGVAR_PREFIX}{learner.net.head}.weight"
    priors = learner.gaussian(params)
    prior = priors[head]
    hidden = [f"{LOGVAR_PREFIX}{n}.weight" for n in learner.net.bayesian_layers if n != learner.net.head]
    moved, narrowed, accuracy = [], [], []
    moved_hidden: dict[str, list[float]] = {n: [] for n in hidden}
    with torch.no_grad():
        for t in data.heldout:
            adapted = learner.adapt(params, t.support_x, t.support_y, t.kind, steps=steps)
            full = learner.gaussian({**params, **adapted})
            q = full[head]
            for n in hidden:
                moved_hidden[n].append(float((full[n] - priors[n]).mean()))
            moved.append(float((q - prior).mean()))
            narrowed.append(float((q - prior < np.log(0.9)).float().mean()))
            pred = learner.forward({**params, **adapted}, t.query_x).argmax(-1)
            accuracy.append(float((pred == t.query_y).float().mean()))
    return {"head_weight_logvar_minus_prior_mean": statistics.fmean(moved),
            "head_weight_logvar_minus_prior_std_across_clients": statistics.stdev(moved),
            "head_weight_logvar_minus_prior_range": [min(moved), max(moved)],
            "share_of_head_weights_narrowed_over_10pct": statistics.fmean(narrowed),
            "prior_head_weight_std_mean": float(torch.exp(0.5 * prior).mean()),
            "spearman_head_logvar_vs_query_accuracy": _spearman(moved, accuracy),
            "hidden_layers": {n[len(LOGVAR_PREFIX):]: {
                "logvar_minus_prior_mean": statistics.fmean(v), "std_across_clients": statistics.stdev(v),
                "spearman_logvar_vs_query_accuracy": _spearman(v, accuracy) if len(set(v)) > 1 else None}
                for n, v in moved_hidden.items()},
            "clients": len(moved)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs-dir", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--heldout", type=int, default=60)
    ap.add_argument("--out")
    ap.add_argument("--learners", nargs="+", default=list(LEARNERS), choices=LEARNERS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    out: dict[str, Any] = {"setting": {"rounds": 200, "seeds": args.seeds, "heldout_clients": args.heldout,
                                       "query": "large (bayes_calibration.py)"}, "per_seed": {}}
    for seed in args.seeds:
        data = make_digits_fewshot(seed=seed, n_heldout=args.heldout, query=max_query(seed))
        out["per_seed"][seed] = {}
        for algorithm in args.learners:
            path = Path(args.runs_dir) / f"{algorithm}_plaintext_main_r200_s{seed}.json"
            if path.exists():
                out["per_seed"][seed][algorithm] = measure(algorithm, json.loads(path.read_text()), seed, data)
    out["wall_seconds"] = time.perf_counter() - started
    out["note"] = "scoring only, on a shared 2-core machine under nice"
    write_report(out, args.out)


if __name__ == "__main__":
    main()
