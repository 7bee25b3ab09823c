"""Why sharing Co-LoRA's P, Q helps the smallest architecture little: one JSON of controlled runs.

    nice -n 10 python benchmarks/relevance_hetero_diagnosis.py [--seeds 10 11] [--out F]

The federation is the ``hetero`` section's of ``benchmarks/relevance.py`` (MLP shapes
32, 64, 64x64 with client shares 1/8, 5/16, 9/16 of 32 training clients, 16 per round, 30
rounds, frozen family backbone, Adam 0.01, rank 8).  Each question is one change, measured
shared (P, Q averaged across architectures) and alone (within each architecture group):

* ``capacity``: every training client has the 32-wide shape (8 times the smallest group's data,
  each group alone): how far the smallest shape gets when data, not the shape, is the limit;
* ``rank16``: a larger shared part (r x r grows faster than the r x width factors);
* ``shared_lr``: the shared part trained at 5 times the adapters' rate;
* ``freeze_A``: A kept at the family initialisation, so the shared P, Q keep one meaning;
* ``per_architecture``: every shape counts the same in the shared P, Q (are the smallest
  group's P, Q drowned by the other groups' clients?).

The seeds are not the report's (0 to 4): the Co-LoRA settings of the report were chosen on
these runs, before its held-out accuracy was looked at.  Every comparison is between runs of
this script on the same seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from peers import write_report

from securefml.data import make_digits_clusters
from securefml.relevance import HeteroConfig, run_heterogeneous

SHAPES = "32,64,64x64"
SHARES = [0.125, 0.3125, 0.5625]
#: question -> (shapes, training shares, HeteroConfig changes)
CASES: dict[str, tuple[str, list[float] | None, dict[str, Any]]] = {
    "baseline": (SHAPES, SHARES, {}),
    "capacity": ("32", None, {}),
    "rank16": (SHAPES, SHARES, {"rank": 16}),
    "shared_lr": (SHAPES, SHARES, {"shared_lr": 0.05}),
    "freeze_A": (SHAPES, SHARES, {"freeze_A": True}),
    "per_architecture": (SHAPES, SHARES, {"shared_per_architecture": True}),
}


def run_case(name: str, seeds: list[int], heldout: int) -> dict[str, Any]:
    shapes, shares, changes = CASES[name]
    n_shapes = len(shapes.split(","))
    out: dict[str, dict[str, list[float]]] = {"shared": {}, "alone": {}}
    labels = (("alone", False),) if n_shapes == 1 else (("shared", True), ("alone", False))
    for seed in seeds:
        data = make_digits_clusters(seed=seed, groups=1, n_heldout=heldout, k_shot=2, query=3, architectures=shapes,
                                    architecture_shares=shares, heldout_architecture_shares=[1.0] * n_shapes)
        for label, share in labels:
            base: dict[str, Any] = dict(rounds=30, clients_per_round=16, local_steps=10, lr=0.01, optimizer="adam",
                                        finetune_steps=5, rank=8, seed=seed, share=share)
            base.update(changes)
            for a, v in run_heterogeneous(data, HeteroConfig(**base)).per_architecture.items():
                out[label].setdefault(a, []).append(v)
    table = {label: {a: statistics.fmean(v) for a, v in rows.items()} for label, rows in out.items() if rows}
    res: dict[str, Any] = {"changes": changes, "shapes": shapes, "accuracy": table, "per_seed": out}
    if "shared" in table:
        res["gain_from_sharing"] = {a: table["shared"][a] - table["alone"][a] for a in table["shared"]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[10, 11])
    ap.add_argument("--heldout", type=int, default=96, help="held-out clients, equal shares of the shapes")
    ap.add_argument("--only", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"seeds": args.seeds, "heldout_clients": args.heldout,
                              "note": "timings taken on a shared, loaded 2-core machine"}
    for name in args.only:
        report[name] = run_case(name, args.seeds, args.heldout)
    report["seconds"] = time.perf_counter() - t0
    write_report(report, args.out)


if __name__ == "__main__":
    main()
