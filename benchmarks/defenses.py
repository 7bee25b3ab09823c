"""Cost of every robust rule as a ratio to the plain Mean measured in the same run; prints JSON.

Default: n = 100 clients, d = 1,000,000 float32 coordinates (400 MB of updates), f = 10.
Every rule gets the same updates (90 honest Gaussian rows around a common direction and 10
sign-flipped, scaled rows), the same context (reference update, generator, a stimulus
forward function for Cedar's detector) and is timed as the best of ``--reps`` calls after
one warm-up call.  Reported per rule: seconds, ratio to Mean, and for the Gram-based rules
the ratio to one blocked float64 Gram matmul (the cost Krum and Multi-Krum are bounded by).
Also reported: detection TPR/FPR of each rule's ``flagged`` on the known Byzantine rows.

Usage: ``python benchmarks/defenses.py [--n 100] [--d 1000000] [--f 10] [--reps 2] [--device cpu]``
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import torch

from securefml.defenses import detection_rates, make_defense
from securefml.defenses.linalg import gram_matrix, stable_gram

RULES = [
    "mean", "median", "trimmedmean:f={f}", "meamed:f={f}", "krum:f={f}", "multikrum:f={f}", "bulyan:f={f}",
    "geomed", "cclip", "normbound", "nnm:f={f}", "bucketing:size=2", "arc:f={f}", "clipping", "fltrust",
    "flame", "foolsgold", "dnc:f={f}", "cedar", "nnm:f={f}>>trimmedmean:f={f}", "bucketing:size=2>>median",
]
GRAM_BASED = {"krum", "multikrum", "nnm", "geomed", "flame"}


def best_of(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--f", type=int, default=10)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default="", help="comma-separated rule specs to time (default: all)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    n, d, f = args.n, args.d, args.f

    direction = torch.randn(d, generator=g)
    x = (direction + torch.randn(n, d, generator=g)).to(dev)
    x[n - f :] *= -5.0  # sign-flipped and scaled Byzantine rows
    bad = tuple(range(n - f, n))
    reference = (direction + 0.1 * torch.randn(d, generator=g)).to(dev)
    side = int(d**0.5)
    stimuli = torch.randn(10, side, generator=g).to(dev)
    global_vector = (10.0 * torch.randn(d, generator=g)).to(dev)

    def forward(vec: torch.Tensor) -> torch.Tensor:
        return stimuli @ vec[: side * side].reshape(side, side)[:, :10]

    def context() -> dict[str, object]:
        return {
            "reference": reference,
            "generator": torch.Generator().manual_seed(1),
            "forward": forward,
            "global_vector": global_vector,
        }

    out: dict[str, object] = {
        "n": n, "d": d, "f": f, "dtype": "float32", "device": str(dev), "reps": args.reps,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
    }
    floor = best_of(lambda: x.sum(dim=0), args.reps)
    t_gram = best_of(lambda: gram_matrix(x, center=True), args.reps)
    t_stable = best_of(lambda: stable_gram(x), args.reps)
    t_mean = best_of(lambda: make_defense("mean")(x), args.reps)
    out["baseline_s"] = {"sum_float32": floor, "mean_rule": t_mean, "gram_matmul_f64": t_gram, "stable_gram": t_stable}
    specs = [s.format(f=f) for s in RULES]
    if args.only:
        specs = [s for s in specs if s in args.only.split(",")]
    rules: dict[str, object] = {}
    for spec in specs:
        rule = make_defense(spec)
        t = best_of(lambda rule=rule: rule(x, context=context()), args.reps)
        res = make_defense(spec)(x, context=context())
        rates = detection_rates(res.flagged, bad, range(n))
        entry: dict[str, object] = {"seconds": round(t, 4), "ratio_to_mean": round(t / t_mean, 2),
                                    "tpr": rates.tpr, "fpr": rates.fpr}
        if spec.split(":")[0].split(">>")[0] in GRAM_BASED:
            entry["ratio_to_gram_matmul"] = round(t / t_gram, 2)
        rules[spec] = entry
        if args.only:
            print(json.dumps({spec: entry}), flush=True)
    out["rules"] = rules
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
