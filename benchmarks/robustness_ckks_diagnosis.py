"""Why CKKS detection on seed 2 differs from plaintext: the diagnostic behind ``docs/robustness.md``.

    python benchmarks/robustness_ckks_diagnosis.py --part zeros [--seed 2]
    python benchmarks/robustness_ckks_diagnosis.py --part noise [--repeats 3]
    python benchmarks/robustness_ckks_diagnosis.py --part floor [--seed 2] [--rounds 20] [--repeats 3] [--out x.json]
    python benchmarks/robustness_ckks_diagnosis.py --part detection [--seed 2] [--floor 1e-7] [--out x.json]

The detection setting of ``benchmarks/robustness.py`` (digits-fewshot FOMAML, 25 % unit-scale
sign flippers, 100 clients, 8 per round, ``recommended``), plaintext and CKKS, real runs.

``zeros``: one round per protocol; how many aggregate entries are exactly 0 in plaintext, how
large the CKKS decryption makes them, and how far the server's Adam then moves the two models
apart on those entries and on all others.

``noise``: the decryption noise on exactly-zero entries (no floor), real ciphertexts, both paths:
what the default floor is sized against.

``floor`` (writes ``benchmarks/json/robustness_ckks_diagnosis.json`` with ``--out``): ``noise``,
then the decode's resolution floor (``CKKS(zero_floor=...)``, ``protocols/ckks_stats.py``)
before and after, measured in one run: ``zeros`` with ``ckks:zero_floor=0`` (the decode as it was)
and with the default floor, then a ``--rounds`` trajectory of plaintext, CKKS without and CKKS
with the floor (same config, seed and cohorts): the largest and the mean absolute difference of
each CKKS global model from the plaintext one, the ratio of the two differences (the floor's
effect, measured in the same run), and the personalized accuracy of each.

``detection``: 100 rounds per protocol, without and with a *floor*: every aggregate entry whose
magnitude is below ``--floor`` is set to 0 before the server's optimizer step (a diagnostic
patch of ``ServerOptimizer.step`` in this process only, applied to both protocols; CKKS now also
has the library's decode floor ``zero_floor`` by default, so ``--floor 0`` measures the library).  Per run: the
cumulative TPR / FPR at the last round (a client counts as flagged when excluded at its latest
participation, as in the benchmark), the missed attackers with their final statistic and the
number of attackers and exclusions in their last cohort (the exclusion cap is 3 of 8), the
false flags, the round consensus cosine of honest clients and attackers from the stored cosine
matrices, and the first round whose flags differ between the runs.  Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

import securefml.optimizer as optimizer
from securefml.defenses import recommended
from securefml.experiment import RunConfig, run_experiment
from securefml.protocols.ckks_stats import default_zero_floor

#: the default resolution floor at scale 2^40 (``ckks_stats.default_zero_floor(40)``)
TAU = default_zero_floor(40)


def config(protocol: str, seed: int, rounds: int) -> RunConfig:
    return RunConfig(dataset="digits-fewshot", algorithm="fomaml", rounds=rounds, clients_per_round=8, seed=seed,
                     protocol=protocol, defense="recommended", attack="signflip:scale=1", malicious=0.25, last_k=5)


def patch_floor(floor: float) -> None:
    """Zero every aggregate entry below ``floor`` before the server step (0: the library as it is)."""
    original = optimizer.ServerOptimizer.step

    def step(self: optimizer.ServerOptimizer, out: Any) -> None:
        if floor > 0:
            out.aggregate = torch.where(out.aggregate.abs() < floor, torch.zeros_like(out.aggregate), out.aggregate)
        original(self, out)

    optimizer.ServerOptimizer.step = step  # type: ignore[method-assign]


def zeros(seed: int, ckks: str = "ckks") -> dict[str, Any]:
    """One round of plaintext and of the CKKS spec ``ckks``: how the two models part on the zero entries."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for protocol in ("plaintext", ckks):
        cap: dict[str, torch.Tensor] = {}

        def finish(server: Any, data: Any, cap: dict[str, torch.Tensor] = cap) -> None:
            cap["vector"] = server.model._vector.clone()
            cap["aggregate"] = server.model._exp_avg.clone() / 0.1  # Adam's first moment after one step
        run_experiment(config(protocol, seed, 1), on_finish=finish)
        state[protocol] = cap
    p, c = state["plaintext"], state[ckks]
    zero = p["aggregate"] == 0
    tiny = ~zero & (p["aggregate"].abs() < TAU)  # nonzero in plaintext, below the default floor
    moved = (p["vector"] - c["vector"]).abs()
    return {
        "entries": int(zero.numel()),
        "exactly_zero_in_plaintext": int(zero.sum()),
        "ckks_max_abs_on_those": float(c["aggregate"][zero].abs().max()) if bool(zero.any()) else 0.0,
        "ckks_exactly_zero_on_those": int((c["aggregate"][zero] == 0).sum()),
        "ckks_std_on_those": float(c["aggregate"][zero].double().std()) if bool(zero.any()) else 0.0,
        "aggregate_relative_difference": float((p["aggregate"] - c["aggregate"]).norm() / p["aggregate"].norm()),
        "model_difference_on_zero_entries": float(moved[zero].norm()),
        "model_difference_elsewhere": float(moved[~zero].norm()),
        "nonzero_below_floor_in_plaintext": int(tiny.sum()),
        "model_difference_on_nonzero_below_floor": float(moved[tiny].norm()),
        "model_difference_at_or_above_floor": float(moved[~zero & ~tiny].norm()),
    }


