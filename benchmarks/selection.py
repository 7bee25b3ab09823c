"""Does layer selection pay?  Bytes vs personalized accuracy on digits-fewshot; prints JSON.

    python benchmarks/selection.py [--rounds 200] [--seeds 0 1 2] [--sections chunks topk] [--jobs 2]
                                   [--out benchmarks/json/selection.json]

Two sections, each row run over every seed with the same seeds as its ``all`` row:

``chunks`` (FOMAML, 10 clients per round): a 50 % parameter budget with chunked rotation
(``chunks:0.5``, every chunk every 2 rounds, error feedback), without error feedback, and the
layer-granular dictated ``topk:fraction=0.5,server_dictated=true``; and two all-layers runs
that spend the same bytes as the half budget differently (half the rounds; half the cohort).

``topk`` (MAML, 10 clients per round): client-chosen top-k with a 25 % budget, with and
without error feedback.

Accuracy is personalized accuracy, the mean of the last 5 evaluation rounds; each row reports
the per-seed values, their mean with a 95 % t-interval, and the paired (same seed) difference
from the all-layers row of its section.  Bytes are what crossed the wire, as a ratio to that
row.  For every selected run the history gives, per uploaded layer or chunk, the longest
stretch of rounds between two uploads (``max_gap``; a chunk sent every round has 1): the
measured ``R``.  Runs are independent processes, ``--jobs`` at a time, one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from peers import write_report

from securefml.evaluation import t_interval
from securefml.experiment import RunConfig, run_experiment


@dataclass(frozen=True)
class Row:
    """One row of a section: a selection spec and how the run differs from the section's base."""

    section: str
    label: str
    algorithm: str
    select: str = "all"
    rounds_share: float = 1.0
    clients_per_round: int = 10


ROWS = (
    Row("chunks", "all", "fomaml"),
    Row("chunks", "all, half the rounds", "fomaml", rounds_share=0.5),
    Row("chunks", "all, 5 clients per round", "fomaml", clients_per_round=5),
    Row("chunks", "chunks:0.5", "fomaml", "chunks:0.5"),
    Row("chunks", "chunks:0.5 without error feedback", "fomaml", "chunks:fraction=0.5,error_feedback=false"),
    Row("chunks", "topk:0.5 dictated (layers)", "fomaml", "topk:fraction=0.5,server_dictated=true"),
    Row("topk", "all", "maml"),
    Row("topk", "topk:0.25 (client-chosen)", "maml", "topk:0.25"),
    Row("topk", "topk:0.25 (client-chosen) with error feedback", "maml", "topk:fraction=0.25,error_feedback=true"),
)


def _config(row: Row, rounds: int, seed: int) -> RunConfig:
    return RunConfig(dataset="digits-fewshot", algorithm=row.algorithm, rounds=max(1, int(rounds * row.rounds_share)),
                     clients_per_round=row.clients_per_round, seed=seed, select=row.select, last_k=5)


def _max_gaps(history: list[dict[str, Any]]) -> dict[str, int]:
    """Per uploaded layer/chunk: the most rounds from one upload to the next (or to the run's end)."""
    last: dict[str, int] = {}
    gaps: dict[str, int] = {}
    for rec in history:
        for name in rec["uploaded_layers"]:
            gaps[name] = max(gaps.get(name, 0), rec["round"] - last.get(name, -1))
            last[name] = rec["round"]
    end = len(history)
    return {n: max(g, end - last[n]) for n, g in gaps.items()}


def _run(job: tuple[Row, int, int]) -> dict[str, Any]:
    row, rounds, seed = job
    torch.set_num_threads(1)
    start = time.perf_counter()
    res = run_experiment(_config(row, rounds, seed))
    gaps = _max_gaps(res.history)
    return {"section": row.section, "label": row.label, "algorithm": row.algorithm, "seed": seed,
            "accuracy": res.metrics["personalized_last_k"]["mean"],
            "accuracy_final": res.metrics["personalized"]["accuracy"], "bytes": res.metrics["bytes_uploaded"],
            "seconds": time.perf_counter() - start, "uploaded_names": len(gaps),
            "max_gap": max(gaps.values()) if gaps else None}


def _iv(values: list[float]) -> dict[str, float | None]:
    mean, half = t_interval(values)
    return {"mean": mean, "ci95": half}


def summarize(rows: tuple[Row, ...], runs: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["section"], r["label"], r["seed"]): r for r in runs}
    out: dict[str, Any] = {}
    for section in dict.fromkeys(r.section for r in rows):
        table = []
        for row in (r for r in rows if r.section == section):
            recs = sorted((v for (sec, label, _), v in by.items() if (sec, label) == (section, row.label)),
                          key=lambda v: v["seed"])
            pairs = [(v, by[(section, "all", v["seed"])]) for v in recs if (section, "all", v["seed"]) in by]
            table.append({
                **asdict(row), "seeds": [v["seed"] for v in recs],
                "per_seed_accuracy": [v["accuracy"] for v in recs],
                "accuracy": _iv([v["accuracy"] for v in recs]),
                "minus_all_points": _iv([100 * (v["accuracy"] - b["accuracy"]) for v, b in pairs]),
                "bytes_ratio": sum(v["bytes"] for v, _ in pairs) / sum(b["bytes"] for _, b in pairs),
                "max_gap_rounds": max((v["max_gap"] for v in recs if v["max_gap"] is not None), default=None),
                "seconds_mean": sum(v["seconds"] for v in recs) / max(1, len(recs)),
            })
        out[section] = table
    return out


def _checks(summary: dict[str, Any]) -> dict[str, bool]:
    rows = {r["label"]: r for r in summary.get("chunks", [])}
    checks: dict[str, bool] = {}
    if "chunks:0.5" in rows:
        half = rows["chunks:0.5"]
        checks["chunks:0.5 sends <= 0.55 of the all-layers bytes"] = half["bytes_ratio"] <= 0.55
        checks["chunks:0.5 every chunk uploaded at least every R = 2 rounds"] = half["max_gap_rounds"] <= 2
        checks["chunks:0.5 within 2 points of all layers (paired mean)"] = half["minus_all_points"]["mean"] >= -2.0
    return checks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sections", nargs="+", default=["chunks", "topk"], choices=["chunks", "topk"])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", help="also write the JSON here (e.g. benchmarks/json/selection.json)")
    ap.add_argument("--summarize", metavar="JSON",
                    help="run nothing: summarize again the runs recorded in this benchmark's earlier JSON")
    args = ap.parse_args()
    if args.summarize:
        earlier = json.loads(Path(args.summarize).read_text())
        config, measured, runs = earlier["config"], earlier["measured"], earlier["runs"]
        rows = tuple(r for r in ROWS if r.section in config["sections"])
    else:
        rows = tuple(r for r in ROWS if r.section in args.sections)
        jobs = [(row, args.rounds, seed) for row in rows for seed in args.seeds]
        started = time.perf_counter()
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            runs = list(pool.map(_run, jobs))
        config = {**vars(args), "dataset": "digits-fewshot", "last_k": 5}
        measured = {"utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                    "load_average_1min": os.getloadavg()[0], "python": platform.python_version(),
                    "torch": torch.__version__, "wall_seconds": time.perf_counter() - started}
    summary = summarize(rows, runs)
    report = {
        "config": config,
        "measured": measured,
        "sections": summary,
        "runs": runs,
        "checks": _checks(summary),
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
