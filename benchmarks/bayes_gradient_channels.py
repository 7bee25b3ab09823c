"""Where the meta-gradient on the prior's log-variances comes from, on the kept 200-round models; prints JSON.

    python benchmarks/bayes_gradient_channels.py --runs-dir results/bayes_runs [--seeds 0 1 2] [--tasks 30]

Why.  On the kept ``bayes-metasgd`` models the Monte Carlo predictive is under-confident and the
query NLL of training-pool clients falls monotonically as the predictive's variance is scaled
from 1 to 0 (``bayes_calibration.json``, ``chosen_on_training_clients``): the prior's noise
hurts predictions, yet meta-training, whose objective is exactly the query NLL of the
predictive, kept it.  The prior's log-variance enters the meta-objective three ways:

* **predictive**: the posterior's variance is the noise of the query predictive;
* **inner noise**: it is the noise of local inference's gradient steps (the posterior starts at
  the prior; one reparameterized sample per step);
* **inner KL**: it is the prior's variance in ``KL(q || p)``, whose mean term
  ``(mu_q - mu_p)^2 / (2 var_p)`` pulls the adapted means back to the prior's: a wider prior
  pulls less, so the means adapt further.

This script splits the meta-gradient exactly into the three.  With three copies ``A``, ``K``,
``B`` of the prior's natural log-variances, local inference starts from the prior with
log-variances ``A`` and takes its KL to the prior with ``K``; the query predictive uses the
posterior's log-variances re-based on ``B`` (``q_lv - A + B``).  At ``A = K = B`` this is the
meta-objective (checked against ``learner.query_nll`` with the same seed), and ``d/dA``,
``d/dK``, ``d/dB`` add up to its gradient.  Reported per Gaussian layer: the mean over
training-pool tasks, then over coordinates (a positive value asks for a narrower prior), with
the fraction of coordinates where the KL channel and the predictive pull in opposite
directions.  Only training-pool clients are used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bayes_calibration import _build
from peers import write_report
from torch import nn
from torch.func import grad

from securefml.bayes import LOGVAR_PREFIX, kl_params
from securefml.bayes.gaussian import clamp_logvar
from securefml.data.digits import make_digits_fewshot

CHANNELS = ("inner_noise", "inner_kl", "predictive")


def objective(learner: Any, params: Any, task: Any, seed: int, a: dict[str, torch.Tensor],
              k: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    """``learner.query_nll`` with the prior's log-variances split into start ``a``, KL ``k``, predictive ``b``.

    The same steps as ``BayesianLearner.infer`` (rates, clamping, noise order), so at
    ``a = k = b`` it is the meta-objective itself.
    """
    prior = learner.gaussian(params)
    rates = learner.rates(params)
    scale = learner.logvar_gradient_scale(task.support_x.shape[0])
    rates = {n: (r * scale if n.startswith(LOGVAR_PREFIX) else r) for n, r in rates.items()}
    kl_prior = {**prior, **k}
    n_support = task.support_x.shape[0]

    def free_energy(q_: Any, noise: Any) -> torch.Tensor:
        nll = learner.expected_nll(q_, task.support_x, task.support_y, noise)
        return nll + learner.bayes.kl_weight * kl_params(q_, kl_prior, learner.net.gaussian_names) / n_support

    step = grad(free_energy)
    gen = torch.Generator().manual_seed(seed)
    q = {**prior, **a}
    for _ in range(learner.config.inner_steps):
        noise = learner.net.draw_noise(n_support, 1, generator=gen, device=task.support_x.device,
                                       dtype=task.support_x.dtype)
        g = step(q, noise)
        q = {n: q[n] - rates[n] * g[n] for n in q}
        q = {n: (clamp_logvar(v) if n.startswith(LOGVAR_PREFIX) else v) for n, v in q.items()}
    q = {**q, **{n: q[n] - a[n] + b[n] for n in a}}
    noise = learner.net.draw_noise(task.query_x.shape[0], learner.bayes.train_samples, generator=gen,
                                   device=task.query_x.device, dtype=task.query_x.dtype)
    return nn.functional.nll_loss(learner.net.log_predictive(q, task.query_x, noise), task.query_y)


def channels(learner: Any, params: Any, task: Any, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """The three channels' meta-gradients in the prior's natural log-variances."""
    prior = learner.gaussian(params)
    a0 = {n: prior[n] for n in prior if n.startswith(LOGVAR_PREFIX)}
    value = float(objective(learner, params, task, seed, a0, a0, a0))
    reference = float(learner.query_nll(params, task, seed))
    if abs(value - reference) > 1e-4 * max(1.0, abs(reference)):
        raise RuntimeError(f"the split objective {value} is not the meta-objective {reference}")
    gs = grad(lambda a, k, b: objective(learner, params, task, seed, a, k, b), argnums=(0, 1, 2))(
        dict(a0), dict(a0), dict(a0))
    return dict(zip(CHANNELS, gs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs-dir", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tasks", type=int, default=30, help="training-pool clients per seed")
    ap.add_argument("--algorithm", default="bayes-metasgd")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    report: dict[str, Any] = {"setting": {"algorithm": args.algorithm, "rounds": 200, "seeds": args.seeds,
                                          "training_pool_tasks": args.tasks, "units": "natural log-variance"},
                              "per_seed": {}}
    for seed in args.seeds:
        run = json.loads((Path(args.runs_dir) / f"{args.algorithm}_plaintext_main_r200_s{seed}.json").read_text())
        data = make_digits_fewshot(seed=seed, n_heldout=1)
        learner, _ = _build(args.algorithm, data, seed)
        params = learner.layout().unflatten(torch.tensor(run["vector"], dtype=torch.float32))
        sums: dict[str, list[torch.Tensor]] = {}
        for i, task in enumerate(data.train[:args.tasks]):
            g = channels(learner, params, task, seed=1000 * seed + i)
            for n in g["predictive"]:
                sums.setdefault(n, []).append(torch.stack([g[c][n] for c in CHANNELS]))
        per_layer: dict[str, Any] = {}
        for n, gs in sums.items():
            g = torch.stack(gs).mean(0)  # [3, ...]: the channels, mean over tasks
            row = {f"{c}_mean": float(g[i].mean()) for i, c in enumerate(CHANNELS)}
            row["total_mean"] = float(g.sum(0).mean())
            kl, pred = g[1], g[2]
            row["fraction_kl_wants_wider"] = float((kl < 0).float().mean())
            row["fraction_predictive_wants_narrower"] = float((pred > 0).float().mean())
            row["fraction_kl_and_predictive_opposite"] = float(((kl * pred) < 0).float().mean())
            per_layer[n[len(LOGVAR_PREFIX):]] = row
        report["per_seed"][str(seed)] = per_layer
        print(f"seed {seed}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    layers = list(next(iter(report["per_seed"].values())))
    report["mean_over_seeds"] = {
        n: {k: statistics.fmean(report["per_seed"][str(s)][n][k] for s in args.seeds)
            for k in report["per_seed"][str(args.seeds[0])][n]} for n in layers}
    report["wall_seconds"] = time.perf_counter() - started
    report["note"] = ("A positive gradient asks for a narrower prior (gradient descent lowers the log-variance); "
                      "timings on a shared 2-core machine")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
