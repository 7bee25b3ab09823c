"""Robustness on heterogeneous meta-learning clients: worst case over attacks, detection, selection; JSON.

    python benchmarks/robustness.py --sections selection detection matrix [--rounds 60] [--seeds 0 1 2]
                                    [--malicious 0.2 0.25] [--detection-rounds 100] [--selection-rounds 200]
                                    [--workers 2] [--cache results/robustness-runs.jsonl]
                                    [--out benchmarks/json/robustness.json]

Every number is a real federated run (``run_experiment``).  Each run's summary is appended to
``--cache`` (one JSON line, keyed by its complete configuration) as soon as it finishes, so an
interrupted benchmark resumes where it stopped and a partial one still reports what finished;
``--workers`` runs that many at a time (one torch thread each).  Accuracy is the personalized
accuracy of the held-out clients as the **mean of the last k evaluation rounds** (``--last-k``,
default 5; the final round alone is kept beside it).

``selection``: digits-fewshot FOMAML, 10 clients per round, ``--selection-rounds`` rounds: all
layers; all layers for half the rounds (the same uploaded bytes as a 50 % budget); the
layer-granular ``topk`` rotation at 50 %; chunked rotation at 50 % with and without error
feedback, dictated and staggered.

``detection``: digits-fewshot FOMAML, 25 % unit-scale sign flippers, 100 clients, 8 per round:
the reputation detector's cumulative TPR/FPR (every client seen so far, counted at its latest
participation) every 10 rounds, and the pooled per-round rates, per protocol and seed, counted
twice from the same run: on the clients the detector flagged (``RoundRecord.suspected``; the
target is judged on these) and on the ones the defense excluded (``RoundRecord.flagged``: at
most ``(n - 1) // 2`` of a cohort).

``protocols``: the recommended default under CKKS (on the decrypted Gram) and bucketed SecAgg
(bucket-level reputation, ``recommended:secagg-buckets``) against the same plaintext runs (matrix's first setting and
fraction; ``--protocol-attacks``), per-seed differences.

``matrix``: for each setting (digits-fewshot with FOMAML and MAML, digits-skew with FedAvg),
each defense and each malicious fraction, accuracy with no attack ("clean") and under every
attack; per defense the worst case over the attacks (per seed, then averaged), the drop from
clean, and the gap of its clean accuracy to the plain mean's, each a mean over seeds with a
95 % t-interval.  Rows are sorted by worst case.  ``complete`` says whether every run of a row
finished (a partial run reports the rows it has).

``demo``: the ``make run`` setting (digits-fewshot FOMAML, 40 clients, 8 per round,
``--demo-rounds`` rounds, 25 % unit sign flippers or none), in plaintext: the recommended default,
the previous default (``reputation>>medclip>>mean``) and each of its parts alone against the plain
mean, per seed.

Nothing is compared with a constant from an earlier run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from peers import write_report

from securefml.defenses import PREVIOUS_RECOMMENDED_SPEC
from securefml.errors import SecureFMLError
from securefml.experiment import RunConfig, run_experiment

SETTINGS = [("digits-fewshot", "fomaml"), ("digits-fewshot", "maml"), ("digits-skew", "fedavg")]
DEFENSES = ["mean", "recommended", "nnm>>cclip", "geomed", "arc>>nnm>>multikrum", "caf", "median"]
ATTACKS = ["signflip:scale=1", "signflip:scale=10", "alie", "ipm", "mimic", "optimal-alie", "optimal-ipm"]
SELECTIONS = [
    ("all", 1.0),
    ("all", 0.5),  # half the rounds: the bytes of a 50 % budget
    ("topk:fraction=0.5,server_dictated=true", 1.0),
    ("chunks:fraction=0.5,error_feedback=false", 1.0),
    ("chunks:0.5", 1.0),
    ("chunks:fraction=0.5,staggered=true,error_feedback=false", 1.0),
]
# t quantiles (0.975) for 1..10 degrees of freedom
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


def interval(values: list[float]) -> dict[str, float | None]:
    """Mean and 95 % t-interval half-width over seeds (None for a single seed)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": m, "ci95": None}
    t = _T975[min(len(values) - 1, len(_T975)) - 1]
    return {"mean": m, "ci95": t * statistics.stdev(values) / math.sqrt(len(values))}


