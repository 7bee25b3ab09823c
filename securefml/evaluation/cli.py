"""``securefml eval``: the attack x defense matrix from the command line.

``add_eval_parser(subparsers)`` adds the sub-command to the main parser and ``run_eval(args)``
runs it.  Two presets: the default matrix (Karimireddy, He & Jaggi's setting on
``digits-skew``: 25 label-sorted clients all participating, 5 of them Byzantine, plus the
sanity attacks and backdoor defenses) and ``--quick`` (a smoke matrix of a few seconds per
cell).  Any flag given explicitly overrides the preset.  Records are saved after every cell
into ``--out``, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from securefml.cli_options import add_learning_options
from securefml.evaluation.api import evaluate
from securefml.evaluation.presets import PRESETS, evaluate_kwargs, preset
from securefml.evaluation.progress import ProgressBars
from securefml.evaluation.report import TITLES, markdown_table
from securefml.evaluation.resistance import resistance_markdown
from securefml.experiment import prepare_out_dir

__all__ = ["add_eval_parser", "run_eval", "preset", "ProgressBars", "PRESETS"]


_CUMULATIVE = {
    "tpr_cumulative": "cumulative detection TPR (last round), on the exclusions",
    "fpr_cumulative": "cumulative detection FPR (last round), on the exclusions",
    "tpr_cumulative_detector": "cumulative detection TPR (last round), on the detector's flags",
    "fpr_cumulative_detector": "cumulative detection FPR (last round), on the detector's flags",
}


def _metric_of(records: list[dict[str, Any]]) -> str:
    return next((str(r["metric"]) for r in records if r.get("metric")), "accuracy")


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` to the ``securefml`` sub-commands and return its parser."""
    p = subparsers.add_parser(
        "eval", help="attack x defense evaluation matrix",
        description="Run the attack x defense (x protocol x malicious fraction x seed) matrix; each cell is a "
                    "real federated run.  Writes eval.json, eval.csv, eval.md and heatmap_<metric>.png.",
    )
    p.add_argument("--quick", action="store_true", help="small smoke matrix (about a minute on 2 cores)")
    p.add_argument("--attacks", nargs="+", metavar="SPEC", help="attack specs, e.g. none ipm:epsilon=0.1 alie")
    p.add_argument("--defenses", nargs="+", metavar="SPEC",
                   help="defense specs, e.g. mean cclip krum:f=5 'bucketing:size=2>>median'")
    p.add_argument("--protocols", nargs="+", metavar="SPEC", help="protocol specs, e.g. plaintext ckks")
    p.add_argument("--malicious", nargs="+", type=float, metavar="FRACTION", help="malicious fractions")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED")
    p.add_argument("--dataset")
    p.add_argument("--algorithm")
    p.add_argument("--rounds", type=int)
    p.add_argument("--clients-per-round", type=int)
    add_learning_options(p)
    p.add_argument("--last-k", type=int,
                   help="also score each cell after each of its last K rounds and report their mean (default 5)")
    p.add_argument("--select", help="layer selection, as for `securefml run`")
    p.add_argument("--dataset-option", action="append", metavar="KEY=VALUE",
                   help="dataset option (repeatable); replaces the preset's options when given")
    p.add_argument("--device", default="cpu")
    p.add_argument("--engine", choices=["inprocess", "flower"], default="inprocess",
                   help="run every cell in-process or through Flower's simulation (the [flower] extra)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: fastest here)")
    p.add_argument("--out", default="results/eval", help="output folder (reused cells are read from it)")
    p.add_argument("--fresh", action="store_true", help="ignore cells already recorded in --out")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run_eval)
    return p


def _resolved(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS["quick" if getattr(args, "quick", False) else "default"]
    return {k: (getattr(args, k, None) if getattr(args, k, None) is not None else v) for k, v in preset.items()}


def run_eval(args: argparse.Namespace) -> int:
    """Run the matrix described by ``args`` (see ``add_eval_parser``); print where the reports are."""
    prepare_out_dir(args.out)  # a bad --out fails now, not after the whole matrix
    opts = _resolved(args)
    for key in ("outer_lr", "finetune_steps", "select", "device"):
        opts[key] = getattr(args, key, None)
    engine = {"engine": args.engine} if getattr(args, "engine", "inprocess") != "inprocess" else {}
    started = time.perf_counter()
    ev = evaluate(
        **evaluate_kwargs(opts), **engine, out=args.out, resume=not args.fresh, plots=not args.no_plots,
        threads=args.threads, progress=not args.no_progress,
    )
    seconds = time.perf_counter() - started
    # personalized accuracy is the headline: global accuracy of a meta-initialization is near
    # chance by design on the few-shot datasets, so alone it reads as if every defense failed
    metric_name = _metric_of(ev.records)
    for metric in ("personalized", "personalized_last_k", "global", "tpr_cumulative_detector",
                   "fpr_cumulative_detector", "tpr_cumulative", "fpr_cumulative"):
        table = markdown_table(ev.records, metric)
        if table and any(r.get(metric) is not None for r in ev.records):
            title = TITLES.get(metric, _CUMULATIVE.get(metric, metric)).format(metric=metric_name)
            print(f"\n## {title}\n{table}")
    resistance = resistance_markdown(ev.records, "personalized_last_k")
    if resistance:
        print(f"\n## resistance on the last-k mean (sorted by worst case)\n{resistance}")
    failed = [r for r in ev.records if r.get("error")]
    print(f"{len(ev.records)} cells ({ev.reused} reused, {len(failed)} failed) in {seconds:.1f} s")
    for name, path in ev.paths.items():
        print(f"{name}: {path}")
    return 0
