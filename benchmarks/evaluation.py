"""Cost of the attack x defense evaluation harness, and the checks of its reference picture; prints JSON.

    python benchmarks/evaluation.py [--default] [--check DIR ...]

Timings: the ``--quick`` matrix from scratch, the same matrix resumed (every cell reused), and
as the floor a single clean run of the quick base configuration measured in the same process;
ratios are against ``cells x floor``.  ``--default`` also times the default matrix (minutes).

``--check DIR`` reads an ``eval.json`` (e.g. of the default matrix) and reports, on the
global accuracy of the held-out clients: the ordering of Karimireddy, He & Jaggi
(CenteredClipping >= GeometricMedian >= CoordinateMedian >= Krum) under IPM and ALIE, the
bucketing lift of median and Krum, Mean's collapse under sign flipping and scaling, and the
backdoor success rate under Mean vs FLAME / NormBound.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from securefml.evaluation import Evaluation, evaluate, load_records, preset
from securefml.experiment import RunConfig, run_experiment

KHJ = ["cclip:tau=1", "geomed", "median", "krum:f=5"]
BUCKETED = {"median": "bucketing:size=2>>median", "krum:f=5": "bucketing:size=2>>krum:f=5"}


def floor_seconds(kwargs: dict[str, Any]) -> float:
    """One clean run of the matrix's base configuration, outside the harness (best of two)."""
    keep = {k: v for k, v in kwargs.items() if k not in ("attacks", "defenses", "protocols", "malicious", "seeds")}
    cfg = RunConfig(**keep)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for _ in range(2):  # the first run also pays one-off warm-up costs
            t = time.perf_counter()
            run_experiment(cfg)
            times.append(time.perf_counter() - t)
        return min(times)
    finally:
        torch.set_num_threads(saved)


def timed(name: str, out: Path) -> tuple[Evaluation, float]:
    t = time.perf_counter()
    ev = evaluate(**preset(name), out=out)
    return ev, time.perf_counter() - t


def _mean(records: list[dict[str, Any]], attack: str, defense: str, metric: str = "global") -> float | None:
    vals = [r[metric] for r in records if r["attack"] == attack and r["defense"] == defense
            and not r.get("error") and r.get(metric) is not None]
    return sum(vals) / len(vals) if vals else None


def _attack(records: list[dict[str, Any]], prefix: str) -> str | None:
    names = sorted({r["attack"] for r in records if r["attack"].split(":")[0] == prefix})
    return names[0] if names else None


def check(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The qualitative checks, on mean global accuracy over seeds (None where a cell is missing)."""
    report: dict[str, Any] = {}
    for prefix in ("ipm", "alie"):
        attack = _attack(records, prefix)
        if attack is None:
            continue
        acc = {d: _mean(records, attack, d) for d in [*KHJ, *BUCKETED.values()]}
        chain = [acc[d] for d in KHJ]
        report[attack] = {
            "global_accuracy": acc,
            "ordering_cclip>=geomed>=median>=krum": None if None in chain
            else all(a >= b for a, b in zip(chain, chain[1:])),
            "violations": [f"{KHJ[i]} < {KHJ[i + 1]}" for i in range(len(KHJ) - 1)
                           if None not in (chain[i], chain[i + 1]) and chain[i] < chain[i + 1]],
            "bucketing_lift": {d: None if acc[d] is None or acc[b] is None else acc[b] - acc[d]
                               for d, b in BUCKETED.items()},
        }
    clean = _mean(records, "none", "mean")
    for prefix in ("signflip", "scaling"):
        attack = _attack(records, prefix)
        if attack is not None and clean is not None:
            hit = _mean(records, attack, "mean")
            report[f"mean_under_{attack}"] = {"clean": clean, "attacked": hit,
                                              "drop": None if hit is None else clean - hit}
    for prefix in ("backdoor", "meta-backdoor"):
        attack = _attack(records, prefix)
        if attack is not None:
            report[f"asr_{attack}"] = {d: {"after_finetuning": _mean(records, attack, d, "asr_personalized"),
                                           "global_model": _mean(records, attack, d, "asr_global")}
                                       for d in ("mean", "normbound", "flame")}
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--default", action="store_true", help="also time the default matrix (minutes)")
    ap.add_argument("--check", nargs="*", default=[], metavar="DIR", help="check the picture in DIR/eval.json")
    args = ap.parse_args()
    result: dict[str, Any] = {"torch_threads_per_run": 1}
    with tempfile.TemporaryDirectory() as tmp:
        quick = preset("quick")
        floor = floor_seconds(quick)
        ev, seconds = timed("quick", Path(tmp) / "quick")
        _, resumed = timed("quick", Path(tmp) / "quick")
        cells = len(ev.records)
        result["quick"] = {
            "cells": cells, "rounds": quick["rounds"], "seconds": seconds, "floor_single_run_seconds": floor,
            "ratio_vs_cells_x_floor": seconds / (cells * floor), "resumed_seconds": resumed,
            "resumed_ratio": resumed / seconds, "under_2_minutes": seconds < 120,
        }
        if args.default:
            ev, seconds = timed("default", Path(tmp) / "default")
            cells = len(ev.records)
            result["default"] = {
                "cells": cells, "rounds": preset("default")["rounds"], "seconds": seconds,
                "seconds_per_cell": seconds / cells, "under_15_minutes": seconds < 900,
                "failed_cells": sum(bool(r.get("error")) for r in ev.records),
            }
            result["default_check"] = check(ev.records)
    for folder in args.check:
        result[f"check:{folder}"] = check(load_records(folder))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
