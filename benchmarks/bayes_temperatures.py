"""Why Meta-SGD + temperature scaling on the support set has a high NLL: the fitted temperatures; prints JSON.

    python benchmarks/bayes_temperatures.py --runs-dir results/bayes_runs [--seeds 0 1 2] [--heldout 30]

For the trained 200-round Meta-SGD models kept by ``benchmarks/bayes.py --runs-dir``, on held-out
clients of ``benchmarks/bayes_calibration.py``'s large-query setting: the temperature each client
fits on its own support set (after adapting to it), the one it fits on cross-validated support
predictions (``MetaSGDTemperatureCV``), the support accuracy after adaptation, and how much of
the query NLL comes from mistakes made with confidence above 0.99.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from securefml.bayes import TEMPERATURE_KEY, MetaSGDTemperature, MetaSGDTemperatureCV
from securefml.data.digits import make_digits_fewshot
from securefml.experiment import RunConfig
from securefml.meta import MetaConfig, MetaSGD
from securefml.models import make_model
from securefml.personalize import personalized_probabilities

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bayes_calibration import max_query  # noqa: E402
from peers import write_report


def _quantiles(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"q10": float(q[0]), "median": float(q[1]), "q90": float(q[2]), "mean": float(t.mean())}


def one_seed(seed: int, runs_dir: str, n_heldout: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    data = make_digits_fewshot(seed=seed, n_heldout=n_heldout, query=max_query(seed))
    hp = RunConfig(dataset="digits-fewshot", algorithm="metasgd", seed=seed).resolved(data.kind)
    cfg = MetaConfig(hp["inner_steps"], hp["inner_lr"], hp["outer_lr"], hp["outer_steps"])
    steps = hp["finetune_steps"]
    net = make_model(data, seed=seed)
    plain, ts, cv = MetaSGD(net, cfg), MetaSGDTemperature(net, cfg), MetaSGDTemperatureCV(net, cfg)
    run = json.loads((Path(runs_dir) / f"metasgd_plaintext_main_r200_s{seed}.json").read_text())
    params = plain.layout().unflatten(torch.tensor(run["vector"], dtype=torch.float32))
    t_support, t_cv, support_acc, share = [], [], [], {}
    for t in data.heldout:
        adapted = {**params, **plain.adapt(params, t.support_x, t.support_y, t.kind, steps=steps)}
        with torch.no_grad():
            support_acc.append(float((plain.forward(adapted, t.support_x).argmax(1) == t.support_y).float().mean()))
        t_support.append(float(ts.calibrate(adapted, t.support_x, t.support_y, t.kind)[TEMPERATURE_KEY]))
        t_cv.append(float(cv.adapt(params, t.support_x, t.support_y, t.kind, steps=steps)[TEMPERATURE_KEY]))
    for name, learner in (("metasgd", plain), ("metasgd-ts", ts), ("metasgd-ts-cv", cv)):
        total, confident = 0.0, 0.0
        for t in data.heldout:
            p = personalized_probabilities(learner, params, t, steps=steps)
            nll = -torch.log(p.gather(1, t.query_y[:, None]).squeeze(1).clamp_min(1e-12))
            wrong = (p.argmax(1) != t.query_y) & (p.max(1).values > 0.99)
            total += float(nll.sum())
            confident += float(nll[wrong].sum())
        share[name] = confident / total
    return {"seed": seed, "temperature_support": _quantiles(t_support), "temperature_cv": _quantiles(t_cv),
            "support_accuracy_after_adaptation": _quantiles(support_acc),
            "nll_share_of_mistakes_above_0.99_confidence": share}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs-dir", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--heldout", type=int, default=30)
    ap.add_argument("--out")
    args = ap.parse_args()
    report = {"setting": {"heldout_clients": args.heldout, "rounds": 200, "query": "bayes_calibration.py's large sets"},
              "seeds": [one_seed(s, args.runs_dir, args.heldout) for s in args.seeds]}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
