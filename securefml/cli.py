"""``securefml run | eval``: command-line entry points.  The only module that prints."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from securefml.data import DATASETS
from securefml.errors import SecureFMLError
from securefml.experiment import RunConfig, RunResult, run_experiment
from securefml.meta import LEARNERS

__all__ = ["main", "build_parser", "format_table"]


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits-fewshot", help=f"one of: {', '.join(DATASETS.names())}")
    p.add_argument("--algorithm", default="fomaml", help=f"one of: {', '.join(LEARNERS.names())}")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--clients-per-round", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (the bundled models are small: one thread avoids contention)")
    p.add_argument("--inner-steps", type=int)
    p.add_argument("--inner-lr", type=float)
    p.add_argument("--outer-lr", type=float)
    p.add_argument("--outer-steps", type=int)
    p.add_argument("--server-opt", choices=["sgd", "adam"])
    p.add_argument("--server-lr", type=float)
    p.add_argument("--finetune-steps", type=int, help="personalization steps on held-out clients")
    p.add_argument("--hidden", type=_sizes, help="hidden layer widths of the MLP, e.g. 64,64 (default per dataset)")
    p.add_argument("--protocol", default="plaintext", help="plaintext | ckks[:preset=stats] | secagg[:k=v]")
    p.add_argument("--buckets", type=int, help="SecAgg bucketed mode: bucket size for robust rules")
    p.add_argument("--select", default="all", help="all | named:REGEX | topk:FRACTION | cedar[:WITHHOLD]")
    p.add_argument("--defense", default="mean", help="NAME[:k=v,...], pre-aggregators with >> (nnm>>krum:f=2)")
    p.add_argument("--attack", default="none", help="NAME[:k=v,...]")
    p.add_argument("--malicious", type=float, default=0.0, help="fraction of training clients that are malicious")
    p.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                   help="dataset constructor option, e.g. k_shot=10 (repeatable)")
    dp = p.add_argument_group("differential privacy")
    dp.add_argument("--dp", choices=["none", "record", "user"], default="none",
                    help="record: Opacus DP-SGD in each client; user: clip + noise each client's update")
    dp.add_argument("--target-epsilon", type=float,
                    help="derive the noise multiplier from this epsilon (inf: clip only)")
    dp.add_argument("--delta", type=float)
    dp.add_argument("--noise-multiplier", type=float, help="sigma (record) or z (user), instead of a target")
    dp.add_argument("--max-grad-norm", type=float, help="record level: per-example clip norm C")
    dp.add_argument("--dp-clip", type=float, help="user level: per-client update clip norm S")
    dp.add_argument("--dp-placement", choices=["central", "distributed"], help="user level: who adds the noise")
    dp.add_argument("--accountant", choices=["rdp", "prv"])
    p.add_argument("--aggregation", default="mean",
                   help="mean | relevance[:temperature=T,include_self=true,min_effective=2,method=gradient,...]")
    p.add_argument("--architectures", help="heterogeneous Co-LoRA federation on digits-clusters, e.g. 32,64,64x64")
    p.add_argument("--out", default="results/run", help="output folder for result.json")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="securefml", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log protocol/defense decisions")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one federated meta-learning run")
    _add_run_arguments(run)
    from securefml.evaluation.cli import add_eval_parser

    add_eval_parser(sub)
    return parser


def _dataset_options(items: Sequence[str]) -> dict[str, Any]:
    from securefml.registry import parse_spec

    if not items:
        return {}
    _, opts = parse_spec("x:" + ",".join(items))
    return opts


def config_from_args(args: argparse.Namespace) -> RunConfig:
    protocol = args.protocol
    if args.buckets:
        protocol += ("," if ":" in protocol else ":") + f"buckets={args.buckets}"
    return RunConfig(
        dataset=args.dataset, algorithm=args.algorithm, rounds=args.rounds,
        clients_per_round=args.clients_per_round, seed=args.seed, device=args.device,
        inner_steps=args.inner_steps, inner_lr=args.inner_lr, outer_lr=args.outer_lr,
        outer_steps=args.outer_steps, server_opt=args.server_opt, server_lr=args.server_lr,
        finetune_steps=args.finetune_steps, protocol=protocol, select=args.select, defense=args.defense,
        attack=args.attack, malicious=args.malicious, dataset_options=_dataset_options(args.dataset_option),
        privacy=_privacy_options(args), hidden=args.hidden, aggregation=args.aggregation,
        architectures=args.architectures,
    )


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or any(n <= 0 for n in sizes):
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive integers, got {text!r}")
    return sizes


def _privacy_options(args: argparse.Namespace) -> dict[str, Any]:
    """Map the DP flags onto ``PrivacyConfig`` fields, leaving unset ones at their defaults."""
    mapping = {"target_epsilon": "target_epsilon", "delta": "delta", "noise_multiplier": "noise_multiplier",
               "max_grad_norm": "max_grad_norm", "dp_clip": "clip", "dp_placement": "placement",
               "accountant": "accountant"}
    opts: dict[str, Any] = {"mode": args.dp}
    for flag, key in mapping.items():
        value = getattr(args, flag)
        if value is not None:
            opts[key] = value
    return opts if args.dp != "none" else {}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[tuple[str, Any]]) -> str:
    """A two-column plain-text table."""
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(_fmt(v)) for _, v in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    body = [f"| {k.ljust(width)} | {_fmt(v).rjust(vwidth)} |" for k, v in rows]
    return "\n".join([line, *body, line])


def summary_rows(result: RunResult) -> list[tuple[str, Any]]:
    c, m = result.config, result.metrics
    pers, glob = m["personalized"], m["global"]
    metric = pers["metric"]
    det = m["detection"]
    rows: list[tuple[str, Any]] = [
        ("dataset / algorithm", f"{c['dataset']} / {c['algorithm']}"),
        ("protocol / selection", f"{c['protocol']} / {c['select']}"),
        ("attack / malicious", f"{c['attack']} / {c['malicious']:.0%}"),
        ("defense", c["defense"]),
        ("rounds", m["rounds"]),
        (f"personalized {metric} ({pers['steps']} steps)", f"{pers[metric]:.4f} +- {pers['std']:.4f}"),
        (f"global {metric} (no fine-tuning)", f"{glob[metric]:.4f} +- {glob['std']:.4f}"),
        ("bytes uploaded", f"{m['bytes_uploaded']:,}"),
        ("rejected messages", m["rejected"]),
        ("detection TPR / FPR", f"{_fmt(det['tpr'])} / {_fmt(det['fpr'])}"),
        ("wall seconds", f"{m['wall_seconds']:.1f}"),
    ]
    if "privacy" in m:
        rows.insert(9, ("privacy epsilon (max)", m["privacy"].get("epsilon_max")))
    if "relevance" in m and metric in m["relevance"]:
        rows.insert(6, (f"relevance-personalized {metric}", f"{m['relevance'][metric]:.4f}"))
    if "heterogeneous" in m:
        het = m["heterogeneous"]
        rows.append(("co-lora shared / alone", f"{het['shared']['accuracy']:.4f} / {het['alone']['accuracy']:.4f}"))
    return rows


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=config.rounds, desc="rounds", unit="round", file=sys.stderr)

    def on_round(rec: Any) -> None:
        if bar is not None:
            bar.set_postfix(loss=f"{rec.train_loss:.3f}", rejected=len(rec.rejected), flagged=len(rec.flagged))
            bar.update(1)

    try:
        result = run_experiment(config, on_round=on_round)
    finally:
        if bar is not None:
            bar.close()
    path = result.save(args.out)
    print(format_table(summary_rows(result)))
    print(f"result: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.INFO if args.verbose else logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "eval":
            from securefml.evaluation.cli import run_eval

            return run_eval(args)
    except SecureFMLError as exc:
        print(f"securefml: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
