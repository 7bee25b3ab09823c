"""Cost and one-round damage of every model-poisoning attack, and the cost of protocol attacks.

Prints JSON.  Timings are ratios against a floor measured in the same run: for model attacks,
the plain mean of the round's ``n`` updates; for protocol attacks, the plaintext encoding of
one update.  "damage" is ``||mean(all rows) - mean(honest)|| / ||mean(honest)||`` under plain
averaging, and "cos" the cosine between that aggregate and the honest mean (negative = the
round moves the model backwards).

Usage: ``python benchmarks/attacks.py [--n 25] [--f 5] [--d 100000] [--reps 5]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from securefml.attacks import PROTOCOL_ATTACKS, AttackContext, make_attack
from securefml.defenses import Mean
from securefml.protocols import ClientUpdate, Plaintext
from securefml.updates import LayerLayout

MODEL_ATTACKS = ["signflip", "gaussian", "scaling", "alie", "ipm", "minmax", "minsum", "fang-krum", "fang-trmean",
                 "mimic", "adaptive", "meta-backdoor", "metasgd-lr"]


def timed(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=25)
    ap.add_argument("--f", type=int, default=5)
    ap.add_argument("--d", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(args.seed)
    h = args.n - args.f
    drift = 0.1 * torch.randn(args.d, generator=g)
    honest = drift + torch.randn(h, args.d, generator=g)
    own = drift + torch.randn(args.f, args.d, generator=g)
    mean = Mean()
    everything = torch.cat([honest, own])
    floor = timed(lambda: mean(everything), args.reps)
    mu = honest.mean(0).double()
    lr_mask = torch.zeros(args.d, dtype=torch.bool)
    lr_mask[-max(1, args.d // 100):] = True

    results: dict[str, dict[str, float]] = {}
    for name in MODEL_ATTACKS:
        attack = make_attack(name)

        def ctx() -> AttackContext:
            return AttackContext(round=0, n_clients=args.n, n_malicious=args.f, honest_updates=honest, defense=mean,
                                 generator=torch.Generator().manual_seed(args.seed), lr_mask=lr_mask)

        seconds = timed(lambda attack=attack: attack.poison_updates(own, ctx()), args.reps)
        rows = attack.poison_updates(own, ctx())
        agg = mean(torch.cat([honest, rows])).aggregate.double()
        results[name] = {
            "seconds": round(seconds, 6),
            "ratio_vs_mean": round(seconds / floor, 4),
            "damage": round(float((agg - mu).norm() / mu.norm()), 4),
            "cos": round(float(torch.nn.functional.cosine_similarity(agg, mu, dim=0)), 4),
        }

    layout = LayerLayout([("net.weight", (args.d,))])
    proto = Plaintext()
    upd = ClientUpdate(1, honest[0], ("net",), 1.0)
    msg = proto.encode(0, upd, layout)
    encode_floor = timed(lambda: proto.encode(0, upd, layout), args.reps)
    protocol: dict[str, dict[str, float]] = {}
    for name in PROTOCOL_ATTACKS.names():
        transport = PROTOCOL_ATTACKS.create(name, senders=[1])
        seconds = timed(lambda transport=transport: transport.deliver(1, "update", msg), args.reps)
        protocol[name] = {"seconds": round(seconds, 6), "ratio_vs_encode": round(seconds / encode_floor, 3)}

    print(json.dumps({
        "config": {"n": args.n, "f": args.f, "d": args.d, "reps": args.reps, "threads": torch.get_num_threads()},
        "baseline": {"mean_seconds": round(floor, 6), "plaintext_encode_seconds": round(encode_floor, 6),
                     "message_bytes": len(msg)},
        "model_attacks": results,
        "protocol_attacks": protocol,
    }, indent=2))


if __name__ == "__main__":
    main()