def key_of(cfg: RunConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True, default=str)


def summarize(cfg: RunConfig) -> dict[str, Any]:
    """Run one configuration and keep what the sections report (an error record if the run raised)."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        res = run_experiment(cfg)
    except SecureFMLError as exc:  # e.g. an attack undefined for one round's cohort: record it, go on
        return {"key": key_of(cfg), "error": f"{type(exc).__name__}: {exc}",
                "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    m = res.metrics
    det = m["detection"]
    cum = det["cumulative"]
    return {
        # per round: who took part, who was flagged, the aggregate's norm (plaintext vs CKKS)
        # (and who the detector flagged: ``suspected``, flagged whether or not the cap let it through)
        "rounds": [{"cohort": h["cohort"], "flagged": h["flagged"], "suspected": h.get("suspected", []),
                    "update_norm": h["update_norm"]} for h in res.history],
        "key": key_of(cfg),
        "final": m["personalized"]["accuracy"],
        "last_k": m["personalized_last_k"]["mean"],
        "bytes": m["bytes_uploaded"],
        "cumulative": [{k: c[k] for k in ("round", "tpr", "fpr")} for c in cum],
        "cumulative_detector": [{k: c[k] for k in ("round", "tpr", "fpr")} for c in det["detector"]["cumulative"]],
        "pooled_per_round_detector": {"tpr": det["detector"]["tpr"], "fpr": det["detector"]["fpr"]},
        "malicious_ids": list(det["malicious_ids"]),
        "pooled_per_round": {"tpr": det["tpr"], "fpr": det["fpr"]},
        "seconds": time.perf_counter() - started,
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


class Runner:
    """Runs configurations (``workers`` at a time), reusing and appending to a JSONL cache."""

    def __init__(self, cache: Path, workers: int) -> None:
        self.cache = cache
        self.workers = max(1, workers)
        self.done: dict[str, dict[str, Any]] = {}
        if cache.exists():
            for line in cache.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.done[rec["key"]] = rec

    def run(self, configs: Iterable[RunConfig]) -> None:
        todo = {key_of(c): c for c in configs if key_of(c) not in self.done}
        if not todo:
            return
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        with ProcessPoolExecutor(self.workers, mp_context=get_context("spawn")) as pool, \
                self.cache.open("a") as sink:
            futures = {pool.submit(summarize, c): k for k, c in todo.items()}
            for fut in as_completed(futures):
                rec = fut.result()
                self.done[rec["key"]] = rec
                sink.write(json.dumps(rec) + "\n")
                sink.flush()

    def get(self, cfg: RunConfig) -> dict[str, Any] | None:
        """The run's summary; None if it has not run or it raised (see ``errors``)."""
        rec = self.done.get(key_of(cfg))
        return None if rec is None or "error" in rec else rec

    def errors(self, configs: Iterable[RunConfig]) -> list[dict[str, Any]]:
        """The planned runs that raised: their configuration's coordinates and the error."""
        out = []
        for c in configs:
            rec = self.done.get(key_of(c))
            if rec is not None and "error" in rec:
                out.append({"dataset": c.dataset, "algorithm": c.algorithm, "defense": c.defense, "attack": c.attack,
                            "malicious": c.malicious, "seed": c.seed, "rounds": c.rounds, "error": rec["error"]})
        return out


def _machine() -> dict[str, Any]:
    return {"utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "load_avg": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__, "torch_threads": 1,
            "python": platform.python_version()}


# -- selection ------------------------------------------------------------------------------
def selection_config(args: argparse.Namespace, spec: str, share: float, seed: int) -> RunConfig:
    return RunConfig(dataset="digits-fewshot", algorithm="fomaml", rounds=max(1, int(args.selection_rounds * share)),
                     clients_per_round=10, seed=seed, select=spec, last_k=args.last_k)


