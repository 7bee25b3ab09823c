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
import sys
import time
from typing import Any

from securefml.errors import ConfigError
from securefml.evaluation.matrix import Cell
from securefml.evaluation.report import markdown_table
from securefml.evaluation.resistance import resistance_markdown
from securefml.server import RoundRecord

__all__ = ["add_eval_parser", "run_eval", "preset", "ProgressBars", "PRESETS"]

_KHJ_DATA = {"n_clients": 25, "n_heldout": 5, "classes_per_client": 2}

#: The two built-in matrices.  Keys are the parser's destinations.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "dataset": "digits-skew",
        "algorithm": "fedavg",
        "rounds": 30,
        "clients_per_round": 25,
        "inner_steps": 5,
        "inner_lr": 0.1,
        "server_opt": "adam",
        "server_lr": 0.02,
        "dataset_option": [f"{k}={v}" for k, v in _KHJ_DATA.items()],
        "attacks": ["none", "signflip:scale=10", "scaling:scale=100", "ipm:epsilon=0.1", "alie", "backdoor",
                    "meta-backdoor"],
        "defenses": ["mean", "cclip:tau=1", "geomed", "median", "krum:f=5", "bucketing:size=2>>median",
                     "bucketing:size=2>>krum:f=5", "normbound", "flame"],
        "protocols": ["plaintext"],
        "malicious": [0.2],
        "seeds": [0],
    },
    "quick": {
        "dataset": "digits-skew",
        "algorithm": "fedavg",
        "rounds": 10,
        "clients_per_round": 15,
        "inner_steps": 5,
        "inner_lr": 0.1,
        "server_opt": "adam",
        "server_lr": 0.02,
        "dataset_option": ["n_clients=15", "n_heldout=5", "classes_per_client=2"],
        "attacks": ["none", "signflip:scale=10", "ipm:epsilon=0.1", "backdoor"],
        "defenses": ["mean", "cclip:tau=1", "median", "krum:f=3"],
        "protocols": ["plaintext"],
        "malicious": [0.2],
        "seeds": [0],
    },
}


class ProgressBars:
    """Two tqdm bars on stderr: cells of the matrix, and rounds of the running cell."""

    def __init__(self, cells: int, rounds: int) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.rounds = rounds
        self.cells = tqdm(total=cells, desc="cells", unit="cell", file=sys.stderr, position=0)
        self.inner: Any = None

    def round_done(self, cell: Cell, rec: RoundRecord) -> None:
        if self.inner is None:
            label = f"{cell.attack_label} vs {cell.defense_label}"
            self.inner = self._tqdm(total=self.rounds, desc=label[:40], unit="round", file=sys.stderr,
                                    position=1, leave=False)
        self.inner.set_postfix(loss=f"{rec.train_loss:.3f}", flagged=len(rec.flagged))
        self.inner.update(1)

    def cell_done(self, cell: Cell, record: dict[str, Any], reused: bool) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None
        score = record.get("global")
        if reused:
            status = "reused"
        elif record.get("error"):
            status = "error"
        else:
            status = f"global={score:.3f}" if score is not None else "-"
        self.cells.set_postfix_str(f"{cell.attack_label} / {cell.defense_label}: {status}")
        self.cells.update(1)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
        self.cells.close()


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
    p.add_argument("--inner-steps", type=int)
    p.add_argument("--inner-lr", type=float)
    p.add_argument("--outer-lr", type=float)
    p.add_argument("--server-opt", choices=["sgd", "adam"])
    p.add_argument("--server-lr", type=float)
    p.add_argument("--finetune-steps", type=int)
    p.add_argument("--select", help="layer selection, as for `securefml run`")
    p.add_argument("--dataset-option", action="append", metavar="KEY=VALUE",
                   help="dataset option (repeatable); replaces the preset's options when given")
    p.add_argument("--device", default="cpu")
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


def _dataset_options(items: list[str]) -> dict[str, Any]:
    from securefml.registry import parse_spec

    return parse_spec("options:" + ",".join(items))[1] if items else {}


def _evaluate_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    """``evaluate`` keyword arguments from resolved preset/flag values."""
    kwargs: dict[str, Any] = {k: opts[k] for k in ("attacks", "defenses", "protocols", "malicious", "seeds")}
    for key in ("dataset", "algorithm", "rounds", "clients_per_round", "inner_steps", "inner_lr", "outer_lr",
                "server_opt", "server_lr", "finetune_steps", "select", "device"):
        if opts.get(key) is not None:
            kwargs[key] = opts[key]
    kwargs["dataset_options"] = _dataset_options(opts.get("dataset_option") or [])
    return kwargs


def preset(name: str = "default") -> dict[str, Any]:
    """The ``evaluate`` keyword arguments of a built-in matrix (``"default"`` or ``"quick"``).

    >>> sorted(preset("quick")["defenses"])
    ['cclip:tau=1', 'krum:f=3', 'mean', 'median']
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown evaluation preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return _evaluate_kwargs(dict(PRESETS[name]))


def run_eval(args: argparse.Namespace) -> int:
    """Run the matrix described by ``args`` (see ``add_eval_parser``); print where the reports are."""
    from securefml.evaluation.api import evaluate

    opts = _resolved(args)
    for key in ("outer_lr", "finetune_steps", "select", "device"):
        opts[key] = getattr(args, key, None)
    started = time.perf_counter()
    ev = evaluate(
        **_evaluate_kwargs(opts), out=args.out, resume=not args.fresh, plots=not args.no_plots,
        threads=args.threads, progress=not args.no_progress,
    )
    seconds = time.perf_counter() - started
    for title, metric in (("personalized accuracy", "personalized"), ("global accuracy", "global"),
                          ("cumulative detection TPR (last round)", "tpr_cumulative"),
                          ("cumulative detection FPR (last round)", "fpr_cumulative")):
        table = markdown_table(ev.records, metric)
        if table and any(r.get(metric) is not None for r in ev.records):
            print(f"\n{title}\n{table}")
    resistance = resistance_markdown(ev.records)
    if resistance:
        print(f"\nresistance (sorted by worst case)\n{resistance}")
    failed = [r for r in ev.records if r.get("error")]
    print(f"{len(ev.records)} cells ({ev.reused} reused, {len(failed)} failed) in {seconds:.1f} s")
    for name, path in ev.paths.items():
        print(f"{name}: {path}")
    return 0
