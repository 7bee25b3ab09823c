"""``securefml run | eval``: command-line entry points.  The only module that prints.

Start-up: ``securefml --help`` (or no sub-command) builds a parser that names the sub-commands
only, importing nothing beyond the standard library and the error tree, so it answers without
loading torch.  A sub-command builds the full parser, whose ``run --help`` lists the dataset,
algorithm, protocol, defense and attack names from the registries themselves.  Every usage
error, and every ``SecureFMLError`` raised while the run is assembled (before its first
round), is one ``securefml: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from securefml.cli_options import add_learning_options
from securefml.errors import SecureFMLError

if TYPE_CHECKING:
    from securefml.experiment import RunConfig, RunResult

__all__ = ["main", "build_parser", "format_table", "COMMANDS"]

#: The sub-commands and their one-line help (shown by ``securefml --help``).
COMMANDS = {
    "run": "one federated meta-learning run",
    "eval": "attack x defense evaluation matrix",
}


def registry_names() -> dict[str, list[str]]:
    """The names a run accepts, read from the registries (so help never drifts from the code)."""
    from securefml.attacks import ATTACKS
    from securefml.bayes import LEARNERS  # the learner registry, with the Bayesian learners added
    from securefml.data import DATASETS
    from securefml.defenses import DEFENSES
    from securefml.protocols import PROTOCOLS

    return {
        "datasets": DATASETS.names(), "algorithms": LEARNERS.names(), "protocols": PROTOCOLS.names(),
        "defenses": DEFENSES.names(), "attacks": ATTACKS.names(),
    }


def _names_epilog(names: dict[str, list[str]]) -> str:
    lines = ["names (from the registries; options as NAME:key=value,...):"]
    for kind, values in names.items():
        body = textwrap.fill(", ".join(values), width=96, subsequent_indent=" " * 14, break_on_hyphens=False,
                             break_long_words=False)
        lines.append(f"  {kind + ':':<11} {body}")
    return "\n".join(lines)


def _add_run_arguments(p: argparse.ArgumentParser, names: dict[str, list[str]]) -> None:
    p.add_argument("--dataset", default="digits-fewshot", help=f"one of: {', '.join(names['datasets'])}")
    p.add_argument("--algorithm", default="fomaml", help=f"one of: {', '.join(names['algorithms'])}")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--clients-per-round", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (the bundled models are small: one thread avoids contention)")
    add_learning_options(p)
    p.add_argument("--outer-steps", type=int)
    p.add_argument("--last-k", type=int, default=1,
                   help="also score after each of the last K rounds and report their mean beside the final one")
    p.add_argument("--hidden", type=_sizes, help="hidden layer widths of the MLP, e.g. 64,64 (default per dataset)")
    p.add_argument("--protocol", default="plaintext", help="plaintext | ckks[:preset=stats] | secagg[:k=v]")
    p.add_argument("--buckets", type=int, help="SecAgg bucketed mode: bucket size for robust rules")
    p.add_argument("--select", default="all", help="all | named:REGEX | topk:FRACTION | cedar[:WITHHOLD]")
    p.add_argument("--defense", default="mean", help="NAME[:k=v,...], pre-aggregators with >> (nnm>>krum:f=2)")
    p.add_argument("--attack", default="none",
                   help="NAME[:k=v,...]; several joined by '+' deal the malicious clients among them")
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
    dp.add_argument("--dp-min-survivors", type=int,
                    help="distributed: contributors the per-client noise is sized for (default: expected cohort)")
    dp.add_argument("--dp-insecure-seeded-noise", action="store_true",
                    help="INSECURE: draw DP noise and sampling coins from the run seed (reproducible runs only)")
    p.add_argument("--aggregation", default="mean",
                   help="mean | relevance[:temperature=T,include_self=true,min_effective=2,method=gradient,...]")
    p.add_argument("--architectures", help="heterogeneous Co-LoRA federation on digits-clusters, e.g. 32,64,64x64")
    p.add_argument("--engine", choices=["inprocess", "flower"], default="inprocess",
                   help="flower: run on Flower's simulation runtime (pip install 'securefml[flower]')")
    p.add_argument("--out", default="results/run", help="output folder for result.json")
    p.add_argument("--plots", action="store_true", help="also write reliability.png (classification runs)")
    p.add_argument("--no-progress", action="store_true")


_DESCRIPTION = (
    "Secure, robust, personalized federated meta-learning: `securefml run` trains one federation, "
    "`securefml eval` runs an attack x defense matrix.  `securefml COMMAND --help` for the options."
)


def build_parser(*, commands: bool = True) -> argparse.ArgumentParser:
    """The ``securefml`` parser; ``commands=False`` gives the light one that only names sub-commands."""
    parser = argparse.ArgumentParser(prog="securefml", description=_DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="log protocol/defense decisions")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    if not commands:
        for name, text in COMMANDS.items():
            sub.add_parser(name, help=text, add_help=False)
        return parser
    names = registry_names()
    run = sub.add_parser("run", help=COMMANDS["run"], description=COMMANDS["run"],
                         epilog=_names_epilog(names), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_arguments(run, names)
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
    from securefml.experiment import RunConfig

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
        architectures=args.architectures, engine=getattr(args, "engine", "inprocess"), last_k=args.last_k,
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
               "accountant": "accountant", "dp_min_survivors": "min_survivors"}
    opts: dict[str, Any] = {"mode": args.dp}
    for flag, key in mapping.items():
        value = getattr(args, flag)
        if value is not None:
            opts[key] = value
    if args.dp_insecure_seeded_noise:
        opts["insecure_seeded_noise"] = True
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
        *([(f"personalized {metric}, mean of last {m['personalized_last_k']['k']} rounds",
            f"{m['personalized_last_k']['mean']:.4f}")] if m.get("personalized_last_k", {}).get("k", 1) > 1 else []),
        ("bytes uploaded", f"{m['bytes_uploaded']:,}"),
        ("rejected messages", m["rejected"]),
        ("detection TPR / FPR", f"{_fmt(det['tpr'])} / {_fmt(det['fpr'])}"),
        ("wall seconds", f"{m['wall_seconds']:.1f}"),
    ]
    if pers.get("ece") is not None:
        at = [k for k, _ in rows].index("bytes uploaded")
        rows[at:at] = [
            ("personalized ECE / adaptive ECE", f"{pers['ece']:.4f} / {_fmt(pers['ece_adaptive'])}"),
            ("personalized NLL / Brier", f"{_fmt(pers['nll'])} / {_fmt(pers['brier'])}"),
            ("selective accuracy (80%) / OOD AUROC",
             f"{_fmt(pers['selective_accuracy'])} / {_fmt(pers.get('ood_auroc'))}"),
        ]
    if "privacy" in m:
        at = [k for k, _ in rows].index("detection TPR / FPR")
        rows.insert(at, ("privacy epsilon (max)", m["privacy"].get("epsilon_max")))
    if "relevance" in m and metric in m["relevance"]:
        rows.insert(6, (f"relevance-personalized {metric}", f"{m['relevance'][metric]:.4f}"))
    if "heterogeneous" in m:
        het = m["heterogeneous"]
        rows.append(("co-lora shared / alone", f"{het['shared']['accuracy']:.4f} / {het['alone']['accuracy']:.4f}"))
    if det.get("detector", {}).get("suspected_total"):  # a rule with a detector: its flags, before the cap
        at = [k for k, _ in rows].index("detection TPR / FPR")
        rows[at:at + 1] = [("detection TPR / FPR, excluded", rows[at][1]),
                           ("detection TPR / FPR, detector's flags",
                            f"{_fmt(det['detector']['tpr'])} / {_fmt(det['detector']['fpr'])}")]
    return rows


def _run(args: argparse.Namespace) -> int:
    from securefml.experiment import prepare_out_dir, run_experiment

    config = config_from_args(args)
    out = prepare_out_dir(args.out)  # before the run: a bad --out must not cost the results
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    bar: Any = None

    def on_start() -> None:  # everything is built and checked: the rounds begin
        nonlocal bar
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=config.rounds, desc="rounds", unit="round", file=sys.stderr)

    def on_round(rec: Any) -> None:
        if bar is not None:
            bar.set_postfix(loss=f"{rec.train_loss:.3f}", rejected=len(rec.rejected), flagged=len(rec.flagged))
            bar.update(1)

    try:
        if config.engine == "flower":
            try:
                from securefml.flower.engine import run as run_on_flower  # the [flower] extra
            except ImportError as exc:
                from securefml.errors import ConfigError

                raise ConfigError(f"--engine flower needs Flower: pip install 'securefml[flower]' ({exc})") from None
            result = run_on_flower(config)
        else:
            result = run_experiment(config, on_round=on_round, on_start=on_start)
    finally:
        if bar is not None:
            bar.close()
    path = result.save(out)
    print(format_table(summary_rows(result)))
    print(f"result: {path}")
    if args.plots:
        pers = result.metrics["personalized"]
        if "calibration" in pers:
            from securefml.evaluation.reliability import reliability_diagram

            cal = pers["calibration"]
            png = reliability_diagram(cal["reliability"], path.parent / "reliability.png",
                                      title=f"{config.algorithm} on {config.dataset}", ece=cal["pooled"]["ece"])
            print(f"reliability diagram: {png}")
        else:
            print("reliability diagram: skipped (not a classification run)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``securefml`` script and ``python -m securefml``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(commands=any(token in COMMANDS for token in argv))
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