def _selections(args: argparse.Namespace) -> list[tuple[str, float]]:
    return [(spec, share) for spec, share in SELECTIONS if args.selections is None or spec in args.selections]


def selection_configs(args: argparse.Namespace) -> list[RunConfig]:
    return [selection_config(args, spec, share, seed) for spec, share in _selections(args) for seed in args.seeds]


def selection(args: argparse.Namespace, runner: Runner) -> list[dict[str, Any]]:
    out = []
    full = {s: runner.get(selection_config(args, "all", 1.0, s)) for s in args.seeds}
    for spec, share in _selections(args):
        recs = [(s, r) for s in args.seeds if (r := runner.get(selection_config(args, spec, share, s))) is not None]
        if not recs:
            continue
        paired = [(r, full[s]) for s, r in recs if full[s] is not None]
        out.append({
            "select": spec, "rounds": max(1, int(args.selection_rounds * share)), "seeds": [s for s, _ in recs],
            "last_k": interval([r["last_k"] for _, r in recs]), "final": interval([r["final"] for _, r in recs]),
            "bytes_vs_all": statistics.fmean(r["bytes"] / f["bytes"] for r, f in paired) if paired else None,
            "minus_all_layers": interval([r["last_k"] - f["last_k"] for r, f in paired]) if paired else None,
        })
    return out


# -- detection ------------------------------------------------------------------------------
def detector_for(args: argparse.Namespace, protocol: str) -> str:
    """``--detector``; ``recommended`` under bucketed SecAgg is its own default (bucket-level reputation)."""
    return "recommended:secagg-buckets" if args.detector == "recommended" and "buckets" in protocol else args.detector


def detection_config(args: argparse.Namespace, protocol: str, seed: int) -> RunConfig:
    return RunConfig(dataset="digits-fewshot", algorithm="fomaml", rounds=args.detection_rounds, clients_per_round=8,
                     seed=seed, protocol=protocol, defense=detector_for(args, protocol), attack="signflip:scale=1",
                     malicious=0.25, last_k=args.last_k)


def divergence_config(args: argparse.Namespace, protocol: str, seed: int) -> RunConfig:
    return replace(detection_config(args, protocol, seed), rounds=args.divergence_rounds)


def divergence(args: argparse.Namespace, runner: Runner) -> list[dict[str, Any]]:
    """Plaintext vs CKKS detection runs of the same seed, round by round.

    The two make the same decisions on the same inputs (unit-tested); this shows where and why
    two *runs* part: the rounds with the same cohort and the same flags, and the relative
    difference of the aggregate's norm (CKKS rounding, amplified by training).
    """
    out = []
    for seed in args.divergence_seeds:
        a = runner.get(divergence_config(args, "plaintext", seed))
        b = runner.get(divergence_config(args, "ckks", seed))
        if a is None or b is None or "rounds" not in a or "rounds" not in b:
            continue
        pairs = list(zip(a["rounds"], b["rounds"]))
        same_flags = [x["flagged"] == y["flagged"] for x, y in pairs]
        rel = [abs(x["update_norm"] - y["update_norm"]) / max(abs(x["update_norm"]), 1e-30) for x, y in pairs]
        out.append({
            "seed": seed,
            "same_cohorts_all_rounds": all(x["cohort"] == y["cohort"] for x, y in pairs),
            "first_round_with_different_flags": same_flags.index(False) if False in same_flags else None,
            "rounds_with_same_flags": sum(same_flags), "rounds": len(pairs),
            "aggregate_norm_relative_difference": {
                str(r): rel[r] for r in sorted({0, 1, 2, 5, 10, 20, 50, len(rel) - 1}) if r < len(rel)},
            "flagged_per_round": [len(x["flagged"]) for x in a["rounds"]],
        })
    return out


