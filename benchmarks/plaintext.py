"""The plaintext reference protocol against its floor and against SecAgg+, in the same run; prints JSON.

N clients, L float32 entries each (default N=100, L=1,000,000), the plain weighted mean.
Measured, interleaved (one call of each per repeat, medians; the machine is shared):

* ``floor_sum_s``: summing the N vectors in place (numpy), the least any aggregation costs;
* ``floor_decode_s``: reading the N messages with the wire codec alone (``decode`` with the
  vector as a view, ``unpack_array``, one copy out), the least the server half must add;
* ``plaintext_server_s``: the plaintext server half on the same messages (decode with every
  check, then aggregate);
* ``plaintext_round_s``: a whole ``Plaintext.run_round`` (client encoding included);
* ``secaggplus_round_s``: a whole ``SecAggPlus.run_round`` (k=15 neighbours), one process (SecAgg+
  has no worker pool: issue 15 measured it slower than one process).

Targets (issue 15): the plaintext round no slower than the faster SecAgg+ round, and the
plaintext server half within 2x ``floor_sum_s + floor_decode_s``.

Usage: ``python benchmarks/plaintext.py [--n 100] [--length 1000000] [--reps 3]
[--out benchmarks/json/plaintext.json]``
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from peers import interleaved, machine, write_report

from securefml.aggregation import aggregate_plain
from securefml.defenses import Mean
from securefml.protocols import ClientUpdate, Plaintext, SecAggPlus
from securefml.protocols.wire import decode, unpack_array
from securefml.updates import LayerLayout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--length", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    n, length = args.n, args.length
    g = torch.Generator().manual_seed(0)
    layout = LayerLayout([("w.weight", (length,))])
    ups = [ClientUpdate(i, torch.randn(length, generator=g) * 0.05, ("w",), float(1 + i % 7)) for i in range(n)]
    vecs = [u.vector.numpy() for u in ups]
    proto = Plaintext()
    msgs = [proto.encode(0, u, layout) for u in ups]

    def floor_sum() -> np.ndarray:
        acc = np.zeros_like(vecs[0])
        for v in vecs:
            np.add(acc, v, out=acc)
        return acc

    def floor_decode() -> list[np.ndarray]:
        return [unpack_array(decode(m, views=("vector",)).fields["vector"]).copy() for m in msgs]

    def server_half() -> torch.Tensor:
        got = [proto.decode(0, i, m, layout) for i, m in enumerate(msgs)]
        return aggregate_plain(layout, got, Mean(), {}, sum(map(len, msgs)), None).aggregate

    rounds = iter(range(1, 1_000_000))
    out: dict[str, Any] = {"setup": {"n": n, "L": length, "reps": args.reps, "neighbours": 15,
                                     "timing": "median of interleaved repeats on a shared machine"},
                           "machine_before": machine()}
    single = SecAggPlus(neighbours=15)  # no worker pool any more (issue 15: workers=2 was slower than one process)
    cands = {
        "floor_sum_s": floor_sum,
        "floor_decode_s": floor_decode,
        "plaintext_server_s": server_half,
        "plaintext_round_s": lambda: proto.run_round(next(rounds), ups, layout, defense=Mean()),
        "secaggplus_round_s": lambda: single.run_round(next(rounds), ups, layout, defense=Mean()),
    }
    t = interleaved(cands, args.reps)
    med = {k: float(v["median_s"]) for k, v in t.items()}  # type: ignore[arg-type]
    out["seconds"] = med
    out["runs_s"] = {k: v["runs_s"] for k, v in t.items()}
    got = server_half().numpy()
    w = np.array([u.weight for u in ups])
    exact = (w[:, None] * np.stack(vecs).astype(np.float64)).sum(0) / w.sum()
    out["max_abs_error_vs_float64"] = float(np.abs(got - exact).max())
    secagg_best = med["secaggplus_round_s"]
    floor = med["floor_sum_s"] + med["floor_decode_s"]
    out["ratios"] = {
        "plaintext_round_over_fastest_secaggplus": med["plaintext_round_s"] / secagg_best,
        "plaintext_server_over_floor_sum_plus_decode": med["plaintext_server_s"] / floor,
        "plaintext_round_over_floor_sum_plus_decode": med["plaintext_round_s"] / floor,
    }
    out["targets"] = {
        "round_le_secaggplus": med["plaintext_round_s"] <= secagg_best,
        "server_le_2x_floor_sum_plus_decode": med["plaintext_server_s"] <= 2 * floor,
    }
    out["machine_after"] = machine()
    write_report(out, args.out)


if __name__ == "__main__":
    main()
