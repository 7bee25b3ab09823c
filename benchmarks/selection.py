"""Does layer selection pay?  Bytes vs personalized accuracy on digits-fewshot; prints JSON.

    python benchmarks/selection.py [--rounds 200] [--algorithm maml] [--seeds 0 1] [--protocol plaintext]

Rows: all layers, top-k by relative change with a 25% byte budget (client-chosen, with error
feedback, and server-dictated), and Cedar's representational-change selection (withholding 1 layer).
Bytes are what crossed the wire in the run; the ratio is against the all-layers run.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from securefml.experiment import RunConfig, run_experiment

SELECTIONS = ["all", "topk:0.25", "topk:fraction=0.25,error_feedback=true", "topk:fraction=0.25,server_dictated=true",
              "cedar:1"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--algorithm", default="maml")
    ap.add_argument("--protocol", default="plaintext")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = {}
    for sel in SELECTIONS:
        runs = []
        for seed in args.seeds:
            cfg = RunConfig(dataset="digits-fewshot", algorithm=args.algorithm, rounds=args.rounds,
                            clients_per_round=10, seed=seed, protocol=args.protocol, select=sel)
            m = run_experiment(cfg).metrics
            runs.append({"bytes": m["bytes_uploaded"], "accuracy": m["personalized"]["accuracy"],
                         "seconds": m["wall_seconds"]})
        rows[sel] = {
            "bytes": statistics.fmean(r["bytes"] for r in runs),
            "accuracy": statistics.fmean(r["accuracy"] for r in runs),
            "per_seed_accuracy": [r["accuracy"] for r in runs],
            "seconds": statistics.fmean(r["seconds"] for r in runs),
        }
        print(f"# {sel}: {rows[sel]}", flush=True)
    base = rows["all"]
    for r in rows.values():
        r["bytes_ratio"] = r["bytes"] / base["bytes"]
        r["accuracy_delta_points"] = 100 * (r["accuracy"] - base["accuracy"])
    top = rows["topk:fraction=0.25,error_feedback=true"]
    report = {
        "config": vars(args),
        "rows": rows,
        "checks": {
            "topk 25% sends <= 40% of all-layers bytes": top["bytes_ratio"] <= 0.40,
            "topk 25% accuracy within 2 points of all layers": abs(top["accuracy_delta_points"]) <= 2.0,
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
