"""Why bayes-metasgd was not better calibrated: the prior's and posterior's log-variances, per variant; prints JSON.

    BAYESCFG='{"logvar_unit": 1.0}' python benchmarks/bayes_diagnosis.py bayes-metasgd 60 [seed]

Runs one digits-fewshot 5-way 5-shot federation (10 clients per round) with the Bayesian
learners built from the ``BayesConfig`` fields in ``BAYESCFG`` (JSON; unset fields keep their
defaults), then reports personalized accuracy, ECE (per client and pooled), NLL, out-of-task
AUROC, the pooled mean confidence and, per Gaussian layer, the prior's log-variances (natural
units), the mean inner rate of the log-variances, and how far one held-out client's local
inference moves the posterior's log-variances and means off the prior.  This is what showed
that the posterior's log-variance moved 1e-5 off the prior and the prior's by at most the
server's Adam step per round (``benchmarks/json/bayes_diagnosis.json``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch

import securefml.bayes.learners as bayes_learners
from securefml.bayes.gaussian import logvar_name
from securefml.experiment import RunConfig, run_experiment

torch.set_num_threads(1)
CFG: dict[str, Any] = json.loads(os.environ.get("BAYESCFG", "{}"))
_init = bayes_learners.BayesianLearner.__init__


def _patched(self, model, config=None, *, bayes=None):  # type: ignore[no-untyped-def]
    _init(self, model, config, bayes=bayes or bayes_learners.BayesConfig(**CFG))


bayes_learners.BayesianLearner.__init__ = _patched  # type: ignore[method-assign]


def layer_stats(server, data) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    learner, params = server.learner, server.params
    if not hasattr(learner, "net"):
        return {}
    prior = learner.gaussian(params)
    t = data.heldout[0]
    post = learner.gaussian(learner.adapt(params, t.support_x, t.support_y, t.kind))
    stats: dict[str, Any] = {}
    for n in learner.net.gaussian_names:
        lv = logvar_name(n)
        rate = params.get("alpha." + lv)
        stats[n] = {"prior_logvar_mean": float(prior[lv].mean()), "prior_logvar_min": float(prior[lv].min()),
                    "prior_logvar_max": float(prior[lv].max()),
                    "logvar_rate_mean": None if rate is None else float(rate.mean()),
                    "posterior_minus_prior_logvar_absmean": float((post[lv] - prior[lv]).abs().mean()),
                    "posterior_minus_prior_mean_absmean": float((post[n] - prior[n]).abs().mean())}
    stats["per_sample_probability_std"] = float(learner.sample_probabilities(learner.stored(post), t.query_x)
                                                .std(dim=1).mean())
    return stats


def main() -> None:
    algorithm, rounds = sys.argv[1], int(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    out: dict[str, Any] = {}
    started = time.perf_counter()
    res = run_experiment(RunConfig(dataset="digits-fewshot", algorithm=algorithm, rounds=rounds, clients_per_round=10,
                                   seed=seed), on_finish=lambda s, d: out.update(layers=layer_stats(s, d)) or {})
    pm = res.metrics["personalized"]
    rel = pm["calibration"]["reliability"]
    counts = torch.tensor(rel["counts"], dtype=torch.float64)
    conf = torch.tensor([0.0 if c is None else c for c in rel["confidence"]], dtype=torch.float64)
    print(json.dumps({"bayes_config": CFG, "algorithm": algorithm, "rounds": rounds, "seed": seed,
                      "seconds": time.perf_counter() - started, "accuracy": pm["accuracy"], "ece": pm["ece"],
                      "ece_pooled": pm["calibration"]["pooled"]["ece"], "nll": pm["nll"], "ood_auroc": pm["ood_auroc"],
                      "mean_confidence": float((counts * conf).sum() / counts.sum()), **out}, indent=1))


if __name__ == "__main__":
    main()