def noise(repeats: int) -> list[dict[str, Any]]:
    """The decryption noise on entries that are 0 in every upload, real ciphertexts, no floor.

    Mean path (``add-only``, prescaled uploads) and Gram path (``stats``, the key holder's
    coefficient-weighted sum) for m = 4, 8, 16 uploads of 4 full chunks each: the noise's standard
    deviation, its largest magnitude, that magnitude in standard deviations, and the floor's
    margin over it (tau / max), pooled over ``repeats`` rounds.
    """
    from securefml.defenses import NormBound
    from securefml.defenses.mean import Mean
    from securefml.protocols.base import ClientUpdate
    from securefml.protocols.ckks import CKKS
    from securefml.updates import LayerLayout

    layout = LayerLayout([("w", (4, 4096))])
    protos = {"mean": CKKS(preset="add-only", zero_floor=0), "gram": CKKS(preset="stats", zero_floor=0)}
    gen = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    rounds = iter(range(1, 10**6))
    for path, proto in protos.items():
        for m in (4, 8, 16):
            pooled = []
            for _ in range(repeats):
                x = torch.randn(m, layout.numel, generator=gen) * 0.01
                x[:, ::2] = 0.0  # every other entry is 0 in every upload
                ups = [ClientUpdate(i, x[i], layout.layer_names, 1.0) for i in range(m)]
                rule = Mean() if path == "mean" else NormBound(1e6)
                out = proto.run_round(next(rounds), ups, layout, defense=rule)
                pooled.append(out.aggregate[::2].to(torch.float64))
            z = torch.cat(pooled)
            std, peak = float(z.std()), float(z.abs().max())
            rows.append({"path": path, "uploads": m, "entries": int(z.numel()), "std": std, "max_abs": peak,
                         "max_in_std": peak / std, "floor_over_max": TAU / peak, "floor_in_std": TAU / std})
    return rows


def trajectory(seed: int, rounds: int) -> dict[str, Any]:
    """``rounds`` rounds of plaintext, CKKS without the floor and CKKS with it: how far the models part."""
    vectors: dict[str, torch.Tensor] = {}
    accuracy: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for protocol in ("plaintext", "ckks:zero_floor=0", "ckks"):
        cap: dict[str, torch.Tensor] = {}

        def finish(server: Any, data: Any, cap: dict[str, torch.Tensor] = cap) -> None:
            cap["vector"] = server.model._vector.clone()
        t0 = time.perf_counter()
        result = run_experiment(config(protocol, seed, rounds), on_finish=finish)
        seconds[protocol] = time.perf_counter() - t0
        vectors[protocol] = cap["vector"]
        accuracy[protocol] = result.metrics.get("personalized", {}).get("accuracy")
    plain = vectors["plaintext"]
    diff = {p: (vectors[p] - plain).abs() for p in ("ckks:zero_floor=0", "ckks")}
    out: dict[str, Any] = {"rounds": rounds, "entries": int(plain.numel()), "accuracy": accuracy,
                           "seconds": seconds}
    for p, d in diff.items():
        out[p] = {"max_abs_difference": float(d.max()), "mean_abs_difference": float(d.mean()),
                  "relative_norm_difference": float(d.norm() / plain.norm())}
    out["mean_difference_ratio_floor_over_none"] = (
        out["ckks"]["mean_abs_difference"] / max(out["ckks:zero_floor=0"]["mean_abs_difference"], 1e-30))
    return out