def per_round_rates(rec: dict[str, Any], key: str = "flagged") -> list[dict[str, Any]]:
    """Each round's TPR / FPR over that round's cohort (None where the cohort had no such client).

    ``key``: ``"flagged"`` scores the clients the defense excluded, ``"suspected"`` the ones its
    detector flagged (excluded or not).
    """
    bad = set(rec["malicious_ids"])
    out = []
    for i, r in enumerate(rec["rounds"]):
        flagged = set(r[key])
        pos = [c for c in r["cohort"] if c in bad]
        neg = [c for c in r["cohort"] if c not in bad]
        out.append({"round": i, "malicious": len(pos), "flagged": len(flagged & set(r["cohort"])),
                    "tpr": sum(c in flagged for c in pos) / len(pos) if pos else None,
                    "fpr": sum(c in flagged for c in neg) / len(neg) if neg else None})
    return out


def _pooled(rows: list[dict[str, Any]], rec: dict[str, Any], key: str = "flagged") -> dict[str, float | None]:
    bad = set(rec["malicious_ids"])
    tp = fp = pos = neg = 0
    for row in rows:
        r = rec["rounds"][row["round"]]
        flagged = set(r[key])
        for c in r["cohort"]:
            if c in bad:
                pos += 1
                tp += c in flagged
            else:
                neg += 1
                fp += c in flagged
    return {"tpr": tp / pos if pos else None, "fpr": fp / neg if neg else None}


def _met(c: dict[str, Any]) -> bool:
    """Issue 18's detection target on one cumulative point: TPR >= 0.8 at FPR <= 0.1."""
    return c["tpr"] is not None and c["fpr"] is not None and c["tpr"] >= 0.8 and c["fpr"] <= 0.1


def detection(args: argparse.Namespace, runner: Runner) -> list[dict[str, Any]]:
    """Cumulative and per-round detection, counted two ways (both from the same run).

    *Excluded* (``final_cumulative``, ``per_round``...): a client counts as detected when the
    defense excluded it at its latest participation; ``Reputation`` excludes at most
    ``(n - 1) // 2`` of a cohort, so this is the action, capped.  *Detector*
    (``..._detector``): when the detector flagged it at its latest participation
    (``RoundRecord.suspected``), excluded or not.  ``target_met`` is judged on the detector's
    flags (they are its detection); ``target_met_excluded`` beside it.
    """
    out = []
    for protocol in args.detection_protocols:
        for seed in args.seeds:
            rec = runner.get(detection_config(args, protocol, seed))
            if rec is None:
                continue
            cum = rec["cumulative"]
            row: dict[str, Any] = {
                "protocol": protocol, "seed": seed, "defense": detector_for(args, protocol),
                "final_cumulative": {"tpr": cum[-1]["tpr"], "fpr": cum[-1]["fpr"]},
                "cumulative_every_10": cum[9::10],
                "pooled_per_round": rec["pooled_per_round"],
                **({"per_round": (per := per_round_rates(rec)), "pooled_last_10_rounds": _pooled(per[-10:], rec)}
                   if "malicious_ids" in rec else {}),
                "accuracy_last_k": rec["last_k"], "accuracy_final": rec["final"],
                "target_met_excluded": _met(cum[-1]),
                "target_met": _met(cum[-1]),
                "seconds": rec["seconds"],
            }
            det = rec.get("cumulative_detector")
            if det:  # runs recorded before the detector's flags were kept have only the exclusions
                per_d = per_round_rates(rec, "suspected")
                row.update({
                    "final_cumulative_detector": {"tpr": det[-1]["tpr"], "fpr": det[-1]["fpr"]},
                    "cumulative_every_10_detector": det[9::10],
                    "pooled_per_round_detector": rec["pooled_per_round_detector"],
                    "per_round_detector": per_d,
                    "pooled_last_10_rounds_detector": _pooled(per_d[-10:], rec, "suspected"),
                    "target_met_detector": _met(det[-1]),
                    "target_met": _met(det[-1]),
                    "counted_on": "detector",
                })
            else:
                row["counted_on"] = "excluded"
            out.append(row)
    return out


