"""Bayesian personalization against its peers on digits-fewshot 5-way 5-shot; prints JSON.

    python benchmarks/bayes.py [--rounds 200] [--seeds 0 1 2] [--protocol-rounds 20] [--jobs 2]

Learners, all with the same data, seed, rounds, cohort size and server optimizer:

* ``metasgd``: deterministic Meta-SGD;
* ``metasgd-ts``: the *same trained Meta-SGD model*, personalized with temperature scaling fitted
  on each held-out client's support set (so the two differ only in the post-hoc step);
* ``bayes-metasgd``: the meta-learned Gaussian prior with local VI (``securefml.bayes``);
* ``pfedbayes``: the pFedBayes baseline;
* ``bayes-maml`` (``--with-maml``): Bayesian MAML.

Per learner and seed: personalized accuracy, ECE (mean over held-out clients, 15 equal-width
bins; also adaptive and pooled over all query predictions), NLL, Brier, selective accuracy
(80%) and out-of-task AUROC of the predictive entropy.  ``checks`` compares the seed-means with
the targets of the issue (ECE of bayes-metasgd <= 0.5x Meta-SGD's at accuracy within 1 point
and lower NLL; lower ECE than Meta-SGD+TS and pFedBayes at equal or better accuracy).

On 50 query predictions per client the per-client ECE sits at the estimator's floor for these
learners; ``benchmarks/bayes_calibration.py`` re-scores the global vectors this script keeps in
``--runs-dir`` on larger query sets and with the debiased estimator, which is where the ECE
target is judged.

Protocols: ``bayes-metasgd`` for ``--protocol-rounds`` rounds under plaintext, CKKS and SecAgg+
with the first seed; reports the largest difference of the final global parameters from
plaintext and the differences of the metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from peers import write_report

from securefml.bayes import MetaSGDTemperature
from securefml.calibration import calibrated_ece_floor, expected_calibration_error
from securefml.experiment import RunConfig, run_experiment
from securefml.personalize import personalize, personalized_probabilities

KEYS = ("accuracy", "ece", "ece_adaptive", "nll", "brier", "selective_accuracy", "ood_auroc")
FLOOR_KEYS = ("ece_floor", "ece_pooled_floor", "mean_confidence")


def _summary(pers: dict[str, Any]) -> dict[str, Any]:
    out = {k: pers[k] for k in KEYS}
    out["accuracy_std_over_clients"] = pers["std"]
    out["ece_pooled"] = pers["calibration"]["pooled"]["ece"]
    out["nll_pooled"] = pers["calibration"]["pooled"]["nll"]
    return out


def own_floor(learner: Any, params: Any, tasks: Any, steps: int) -> dict[str, float]:
    """ECE each held-out client's predictions would score if they were exactly calibrated.

    ``calibrated_ece_floor`` on the learner's own personalized query predictions: per client
    (mean over clients, as ``ece``) and pooled over all clients (as ``ece_pooled``).
    """
    probs = [personalized_probabilities(learner, params, t, steps=steps) for t in tasks]
    gen = torch.Generator().manual_seed(0)
    per_client = [calibrated_ece_floor(p, generator=gen) for p in probs]
    return {"ece_floor": statistics.fmean(per_client),
            "ece_pooled_floor": calibrated_ece_floor(torch.cat(probs), draws=20, generator=gen),
            "mean_confidence": float(torch.cat(probs).max(1).values.mean())}


def run_one(job: tuple[str, int, int, str, str]) -> dict[str, Any]:
    algorithm, rounds, seed, protocol, group = job
    torch.set_num_threads(1)
    extra: dict[str, Any] = {}

    def on_finish(server, data):  # type: ignore[no-untyped-def]
        extra["vector"] = server.global_vector.clone()
        steps = server.learner.config.inner_steps  # = the run's finetune_steps for these learners
        if group == "main":
            extra["floor"] = own_floor(server.learner, server.params, data.heldout, steps)
        if algorithm == "metasgd":  # the same trained model, personalized with temperature scaling
            ts = MetaSGDTemperature(server.learner.model, server.learner.config)
            extra["ts"] = personalize(ts, server.params, data.heldout, steps=steps).to_dict()
            extra["ts_floor"] = own_floor(ts, server.params, data.heldout, steps)
        return {}

    cfg = RunConfig(dataset="digits-fewshot", algorithm=algorithm, rounds=rounds, clients_per_round=10, seed=seed,
                    protocol=protocol)
    t = time.perf_counter()
    res = run_experiment(cfg, on_finish=on_finish)
    out = {"algorithm": algorithm, "seed": seed, "protocol": protocol, "rounds": rounds, "group": group,
           "seconds": time.perf_counter() - t, "metrics": _summary(res.metrics["personalized"]),
           "hyperparameters": res.config["resolved"], "vector": extra["vector"].tolist()}
    if "floor" in extra:
        out["metrics"].update(extra["floor"])
    if "ts" in extra:
        out["ts_metrics"] = {**_summary(extra["ts"]), **extra["ts_floor"]}
    return out


def ece_floor(n: int, *, classes: int = 5, trials: int = 300, seed: int = 0) -> float:
    """Mean ECE (15 bins) of *perfectly calibrated* predictions on ``n`` examples: the estimator's bias.

    Labels are drawn from the predicted distribution itself, so the true calibration error is 0;
    what the estimator reports is its finite-sample floor for a query set of that size.
    """
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(trials):
        p = torch.softmax(2.0 * torch.randn(n, classes, generator=g), dim=1)
        y = torch.multinomial(p, 1, generator=g).squeeze(1)
        vals.append(expected_calibration_error(p, y))
    return statistics.fmean(vals)


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--protocol-rounds", type=int, default=20, help="0 skips the CKKS/SecAgg+ comparison")
    ap.add_argument("--with-maml", action="store_true", help="also run bayes-maml")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    ap.add_argument("--out", help="also write the JSON here (benchmarks/json/bayes.json feeds the README)")
    ap.add_argument("--runs-dir", help="keep each finished run here as JSON and skip runs already there (resume)")
    ap.add_argument("--report-only", action="store_true",
                    help="with --runs-dir: build the report from the runs already there, run nothing")
    ap.add_argument("--floor-only", action="store_true", help="only the ECE estimator's floor (seconds)")
    args = ap.parse_args()
    floor = {"per_client_50": ece_floor(50), "pooled_1500": ece_floor(1500, trials=20)}
    if args.floor_only:
        print(json.dumps({"ece_floor_of_calibrated_predictions": floor}, indent=2))
        return
    learners = ["bayes-metasgd", "metasgd", "pfedbayes"] + (["bayes-maml"] if args.with_maml else [])
    # seed by seed (a run stopped early still leaves complete seeds), the slowest learner first;
    # the short protocol runs after the first seed
    jobs = [(a, args.rounds, s, "plaintext", "main") for s in args.seeds[:1] for a in learners]
    if args.protocol_rounds:
        jobs += [("bayes-metasgd", args.protocol_rounds, args.seeds[0], p, "protocol")
                 for p in ("plaintext", "ckks", "secagg")]
    jobs += [(a, args.rounds, s, "plaintext", "main") for s in args.seeds[1:] for a in learners]
    started = time.perf_counter()
    before = os.getloadavg()[0]
    runs_dir = Path(args.runs_dir) if args.runs_dir else None

    def path(job: tuple[str, int, int, str, str]) -> Path:
        assert runs_dir is not None
        return runs_dir / f"{job[0]}_{job[3]}_{job[4]}_r{job[1]}_s{job[2]}.json"

    done: dict[tuple[str, int, int, str, str], dict[str, Any]] = {}
    if runs_dir is not None:
        runs_dir.mkdir(parents=True, exist_ok=True)
        done = {j: json.loads(path(j).read_text()) for j in jobs if path(j).exists()}
    todo = [] if args.report_only else [j for j in jobs if j not in done]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, j): j for j in todo}
        for fut in as_completed(futures):  # each run is kept as soon as it finishes
            job = futures[fut]
            done[job] = fut.result()
            if runs_dir is not None:
                path(job).write_text(json.dumps(done[job]))
    # a seed counts only when every learner finished it (a partial resume reports complete seeds)
    complete = [s for s in args.seeds if all((a, args.rounds, s, "plaintext", "main") in done for a in learners)]
    if not complete:
        raise SystemExit("no seed has every learner's run")
    partial = complete != list(args.seeds)
    args.seeds = complete
    results = [r for j, r in done.items() if j[4] == "protocol" or j[2] in complete]
    main_runs = [r for r in results if r["group"] == "main"]
    table: dict[str, Any] = {}
    for name in [*learners, "metasgd-ts"]:
        if name == "metasgd-ts":
            per_seed = [{"seed": r["seed"], **r["ts_metrics"]} for r in main_runs if r["algorithm"] == "metasgd"]
            seconds = None
        else:
            runs = [r for r in main_runs if r["algorithm"] == name]
            per_seed = [{"seed": r["seed"], **r["metrics"]} for r in runs]
            seconds = statistics.fmean(r["seconds"] for r in runs)
        table[name] = {"mean": {k: _mean(per_seed, k) for k in (*KEYS, "ece_pooled", "nll_pooled", *FLOOR_KEYS)},
                       "per_seed": per_seed, "seconds_per_run": seconds}
    m = {k: v["mean"] for k, v in table.items()}
    b, ms, ts, pf = m["bayes-metasgd"], m["metasgd"], m["metasgd-ts"], m["pfedbayes"]
    checks = {
        "ece ratio bayes-metasgd / metasgd (target <= 0.5)": b["ece"] / ms["ece"],
        "pooled ece ratio bayes-metasgd / metasgd": b["ece_pooled"] / ms["ece_pooled"],
        "accuracy difference bayes-metasgd - metasgd (points, target >= -1)": 100 * (b["accuracy"] - ms["accuracy"]),
        "nll bayes-metasgd < metasgd": b["nll"] < ms["nll"],
        "ece bayes-metasgd < metasgd-ts": b["ece"] < ts["ece"],
        "ece bayes-metasgd < pfedbayes": b["ece"] < pf["ece"],
        "accuracy bayes-metasgd >= pfedbayes": b["accuracy"] >= pf["accuracy"],
    }
    key = "metasgd ece floor of its own confidences / 0.5x its ece (> 1: the target is below the estimator's floor)"
    checks[key] = ms["ece_floor"] / (0.5 * ms["ece"])
    checks["target: ece <= 0.5x metasgd at accuracy within 1 point and lower nll"] = bool(
        checks["ece ratio bayes-metasgd / metasgd (target <= 0.5)"] <= 0.5
        and checks["accuracy difference bayes-metasgd - metasgd (points, target >= -1)"] >= -1
        and checks["nll bayes-metasgd < metasgd"])
    report: dict[str, Any] = {
        "setting": {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "dataset": "digits-fewshot", "n_way": 5, "k_shot": 5, "rounds": args.rounds,
                    "clients_per_round": 10, "seeds": args.seeds, "heldout_clients": 30,
                    "mc_samples_eval": 32, "ece_bins": 15, "selective_coverage": 0.8},
        "results": table, "checks": checks, "ece_floor_of_calibrated_predictions": floor,
    }
    report["partial"] = partial
    if args.protocol_rounds and all(j in done for j in jobs if j[4] == "protocol"):
        runs = {r["protocol"]: r for r in results if r["group"] == "protocol"}
        plain = runs["plaintext"]
        ref = torch.tensor(plain["vector"])
        report["protocols"] = {"rounds": args.protocol_rounds, "seed": args.seeds[0], "plaintext": plain["metrics"]}
        for name in ("ckks", "secagg"):
            r = runs[name]
            vec = torch.tensor(r["vector"])
            report["protocols"][name] = {
                "metrics": r["metrics"], "seconds": r["seconds"],
                "max_abs_param_diff_vs_plaintext": float((vec - ref).abs().max()),
                "param_norm": float(ref.norm()),
                **{f"{k}_diff": r["metrics"][k] - plain["metrics"][k] for k in ("accuracy", "ece", "nll")},
            }
    if args.report_only:
        report["wall_seconds"] = None
        report["note"] = ("Assembled with --report-only from the runs kept in --runs-dir; run timings "
                          "(seconds_per_run, per-run seconds) on a shared 2-core machine under nice, several runs "
                          "at once, and include personalization")
    else:
        report["wall_seconds"] = time.perf_counter() - started
        report["note"] = (f"Timings on a shared 2-core machine under nice (1-min load average {before:.1f} at the "
                          f"start, {os.getloadavg()[0]:.1f} at the end); per-run seconds include personalization")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
