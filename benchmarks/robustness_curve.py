"""Per-round personalized accuracy of a few robustness-matrix runs, with who was in each cohort; one JSON.

    nice -n 10 python benchmarks/robustness_curve.py --seeds 0 1 2 --malicious 0.2 --rounds 100 \\
        --runs recommended:signflip:scale=10 recommended:none mean:none --out F

Each run is the matrix's configuration (digits-fewshot FOMAML, 10 per round, ``--rounds``) with
the personalized score taken after *every* round (``last_k = rounds``), so the JSON shows when an
attacked run falls behind its clean twin: before the detector has evidence, or after.  Per
round: accuracy, attackers in the cohort, attackers and honest clients excluded, the norm of the
aggregate.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from peers import write_report

from securefml.experiment import RunConfig, run_experiment


def curve(defense: str, attack: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = RunConfig(dataset="digits-fewshot", algorithm=args.algorithm, rounds=args.rounds, clients_per_round=10,
                    seed=seed, defense=defense, attack=attack,
                    malicious=args.malicious, last_k=args.rounds)
    t0 = time.perf_counter()
    res = run_experiment(cfg)
    bad = set(res.metrics["detection"]["malicious_ids"])
    values = res.metrics["personalized_last_k"]["values"]
    rounds = []
    for i, h in enumerate(res.history):
        rounds.append({"round": i, "accuracy": values[i], "attackers": sum(c in bad for c in h["cohort"]),
                       "attackers_excluded": sum(c in bad for c in h["flagged"]),
                       "honest_excluded": sum(c not in bad for c in h["flagged"]), "update_norm": h["update_norm"]})
    return {"defense": defense, "attack": attack, "seed": seed, "malicious": args.malicious,
            "last_5": sum(values[-5:]) / 5, "seconds": round(time.perf_counter() - t0, 1), "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--malicious", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--algorithm", default="fomaml")
    ap.add_argument("--runs", nargs="+", default=["recommended:signflip:scale=10", "recommended:none", "mean:none"],
                    help="DEFENSE:ATTACK pairs (the defense spec must not contain ':' here)")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = [curve(*spec.split(":", 1), seed, args) for seed in args.seeds for spec in args.runs]
    write_report({"args": vars(args), "runs": out}, args.out, indent=1)


if __name__ == "__main__":
    main()