# -- protocols ------------------------------------------------------------------------------
# (protocol, defense, plaintext peer): CKKS runs the plaintext default on the decrypted Gram; bucketed
# SecAgg reveals bucket sums and the public bucket membership: its default (bucket-level reputation)
# beside the rules without membership; the previous default under CKKS against itself in plaintext
PREVIOUS = PREVIOUS_RECOMMENDED_SPEC
PROTOCOLS = [("ckks", "recommended", "recommended"), ("ckks", PREVIOUS, PREVIOUS),
             ("secagg:buckets=2", "recommended:secagg-buckets", "recommended"),
             ("secagg:buckets=2", "medclip:history=10>>mean", "recommended"),
             ("secagg:buckets=2", "cclip", "recommended"), ("secagg:buckets=2", "medclip>>mean", "recommended"),
             ("secagg:buckets=2", "medclip>>cclip", "recommended")]


def protocol_config(args: argparse.Namespace, protocol: str, defense: str, attack: str, seed: int) -> RunConfig:
    """The matrix's first setting and first malicious fraction, under another protocol."""
    base = matrix_config(args, args.settings[0], args.malicious[0], "recommended", attack, seed)
    return replace(base, protocol=protocol, defense=defense, rounds=args.protocol_rounds or args.rounds)


def _protocol_rows(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    wanted = args.protocol_defenses
    return [(p, d, peer) for p, d, peer in PROTOCOLS if not wanted or d in wanted]


def protocol_configs(args: argparse.Namespace) -> list[RunConfig]:
    rows = _protocol_rows(args)
    return ([protocol_config(args, p, d, a, s) for p, d, _ in rows for a in args.protocol_attacks for s in args.seeds]
            + [protocol_config(args, "plaintext", peer, a, s) for peer in dict.fromkeys(peer for _, _, peer in rows)
               for a in args.protocol_attacks for s in args.seeds])


def protocols(args: argparse.Namespace, runner: Runner) -> list[dict[str, Any]]:
    """The recommended default under CKKS and bucketed SecAgg against the same runs in plaintext.

    Same dataset, algorithm, cohorts, attack and seed; ``minus_plaintext`` is the per-seed
    difference of the last-k accuracy (mean and 95 % interval over seeds), ``within_1_point``
    whether its mean is within 0.01.
    """
    out = []
    for protocol, defense, peer in _protocol_rows(args):
        for attack in args.protocol_attacks:
            pairs = []
            for seed in args.seeds:
                a = runner.get(protocol_config(args, protocol, defense, attack, seed))
                b = runner.get(protocol_config(args, "plaintext", peer, attack, seed))
                if a is not None and b is not None:
                    pairs.append((seed, a, b))
            if not pairs:
                continue
            diff = interval([a["last_k"] - b["last_k"] for _, a, b in pairs])
            out.append({
                "protocol": protocol, "defense": defense, "plaintext_defense": peer, "attack": attack,
                "setting": args.settings[0],
                "rounds": args.protocol_rounds or args.rounds,
                "malicious": args.malicious[0], "seeds": [s for s, _, _ in pairs],
                "last_k": interval([a["last_k"] for _, a, _ in pairs]),
                "plaintext_last_k": interval([b["last_k"] for _, _, b in pairs]),
                "minus_plaintext": diff, "within_1_point": abs(diff["mean"]) <= 0.01,
                "seconds": statistics.fmean(a["seconds"] for _, a, _ in pairs),
                "plaintext_seconds": statistics.fmean(b["seconds"] for _, _, b in pairs),
            })
    return out


# -- demo -----------------------------------------------------------------------------------
# The `make run` setting (40 clients, 8 per round, 60 rounds), in plaintext: which part of the
# recommended default costs accuracy without an attack there (issue 18), component by component
DEMO_DEFENSES = ["mean", "recommended", PREVIOUS_RECOMMENDED_SPEC, "medclip>>mean", "reputation>>mean"]
DEMO_ATTACKS = ["none", "signflip"]


def demo_config(args: argparse.Namespace, defense: str, attack: str, seed: int) -> RunConfig:
    return RunConfig(dataset="digits-fewshot", algorithm="fomaml", rounds=args.demo_rounds, clients_per_round=8,
                     seed=seed, defense=defense, attack=attack, malicious=0.25, last_k=args.last_k,
                     dataset_options={"n_train": 40})


def demo_configs(args: argparse.Namespace) -> list[RunConfig]:
    return [demo_config(args, d, a, s) for d in DEMO_DEFENSES for a in DEMO_ATTACKS for s in args.seeds]


def demo(args: argparse.Namespace, runner: Runner) -> list[dict[str, Any]]:
    """Per defense and attack: last-k accuracy, its difference to the plain mean's (same seed and
    attack), and the share of participations the defense flagged (every one a false positive
    without an attack)."""
    out = []
    for defense in DEMO_DEFENSES:
        for attack in DEMO_ATTACKS:
            pairs = []
            for seed in args.seeds:
                a = runner.get(demo_config(args, defense, attack, seed))
                b = runner.get(demo_config(args, "mean", attack, seed))
                if a is not None and b is not None:
                    pairs.append((seed, a, b))
            if not pairs:
                continue
            flagged = [sum(len(r["flagged"]) for r in a["rounds"]) / max(1, sum(len(r["cohort"]) for r in a["rounds"]))
                       for _, a, _ in pairs]
            out.append({
                "defense": defense, "attack": attack, "rounds": args.demo_rounds, "seeds": [s for s, _, _ in pairs],
                "last_k": interval([a["last_k"] for _, a, _ in pairs]),
                "per_seed": [round(a["last_k"], 4) for _, a, _ in pairs],
                "minus_mean": interval([a["last_k"] - b["last_k"] for _, a, b in pairs]),
                "flagged_share": interval(flagged),
            })
    return out


# -- matrix ---------------------------------------------------------------------------------
def matrix_config(args: argparse.Namespace, setting: str, frac: float, defense: str, attack: str,
                  seed: int) -> RunConfig:
    dataset, algorithm = setting.split("/")
    return RunConfig(dataset=dataset, algorithm=algorithm, rounds=args.rounds, clients_per_round=args.clients_per_round,
                     seed=seed, defense=defense, attack=attack, malicious=frac, last_k=args.last_k)


def matrix_configs(args: argparse.Namespace) -> list[RunConfig]:
    # setting-major, then defense, in the order given: a partial run has every seed and attack of
    # the first (setting, defense) pairs
    return [matrix_config(args, st, frac, d, a, seed) for st in args.settings for d in args.defenses
            for seed in args.seeds for frac in args.malicious for a in ["none", *args.attacks]]


def matrix(args: argparse.Namespace, runner: Runner) -> list[dict[str, Any]]:
    out = []
    for setting in args.settings:
        dataset, algorithm = setting.split("/")
        for frac in args.malicious:
            rows = []
            for defense in args.defenses:
                per_attack: dict[str, dict[int, float]] = {}
                for attack in ["none", *args.attacks]:
                    for seed in args.seeds:
                        rec = runner.get(matrix_config(args, setting, frac, defense, attack, seed))
                        if rec is not None:
                            per_attack.setdefault(attack, {})[seed] = rec["last_k"]
                clean_by_seed = per_attack.pop("none", {})
                # a seed counts when its clean run and every attack run finished; an attack run that
                # raised (e.g. ALIE undefined for a cohort with a Byzantine majority) is left out of
                # that seed's worst case and listed under "raised"
                raised = {a: [s for s in args.seeds if (rec := runner.done.get(key_of(
                    matrix_config(args, setting, frac, defense, a, s)))) is not None and "error" in rec]
                    for a in args.attacks}
                raised = {a: v for a, v in raised.items() if v}
                seeds = [s for s in args.seeds if s in clean_by_seed
                         and all(s in per_attack.get(a, {}) or s in raised.get(a, []) for a in args.attacks)]
                if not seeds:
                    continue
                ran = {s: [a for a in args.attacks if s in per_attack.get(a, {})] for s in seeds}
                worst = [min(per_attack[a][s] for a in ran[s]) for s in seeds]
                clean = [clean_by_seed[s] for s in seeds]
                means = {a: statistics.fmean(v[s] for s in seeds if s in v) for a, v in per_attack.items()
                         if any(s in v for s in seeds)}
                rows.append({
                    "defense": defense, "seeds": seeds, "complete": len(seeds) == len(args.seeds) and not raised,
                    "clean": interval(clean),
                    "worst_case": interval(worst),
                    "worst_attack": min(means, key=means.__getitem__),
                    "drop_from_clean": interval([c - w for c, w in zip(clean, worst)]),
                    "per_attack": {a: interval([per_attack[a][s] for s in seeds if s in per_attack.get(a, {})])
                                   for a in args.attacks if any(s in per_attack.get(a, {}) for s in seeds)},
                    "raised": raised,
                    "_clean": dict(zip(seeds, clean)),
                })
            mean_row = next((r for r in rows if r["defense"] == "mean"), None)
            for r in rows:
                if mean_row is not None:
                    both = [s for s in r["seeds"] if s in mean_row["_clean"]]
                    r["clean_minus_mean_clean"] = interval([r["_clean"][s] - mean_row["_clean"][s] for s in both]) \
                        if both else None
            for r in rows:
                del r["_clean"]
            rows.sort(key=lambda r: r["worst_case"]["mean"], reverse=True)
            if rows:
                out.append({"dataset": dataset, "algorithm": algorithm, "malicious": frac, "rows": rows})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", nargs="+", default=["selection", "detection", "divergence", "protocols", "matrix"],
                    choices=["selection", "detection", "divergence", "protocols", "matrix", "demo"])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--clients-per-round", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--malicious", type=float, nargs="+", default=[0.2, 0.25])
    ap.add_argument("--defenses", nargs="+", default=DEFENSES)
    ap.add_argument("--settings", nargs="+", default=[f"{d}/{a}" for d, a in SETTINGS],
                    help="dataset/algorithm pairs, e.g. digits-fewshot/fomaml")
    ap.add_argument("--attacks", nargs="+", default=ATTACKS)
    ap.add_argument("--last-k", type=int, default=5)
    ap.add_argument("--selection-rounds", type=int, default=200)
    ap.add_argument("--selections", nargs="+", help="only these selection specs (default: every one of SELECTIONS)")
    ap.add_argument("--detection-rounds", type=int, default=100)
    ap.add_argument("--detection-protocols", nargs="+", default=["plaintext", "ckks"])
    ap.add_argument("--detector", default="recommended")
    ap.add_argument("--divergence-rounds", type=int, default=12)
    ap.add_argument("--divergence-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--protocol-attacks", nargs="+", default=["none", "signflip:scale=10"],
                    help="attacks of the protocols section (the matrix's first setting and fraction)")
    ap.add_argument("--protocol-defenses", nargs="+",
                    help="only the protocols rows with these defense specs (default: every row of PROTOCOLS)")
    ap.add_argument("--protocol-rounds", type=int, help="rounds of the protocols section (default: --rounds)")
    ap.add_argument("--demo-rounds", type=int, default=60, help="rounds of the demo section (the `make run` setting)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("results/robustness-runs.jsonl"))
    ap.add_argument("--report-only", action="store_true", help="summarize the cache; run nothing")
    ap.add_argument("--out", type=Path, help="also write the JSON here (e.g. benchmarks/json/robustness.json)")
    ap.add_argument("--merge-into", type=Path,
                    help="replace only the sections run here in this existing JSON (the others stay as they are), "
                         "each with its own '<section>_measured' record of when its runs ran")
    args = ap.parse_args()
    torch.set_num_threads(1)
    runner = Runner(args.cache, args.workers)
    before = _machine()
    planned: list[RunConfig] = []
    if "selection" in args.sections:
        planned += selection_configs(args)
    if "detection" in args.sections:
        planned += [detection_config(args, p, s) for p in args.detection_protocols for s in args.seeds]
    if "divergence" in args.sections:
        planned += [divergence_config(args, p, s) for p in ("plaintext", "ckks") for s in args.divergence_seeds]
    if "protocols" in args.sections:
        planned += protocol_configs(args)
    if "matrix" in args.sections:
        planned += matrix_configs(args)
    if "demo" in args.sections:
        planned += demo_configs(args)
    if not args.report_only:
        runner.run(planned)
    result: dict[str, Any] = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine_before": before, "machine_after": _machine(),
        "runs_planned": len(planned), "runs_done": sum(runner.get(c) is not None for c in planned),
    }
    result["errors"] = runner.errors(planned)
    result["partial"] = result["runs_done"] < result["runs_planned"]
    result["report_only"] = bool(args.report_only)
    if "selection" in args.sections:
        result["selection"] = selection(args, runner)
    if "detection" in args.sections:
        result["detection"] = detection(args, runner)
    if "divergence" in args.sections:
        result["plaintext_vs_ckks"] = divergence(args, runner)
    if "protocols" in args.sections:
        result["protocols"] = protocols(args, runner)
    if "matrix" in args.sections:
        result["matrix"] = matrix(args, runner)
    if "demo" in args.sections:
        result["demo"] = demo(args, runner)
    write_report(result, args.out, indent=1)
    if args.merge_into is not None:
        merge_sections(args.merge_into, result, args, runner, planned)


