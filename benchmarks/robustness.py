"""Robustness on heterogeneous meta-learning clients: worst case over attacks, and detection; JSON.

    python benchmarks/robustness.py [--sections matrix detection] [--rounds 60] [--seeds 0 1 2]
                                    [--malicious 0.2 0.25] [--detection-rounds 100]
                                    [--detection-protocols plaintext ckks]

``matrix``: for each setting (digits-fewshot with FOMAML and MAML, digits-skew with FedAvg),
each defense and each malicious fraction, personalized accuracy with no attack ("clean") and
under every attack; per defense the worst case over the attacks, the drop from clean and the
gap of its clean accuracy to the plain mean's (its bias under heterogeneity), each a mean over
seeds with a 95 % t-interval.  Rows are sorted by worst case.  Accuracy is the personalized
accuracy of the final model (one evaluation at the end of the run).

``detection``: digits-fewshot, 25 % unit-scale sign flippers, 100 clients, 8 per round: the
reputation detector's cumulative TPR/FPR (every client seen so far, flagged at its latest
participation) every 10 rounds, and the pooled per-round rates, per protocol.

Every figure is measured in this run; nothing is compared with a constant from an earlier run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Any

import torch

from securefml.experiment import RunConfig, run_experiment

SETTINGS = [("digits-fewshot", "fomaml"), ("digits-fewshot", "maml"), ("digits-skew", "fedavg")]
DEFENSES = ["mean", "reputation>>arc>>mean", "reputation>>mean", "nnm>>cclip", "arc>>nnm>>multikrum", "geomed",
            "caf", "median"]
ATTACKS = ["signflip:scale=1", "signflip:scale=10", "alie", "ipm", "mimic", "optimal-alie", "optimal-ipm"]
# t quantiles (0.975) for 1..10 degrees of freedom
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


def interval(values: list[float]) -> dict[str, float | None]:
    """Mean and 95 % t-interval half-width over seeds (None for a single seed)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": m, "ci95": None}
    t = _T975[min(len(values) - 1, len(_T975)) - 1]
    return {"mean": m, "ci95": t * statistics.stdev(values) / math.sqrt(len(values))}


def accuracy(cfg: RunConfig) -> float:
    return float(run_experiment(cfg).metrics["personalized"]["accuracy"])


def matrix(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for setting in args.settings:
        dataset, algorithm = setting.split("/")
        for frac in args.malicious:
            rows = []
            for defense in args.defenses:
                per_attack: dict[str, list[float]] = {}
                for attack in ["none", *args.attacks]:
                    accs = []
                    for seed in args.seeds:
                        cfg = RunConfig(dataset=dataset, algorithm=algorithm, rounds=args.rounds,
                                        clients_per_round=args.clients_per_round, seed=seed, defense=defense,
                                        attack=attack, malicious=frac if attack != "none" else 0.0)
                        accs.append(accuracy(cfg))
                    per_attack[attack] = accs
                clean = per_attack.pop("none")
                worst_per_seed = [min(per_attack[a][i] for a in per_attack) for i in range(len(args.seeds))]
                rows.append({
                    "defense": defense,
                    "clean": interval(clean),
                    "worst_case": interval(worst_per_seed),
                    "worst_attack": min(per_attack, key=lambda a: statistics.fmean(per_attack[a])),
                    "drop_from_clean": interval([c - w for c, w in zip(clean, worst_per_seed)]),
                    "per_attack": {a: interval(v) for a, v in per_attack.items()},
                    "_clean_runs": clean,
                })
            mean_clean = next((r["_clean_runs"] for r in rows if r["defense"] == "mean"), None)
            for r in rows:
                if mean_clean is not None:
                    r["clean_minus_mean_clean"] = interval([a - b for a, b in zip(r["_clean_runs"], mean_clean)])
                del r["_clean_runs"]
            rows.sort(key=lambda r: r["worst_case"]["mean"], reverse=True)
            out.append({"dataset": dataset, "algorithm": algorithm, "malicious": frac, "rows": rows})
            print(json.dumps(out[-1]), flush=True)
    return out


def detection(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for protocol in args.detection_protocols:
        for seed in args.seeds:
            cfg = RunConfig(dataset="digits-fewshot", algorithm="fomaml", rounds=args.detection_rounds,
                            clients_per_round=8, seed=seed, protocol=protocol, defense=args.detector,
                            attack="signflip:scale=1", malicious=0.25)
            started = time.perf_counter()
            m = run_experiment(cfg).metrics
            det = m["detection"]
            cum = det["cumulative"]
            out.append({
                "protocol": protocol, "seed": seed, "defense": args.detector,
                "final_cumulative": {"tpr": cum[-1]["tpr"], "fpr": cum[-1]["fpr"]},
                "cumulative_every_10": [{k: c[k] for k in ("round", "tpr", "fpr")} for c in cum[9::10]],
                "pooled_per_round": {"tpr": det["tpr"], "fpr": det["fpr"]},
                "accuracy": m["personalized"]["accuracy"],
                "seconds": time.perf_counter() - started,
            })
            print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", nargs="+", default=["detection", "matrix"], choices=["detection", "matrix"])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--clients-per-round", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--malicious", type=float, nargs="+", default=[0.2, 0.25])
    ap.add_argument("--defenses", nargs="+", default=DEFENSES)
    ap.add_argument("--settings", nargs="+", default=[f"{d}/{a}" for d, a in SETTINGS],
                    help="dataset/algorithm pairs, e.g. digits-fewshot/fomaml")
    ap.add_argument("--attacks", nargs="+", default=ATTACKS)
    ap.add_argument("--detection-rounds", type=int, default=100)
    ap.add_argument("--detection-protocols", nargs="+", default=["plaintext", "ckks"])
    ap.add_argument("--detector", default="reputation>>mean")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result: dict[str, Any] = {"args": vars(args)}
    if "detection" in args.sections:
        result["detection"] = detection(args)
    if "matrix" in args.sections:
        result["matrix"] = matrix(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
