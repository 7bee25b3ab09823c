"""Train a Bayesian Meta-SGD *variant* (a ``BayesConfig`` change) like ``benchmarks/bayes.py`` trains its learners.

    python benchmarks/bayes_variant.py --variant lograte --runs-dir results/bayes_runs [--rounds 200] [--seeds 0 1 2]

Same data, seed, rounds, cohort, hyper-parameters and server optimizer as ``bayes.py``'s
``bayes-metasgd`` runs; the only difference is the variant's ``BayesConfig``.  Each finished run
is kept in ``--runs-dir`` as ``bayes-metasgd-<variant>_plaintext_main_r<rounds>_s<seed>.json`` (the
same format as ``bayes.py``'s, so ``benchmarks/bayes_calibration.py --variants`` re-scores it beside
the others).  ``--jobs`` runs that many seeds at once, one torch thread each.

Variants (``VARIANTS``):

* ``lograte``: ``BayesConfig(log_logvar_rates=True)``: the log-variances' inner rates are
  meta-learned on a log scale, so meta-training can grow them to the size the log-variances'
  gradients need (see ``BayesConfig.log_logvar_rates``).
* ``kl1e-3``: ``BayesConfig(kl_weight=0.001)``; ``kl0``: no KL term.
* ``headvar``: ``BayesConfig(head_variance_step=True)``: local inference ends with the closed-form
  variance step of the output layer (``securefml.bayes.variance``, at the free energy's own KL
  weight), inside the meta-objective, so the prior's head variances are meta-learned knowing
  that each client's support set will narrow them.
* ``allvar``: the same step in every Gaussian layer (``BayesConfig.variance_step_layers``, the
  exact diagonal GGN of the hidden layers too, ``securefml.bayes.variance.mlp_ggn_diagonal``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from bayes import _summary, own_floor
from peers import write_report

from securefml.bayes import BayesConfig, BayesMetaSGD
from securefml.experiment import RunConfig, run_experiment
from securefml.meta import LEARNERS
from securefml.meta.base import MetaConfig

#: variant name -> its BayesConfig (everything else as bayes-metasgd)
VARIANTS: dict[str, BayesConfig] = {
    "lograte": BayesConfig(log_logvar_rates=True),
    "kl1e-3": BayesConfig(kl_weight=0.001),
    "kl0": BayesConfig(kl_weight=0.0),
    "headvar": BayesConfig(head_variance_step=True),
    "allvar": BayesConfig(head_variance_step=True, variance_step_layers=("layers.0", "layers.2", "layers.4")),
}
#: bayes-metasgd's resolved hyper-parameters (securefml.experiment), given explicitly for the variant's name
HP: dict[str, Any] = dict(inner_steps=5, inner_lr=0.1, outer_lr=1.0, outer_steps=1, server_opt="adam",
                          server_lr=0.005, finetune_steps=5)


def algorithm_name(variant: str) -> str:
    return f"bayes-metasgd-{variant}"


def build(variant: str, model: torch.nn.Module, config: MetaConfig | None = None) -> BayesMetaSGD:
    """The variant's learner (also how ``bayes_calibration.py`` rebuilds it to re-score a kept run)."""
    return BayesMetaSGD(model, config, bayes=VARIANTS[variant])


def register(variant: str) -> str:
    """Register the variant under ``bayes-metasgd-<variant>`` in this process (benchmark only)."""
    name = algorithm_name(variant)
    if name not in LEARNERS:
        def factory(model: torch.nn.Module, config: MetaConfig | None = None) -> BayesMetaSGD:
            return build(variant, model, config)
        LEARNERS.register(name)(factory)
    return name


def run_one(job: tuple[str, int, int]) -> dict[str, Any]:
    variant, rounds, seed = job
    torch.set_num_threads(1)
    name = register(variant)
    extra: dict[str, Any] = {}

    def on_finish(server, data):  # type: ignore[no-untyped-def]
        extra["vector"] = server.global_vector.clone()
        extra["floor"] = own_floor(server.learner, server.params, data.heldout, server.learner.config.inner_steps)
        return {}

    cfg = RunConfig(dataset="digits-fewshot", algorithm=name, rounds=rounds, clients_per_round=10, seed=seed, **HP)
    t = time.perf_counter()
    res = run_experiment(cfg, on_finish=on_finish)
    out = {"algorithm": name, "seed": seed, "protocol": "plaintext", "rounds": rounds, "group": "main",
           "seconds": time.perf_counter() - t, "metrics": {**_summary(res.metrics["personalized"]), **extra["floor"]},
           "hyperparameters": res.config["resolved"], "bayes_config": repr(VARIANTS[variant]),
           "vector": extra["vector"].tolist()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--runs-dir", required=True)
    ap.add_argument("--out", help="also write a report of every kept run of the variant (JSON) here")
    args = ap.parse_args()
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    before = os.getloadavg()[0]
    todo = [(args.variant, args.rounds, s) for s in args.seeds
            if not (runs / f"{algorithm_name(args.variant)}_plaintext_main_r{args.rounds}_s{s}.json").exists()]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, j): j for j in todo}
        for fut in as_completed(futures):
            r = fut.result()
            path = runs / f"{r['algorithm']}_plaintext_main_r{r['rounds']}_s{r['seed']}.json"
            path.write_text(json.dumps(r))
            print(json.dumps({"seed": r["seed"], "seconds": r["seconds"], "metrics": r["metrics"],
                              "load_average_at_start": before}), flush=True)
    kept = [json.loads(p.read_text()) for s in args.seeds
            if (p := runs / f"{algorithm_name(args.variant)}_plaintext_main_r{args.rounds}_s{s}.json").exists()]
    write_report({"variant": args.variant, "algorithm": algorithm_name(args.variant),
                  "bayes_config": repr(VARIANTS[args.variant]), "rounds": args.rounds,
                  "setting": "digits-fewshot 5-way 5-shot, 10 clients per round, 30 held-out clients x 50 queries",
                  "per_seed": [{"seed": r["seed"], "seconds": r["seconds"], **r["metrics"]} for r in kept],
                  "note": "timings on a shared 2-core machine under nice, two runs at once (the third alone)"},
                 args.out)


if __name__ == "__main__":
    main()
