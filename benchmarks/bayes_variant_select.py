"""Choose the one retrained Bayesian Meta-SGD variant on short runs and *training-pool* clients; prints JSON.

    python benchmarks/bayes_variant_select.py run VARIANT ROUNDS SEED > DIR/VARIANT_SEED.json   (base = bayes-metasgd)
    python benchmarks/bayes_variant_select.py collect DIR/*.json [--out benchmarks/json/bayes_variant_selection.json]

``run`` trains one short federation (digits-fewshot 5-way 5-shot, 10 clients per round, the
bayes-metasgd hyper-parameters) with the variant's ``BayesConfig`` (``bayes_variant.VARIANTS``)
and scores it on the first 30 *training-pool* clients (their query sets after personalization):
accuracy, mean NLL, per-client debiased L2-CE (``securefml.calibration.squared_calibration_error``,
mean over clients then root), mean confidence; plus how far local inference moves the posterior's
log-variances on 10 of them, and the mean learned inner rate of each layer's log-variances.  The
held-out accuracy the run prints is recorded but is not used to choose.  ``collect`` assembles
the runs into one report.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bayes_variant import HP, register
from peers import write_report

from securefml.bayes import LOGVAR_PREFIX
from securefml.calibration import squared_calibration_error
from securefml.experiment import RunConfig, run_experiment
from securefml.personalize import personalize, personalized_probabilities


def run(variant: str, rounds: int, seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    name = "bayes-metasgd" if variant == "base" else register(variant)
    out: dict[str, Any] = {}

    def on_finish(server, data):  # type: ignore[no-untyped-def]
        learner, params = server.learner, server.params
        pool = data.train[:30]
        rep = personalize(learner, params, pool, steps=5)
        probs = [personalized_probabilities(learner, params, t, steps=5) for t in pool]
        sq = [squared_calibration_error(p, t.query_y) for p, t in zip(probs, pool)]
        assert rep.calibration is not None
        out["train_pool"] = {"acc": rep.mean, "nll": rep.calibration.mean("nll"),
                             "l2ce": math.sqrt(max(0.0, statistics.fmean(sq))),
                             "conf": float(torch.cat(probs).max(1).values.mean())}
        prior = learner.gaussian(params)
        moved = []
        for t in pool[:10]:
            q = learner.gaussian({**params, **learner.adapt(params, t.support_x, t.support_y, t.kind)})
            moved.append(statistics.fmean(float((q[n] - prior[n]).abs().mean()) for n in q
                                          if n.startswith(LOGVAR_PREFIX)))
        out["logvar_moved"] = statistics.fmean(moved)
        out["lv_rates"] = {n: float(v.mean()) for n, v in learner.rates(params).items() if n.startswith(LOGVAR_PREFIX)}
        return {}

    started = time.time()
    cfg = RunConfig(dataset="digits-fewshot", algorithm=name, rounds=rounds, clients_per_round=10, seed=seed, **HP)
    res = run_experiment(cfg, on_finish=on_finish)
    out["heldout_acc_not_used_for_choice"] = res.metrics["personalized"]["accuracy"]
    out["seconds"] = time.time() - started
    return {"variant": variant, "rounds": rounds, "seed": seed, **out}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        print(json.dumps(run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["collect"])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out")
    args = ap.parse_args()
    runs = [json.loads(Path(f).read_text()) for f in args.files]
    runs.sort(key=lambda r: (r["seed"], r["variant"]))
    write_report({"setting": {"dataset": "digits-fewshot", "n_way": 5, "k_shot": 5, "clients_per_round": 10,
                              "scored_on": "30 training-pool clients (query sets after personalization)",
                              "criterion": "per-client debiased L2-CE and NLL on training-pool clients"},
                  "runs": runs,
                  "note": "short runs on a shared 2-core machine under nice, two at a time"}, args.out)


if __name__ == "__main__":
    main()
