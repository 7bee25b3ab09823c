"""Co-LoRA's smallest group: candidate changes measured on development seeds, one JSON.

    nice -n 10 python benchmarks/relevance_hetero_variants.py --variant base --seeds 10 11 ... --rows F.jsonl
    python benchmarks/relevance_hetero_variants.py --summarize F1.jsonl F2.jsonl ... [--out F]

The federation is the ``hetero`` section's of ``benchmarks/relevance.py`` (MLP shapes 32, 64,
64x64 with training shares 1/8, 5/16, 9/16 of 32 clients, 16 per round, 30 rounds, frozen family
backbone, Adam 0.01, rank 8, 96 held-out clients in equal shares, 5 fine-tuning steps).  A
variant changes one ``HeteroConfig`` field; each seed runs it shared (P, Q averaged across
architectures) and alone (within each architecture group) on the same data, and the row keeps
the per-architecture accuracies and the paired gain.  ``--rows`` appends one JSON line per seed
(a long sweep can stop and resume); ``--summarize`` turns the rows into the report: per variant
the mean gain per architecture with a paired 95 % Student-t interval over seeds.

The seeds are development seeds (10 and up), not the report's: a change is adopted or rejected
here before the report's seeds are run with it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from peers import write_report

from securefml.data import make_digits_clusters
from securefml.relevance import HeteroConfig, run_heterogeneous_budgets

SHAPES = "32,64,64x64"
SHARES = [0.125, 0.3125, 0.5625]
BASE: dict[str, Any] = dict(rounds=30, clients_per_round=16, local_steps=10, lr=0.01, optimizer="adam",
                            finetune_steps=5, rank=8)
#: variant -> HeteroConfig changes (the question each answers is in docs/relevance.md)
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "match_depth": {"match": "depth"},
    "shared_lr_2x": {"shared_lr": 0.02},
    "lr_half": {"lr": 0.005},
    "a_lr_0.001": {"a_lr": 0.001},
    # pre-trained frozen backbones (``securefml.relevance.pretrain``; data: the training clients' pooled images)
    "pretrain_family": {"pretrain": "family", "pretrain_steps": 300},
    "pretrain_family_100": {"pretrain": "family", "pretrain_steps": 100},
    "pretrain_family_30": {"pretrain": "family", "pretrain_steps": 30},
    "pretrain_independent": {"pretrain": "independent", "pretrain_steps": 300},
    # conflicting tasks (4 digits-clusters groups, every shape in every group), relevance-weighted P, Q and A, B
    "rela_groups4": {"relevance": True, "temperature": 0.2},
    # the same, evidence-gated: a client with >= m effective same-architecture contributors keeps its own P, Q
    "rela_groups4_evidence2": {"relevance": True, "temperature": 0.2, "own_evidence": 2.0},
    "rela_groups4_evidence4": {"relevance": True, "temperature": 0.2, "own_evidence": 4.0},
    # the same, support-split choice: each client picks lam in {0, 0.5, 1} of cross vs own P, Q on its support set
    "rela_groups4_choice": {"relevance": True, "temperature": 0.2, "support_choice": (0.0, 0.5, 1.0),
                            "choice_steps": 5, "choice_lr": 0.001},
}
#: variant -> make_digits_clusters changes (default: one task, groups=1)
VARIANT_DATA: dict[str, dict[str, Any]] = {
    "rela_groups4": {"groups": 4, "architectures_per_group": True},
    "rela_groups4_evidence2": {"groups": 4, "architectures_per_group": True},
    "rela_groups4_evidence4": {"groups": 4, "architectures_per_group": True},
    "rela_groups4_choice": {"groups": 4, "architectures_per_group": True},
}


#: held-out fine-tuning budgets (steps, Adam rate) scored after every training (one training per setting)
BUDGETS: tuple[tuple[int, float], ...] = ((0, 0.01), (5, 0.01), (10, 0.01), (20, 0.01), (5, 0.001), (20, 0.001),
                                         (20, 0.003))


def run_seed(variant: str, seed: int, heldout: int,
             args_budgets: tuple[tuple[int, float], ...] | None = None,
             alone_row: dict[str, Any] | None = None) -> dict[str, Any]:
    """One seed of ``variant``: shared and alone, scored after the configured and every ``BUDGETS`` budget.

    ``alone_row``: a kept row of the same seed and data whose alone run this variant's equals
    (a variant that changes only the shared run, e.g. ``own_evidence``, which ``share=False``
    ignores); its alone accuracies are copied instead of training the alone run again.
    """
    t0 = time.perf_counter()
    data = make_digits_clusters(**{"groups": 1, **VARIANT_DATA.get(variant, {})}, seed=seed, n_heldout=heldout,
                                k_shot=2, query=3, architectures=SHAPES, architecture_shares=SHARES,
                                heldout_architecture_shares=[1.0] * len(SHARES))
    row: dict[str, Any] = {"name": variant, "seed": seed, "by_budget": {}}
    for label, share in (("shared", True), ("alone", False)):
        if label == "alone" and alone_row is not None:
            row["alone"] = alone_row["alone"]
            row["alone_from"] = alone_row["name"]
            for k, v in alone_row["by_budget"].items():
                if k in row["by_budget"]:
                    row["by_budget"][k]["alone"] = v["alone"]
            continue
        cfg = HeteroConfig(**{**BASE, "seed": seed, "share": share, **VARIANTS[variant]})
        default = (cfg.finetune_steps, cfg.finetune_lr if cfg.finetune_lr is not None else cfg.lr)
        budgets = BUDGETS if args_budgets is None else args_budgets
        res = run_heterogeneous_budgets(data, cfg, (*budgets, default))
        row[label] = res[default].per_architecture
        if res[default].chosen_lambda:  # support-split choice: held-out clients' lam per shape, training counts
            chosen = res[default].chosen_lambda
            row["chosen_lambda"] = {a: {f"{lam:g}": sum(1 for c, v in chosen.items() if v == lam
                                                         and res[default].architecture_of[c] == a)
                                        for lam in sorted(set(chosen.values()))}
                                    for a in sorted(set(res[default].architecture_of.values()))}
            row["training_choices"] = {f"{lam:g}": n for lam, n in res[default].training_choices.items()}
        for k in budgets:
            row["by_budget"].setdefault(f"{k[0]}@{k[1]:g}", {})[label] = res[k].per_architecture
    row["gain"] = {a: round(row["shared"][a] - row["alone"][a], 4) for a in row["shared"]}
    row["s"] = round(time.perf_counter() - t0, 1)
    return row


def paired(gains: list[float]) -> dict[str, float]:
    from scipy import stats

    n = len(gains)
    mean = statistics.fmean(gains)
    if n < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "n": float(n)}
    half = float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(gains) / n**0.5
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": float(n)}


def _budget_order(key: str) -> tuple[float, int]:
    steps, _, rate = key.partition("@")
    return (-float(rate), int(steps))


def _by_budget(rows: list[dict[str, Any]], archs: list[str]) -> dict[str, Any]:
    """Per held-out fine-tuning budget: mean shared and alone accuracy and the paired gain (rows that have it)."""
    have = [r for r in rows if r.get("by_budget")]
    out: dict[str, Any] = {}
    for k in sorted({k for r in have for k in r["by_budget"]}, key=_budget_order):
        rs = [r["by_budget"][k] for r in have if k in r["by_budget"]]
        out[k] = {"shared": {a: statistics.fmean(r["shared"][a] for r in rs) for a in archs},
                  "alone": {a: statistics.fmean(r["alone"][a] for r in rs) for a in archs},
                  "gain_ci95": {a: paired([r["shared"][a] - r["alone"][a] for r in rs]) for a in archs}}
    return out


def summarize(paths: list[str]) -> dict[str, Any]:
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for path in paths:
        with open(path) as fh:
            for line in fh:
                if line.strip():
                    r = json.loads(line)
                    rows.setdefault(r["name"], {})[int(r["seed"])] = r
    out: dict[str, Any] = {}
    for name, by_seed in rows.items():
        seeds = sorted(by_seed)
        archs = sorted(by_seed[seeds[0]]["gain"])
        out[name] = {
            "changes": VARIANTS.get(name, {}), "data_changes": VARIANT_DATA.get(name, {}), "seeds": seeds,
            "alone": {a: statistics.fmean(by_seed[s]["alone"][a] for s in seeds) for a in archs},
            "shared": {a: statistics.fmean(by_seed[s]["shared"][a] for s in seeds) for a in archs},
            "gain_ci95": {a: paired([by_seed[s]["gain"][a] for s in seeds]) for a in archs},
            "per_seed_gain": {a: [by_seed[s]["gain"][a] for s in seeds] for a in archs},
            "by_finetune_budget": _by_budget([by_seed[s] for s in seeds], archs),
            "seconds_per_seed": statistics.fmean(by_seed[s]["s"] for s in seeds),
        }
        if all("chosen_lambda" in by_seed[s] for s in seeds):  # support-split choice: counts over the seeds
            out[name]["heldout_chosen_lambda"] = {
                a: {lam: sum(by_seed[s]["chosen_lambda"][a].get(lam, 0) for s in seeds)
                    for lam in sorted({k for s in seeds for k in by_seed[s]["chosen_lambda"][a]}, key=float)}
                for a in archs}
            out[name]["training_choices"] = {
                lam: sum(by_seed[s]["training_choices"].get(lam, 0) for s in seeds)
                for lam in sorted({k for s in seeds for k in by_seed[s]["training_choices"]}, key=float)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10, 20)))
    ap.add_argument("--heldout", type=int, default=96, help="held-out clients, equal shares of the shapes")
    ap.add_argument("--rows", help="append one JSON line per seed here")
    ap.add_argument("--budgets", nargs="*", metavar="STEPS@RATE",
                    help="held-out fine-tuning budgets to score (default: every one of BUDGETS)")
    ap.add_argument("--alone-from", nargs=2, metavar=("JSONL", "VARIANT"),
                    help="copy the alone run from VARIANT's rows in JSONL (same seed and data) instead of training it")
    ap.add_argument("--summarize", nargs="+", metavar="JSONL")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.summarize:
        write_report({"base_config": BASE, "shapes": SHAPES, "training_shares": SHARES, "heldout_clients": args.heldout,
                      "note": "development seeds; timings taken on a shared, loaded 2-core machine",
                      "variants": summarize(args.summarize)}, args.out)
        return
    if not args.variant:
        ap.error("--variant or --summarize is required")
    torch.set_num_threads(1)
    budgets = None if args.budgets is None else tuple(
        (int(b.partition("@")[0]), float(b.partition("@")[2] or 0.01)) for b in args.budgets)
    kept: dict[int, dict[str, Any]] = {}
    if args.alone_from:
        if VARIANT_DATA.get(args.alone_from[1]) != VARIANT_DATA.get(args.variant):
            ap.error(f"{args.alone_from[1]} runs on other data than {args.variant}")
        with open(args.alone_from[0]) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        kept = {int(r["seed"]): r for r in rows if r["name"] == args.alone_from[1]}
    for seed in args.seeds:
        if args.alone_from and seed not in kept:
            ap.error(f"no {args.alone_from[1]} row of seed {seed} in {args.alone_from[0]}")
        row = run_seed(args.variant, seed, args.heldout, budgets, kept.get(seed))
        print(json.dumps(row), flush=True)
        if args.rows:
            with open(args.rows, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