def detection_run(protocol: str, seed: int) -> dict[str, Any]:
    defense = recommended(protocol)
    reputation = defense.rule  # MedianClipping(history=10) >> Reputation(Mean())
    rounds: list[dict[str, Any]] = []
    run_experiment(config(protocol, seed, 100), defense=defense, on_round=lambda r: rounds.append(
        {"cohort": r.cohort, "malicious": r.malicious, "flagged": r.flagged, "norm": r.update_norm}))
    attackers = {m for r in rounds for m in r["malicious"]}
    last: dict[int, dict[str, Any]] = {}
    for r in rounds:
        for c in r["cohort"]:
            last[c] = r
    flagged = {c: c in r["flagged"] for c, r in last.items()}
    stat = {c: reputation.statistic(c) for c in last}
    honest_cos: list[float] = []
    attacker_cos: list[float] = []
    for ids, cos, _ in reputation._rounds:
        for i, c in enumerate(ids):
            others = [j for j in range(len(ids)) if j != i]
            score = float(cos[i, others].sum() / cos[others][:, others].sum().clamp_min(1e-12).sqrt())
            (attacker_cos if c in attackers else honest_cos).append(score)
    n_bad, n_good = len([c for c in last if c in attackers]), len([c for c in last if c not in attackers])
    return {
        "protocol": protocol,
        "tpr": sum(flagged[c] for c in last if c in attackers) / max(1, n_bad),
        "fpr": sum(flagged[c] for c in last if c not in attackers) / max(1, n_good),
        "missed": [{"client": c, "statistic": stat[c], "attackers_in_last_cohort":
                    sum(x in attackers for x in last[c]["cohort"]), "excluded_in_last_cohort": len(last[c]["flagged"])}
                   for c in sorted(last) if c in attackers and not flagged[c]],
        "false_flags": [{"client": c, "statistic": stat[c]} for c in sorted(last) if c not in attackers and flagged[c]],
        "attackers_with_negative_statistic": sum(1 for c in last if c in attackers and (stat[c] or 0) < 0),
        "honest_with_negative_statistic": sum(1 for c in last if c not in attackers and (stat[c] or 0) < 0),
        "consensus_cosine": {"honest": [statistics.mean(honest_cos), statistics.pstdev(honest_cos)],
                             "attackers": [statistics.mean(attacker_cos), statistics.pstdev(attacker_cos)]},
        "flags": [r["flagged"] for r in rounds],
        "norms": [r["norm"] for r in rounds],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("zeros", "noise", "floor", "detection"), required=True)
    ap.add_argument("--rounds", type=int, default=20, help="floor: trajectory length")
    ap.add_argument("--repeats", type=int, default=3, help="floor: runs of each (CKKS encryption is randomized)")
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--floor", type=float, default=0.0, help="detection: zero aggregate entries below this")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.part == "zeros":
        report: dict[str, Any] = {"seed": args.seed, "zeros": zeros(args.seed)}
    elif args.part == "noise":
        report = {"floor": TAU, "noise": noise(args.repeats)}
    elif args.part == "floor":
        report = {"seed": args.seed, "floor": TAU, "repeats": args.repeats, "noise": noise(args.repeats),
                  "zeros_without_floor": [zeros(args.seed, "ckks:zero_floor=0") for _ in range(args.repeats)],
                  "zeros_with_floor": [zeros(args.seed, "ckks") for _ in range(args.repeats)],
                  "trajectory": [trajectory(args.seed, args.rounds) for _ in range(args.repeats)]}
    else:
        patch_floor(args.floor)
        runs = [detection_run(p, args.seed) for p in ("plaintext", "ckks")]
        first = next((i for i, (a, b) in enumerate(zip(runs[0]["flags"], runs[1]["flags"])) if a != b), None)
        report = {"seed": args.seed, "floor": args.floor, "runs": runs, "first_round_flags_differ": first}
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