#: result key of each section (``--sections`` name -> key of its block in the JSON)
SECTION_KEYS = {"selection": "selection", "detection": "detection", "divergence": "plaintext_vs_ckks",
                "protocols": "protocols", "matrix": "matrix", "demo": "demo"}


def runs_measured(runner: Runner, planned: list[RunConfig]) -> dict[str, Any]:
    """When a set of cached runs ran: first start to last finish, and the load at each finish."""
    recs = [r for c in planned if (r := runner.done.get(key_of(c))) is not None and "seconds" in r]
    out: dict[str, Any] = {"runs_planned": len(planned), "runs_done": sum(runner.get(c) is not None for c in planned),
                           "cpus": os.cpu_count(), "torch_threads": 1, "torch": torch.__version__,
                           "python": platform.python_version()}
    if recs:
        ends = [datetime.fromisoformat(r["finished_utc"]) for r in recs]
        starts = [e.timestamp() - float(r["seconds"]) for e, r in zip(ends, recs)]
        out.update(first_start_utc=datetime.fromtimestamp(min(starts), timezone.utc).isoformat(timespec="seconds"),
                   last_finish_utc=max(ends).isoformat(timespec="seconds"),
                   load_avg_1min_at_finish=[r.get("load_avg_1min") for r in recs],
                   seconds_per_run=[round(float(r["seconds"]), 1) for r in recs])
    return out


def merge_sections(path: Path, result: dict[str, Any], args: argparse.Namespace, runner: Runner,
                   planned: list[RunConfig]) -> None:
    """Write this run's sections into ``path``, leaving every other section of it untouched.

    Sections whose runs cannot be redone on this machine (a matrix of hundreds of runs) keep
    their numbers; each replaced section gets ``<key>_measured`` (its runs' own times and
    load) and ``<key>_args`` (the arguments it was computed with), so a renderer never dates a
    section by another's run.
    """
    data = json.loads(path.read_text())
    configs = {"detection": [detection_config(args, p, s) for p in args.detection_protocols for s in args.seeds]}
    for section in args.sections:
        key = SECTION_KEYS[section]
        if key not in result:
            continue
        data[key] = result[key]
        data[f"{key}_measured"] = runs_measured(runner, configs.get(section, planned))
        data[f"{key}_args"] = result["args"]
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
