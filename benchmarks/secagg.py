"""SecAgg+ speed and upload size against the plaintext floor measured in the same run.

Prints one JSON object.  Scenarios (issue 5): N=100 clients, L=1,000,000 entries, k=15
neighbours, with no dropouts and with 10% of clients dropping after sharing their keys (the
server then removes their pairwise masks); full SecAgg (k = n - 1) at N=100, L=100,000.
The floor is the plain sum of N float32 vectors of L entries (numpy, in place).  ``clients_s``
(the client halves' own time) and ``server_s`` (the server half's) split the round as the
generic driver ran it; ``round_s`` is the whole round's wall time; ``main_process_cpu_s`` is the
CPU time of this process during the round (the whole cost: SecAgg+ has no worker pool; it does
not grow with other load on the machine the way wall time does).  The machine's other load
shows in ``load_avg``: timings are only comparable within one run.

The mask-expansion floor (issue 15): a round expands ``N * (k + 1)`` keystreams on the clients
(k pairwise masks and one self mask each) and ``N`` on the server (the self masks), each of 4L
bytes of AES-256-CTR added into a uint32 vector.  ``mask_floor`` times 64 such expansions in
the same run (best of 3) and scales to the round's count: ``round_over_mask_floor`` is the
round's CPU time over that floor, the part of the round no implementation on one core avoids.

Threads (issue 15): ``gil`` shows whether ``cryptography``'s AES-CTR releases the GIL (a Python
thread counts ticks while the main thread expands one 64 MiB keystream: its longest pause is
far below the call's duration only if the GIL was released).  The masked inputs and the
server's unmasked sum then run on threads sized from the work (``secagg_masking``); the main
scenario is run with one thread and with the automatic count, interleaved, and
``workers_1_vs_auto`` compares them.  On a loaded machine wall time says little, so each round
also reports ``idle_cores_estimate_s``: the process CPU time minus the masked inputs' CPU time
plus their busiest threads' CPU time (what the round takes when the cores are free).

Cost of the issue-11 checks (``checks_cost``): rounds with ``SecAggPlus(checks=True)`` (clients
verify exclusions and keep ``t`` mask peers; the decoded sum is range-checked) and with
``checks=False`` are run interleaved, ``--repeats`` of each, at N=100, L=1,000,000, k=15, and the
ratio of the median round times is printed (target <= 1.1).  ``--no-checks`` runs the main
scenarios without the checks; ``--only-checks-cost`` runs just the interleaved comparison.

Usage: ``python benchmarks/secagg.py [--quick] [--no-checks] [--only-checks-cost] [--repeats 5]
[--out benchmarks/json/secagg.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import numpy as np
import torch

from securefml.defenses import Mean
from securefml.protocols import ClientUpdate, Plaintext, SecAggPlus
from securefml.protocols.prg import MaskStreams, keystream, new_seed
from securefml.protocols.secagg_halves import SecAggClientHalf
from securefml.protocols.secagg_masking import available_cpus
from securefml.testing.secagg_strategies import DropAt
from securefml.updates import LayerLayout


def floor_sum(vectors: list[np.ndarray], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        acc = np.zeros_like(vectors[0])
        for v in vectors:
            np.add(acc, v, out=acc)
        best = min(best, time.perf_counter() - t0)
    return best


def mask_floor(n: int, length: int, k: int, repeats: int = 3, sample: int = 64) -> dict:
    """CPU seconds of the round's mask expansion alone: ``n * (k + 2)`` keystreams of 4L bytes."""
    acc = np.zeros(length, dtype=np.uint32)
    seeds = [new_seed() for _ in range(sample)]
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        MaskStreams(seeds).apply(acc)
        best = min(best, time.process_time() - c0)
    streams = n * (k + 2)
    return {"streams": streams, "per_stream_cpu_s": best / sample, "floor_cpu_s": best / sample * streams}


def gil_check(mib: int = 64) -> dict:
    """Longest pause of a ticking Python thread while the main thread expands one keystream."""
    keystream(new_seed(), 1 << 10)  # warm the cipher
    t0 = time.perf_counter()
    keystream(new_seed(), (mib << 20) // 4)
    alone = time.perf_counter() - t0
    done = threading.Event()
    gaps: list[float] = []

    def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    th = threading.Thread(target=ticker)
    th.start()
    time.sleep(0.02)
    t0 = time.perf_counter()
    keystream(new_seed(), (mib << 20) // 4)
    call = time.perf_counter() - t0
    done.set()
    th.join()
    return {"keystream_mib": mib, "call_alone_s": alone, "call_with_ticker_s": call, "ticks": len(gaps),
            "longest_pause_s": max(gaps), "releases_gil": max(gaps) < call / 4}


class OneThreadSecAgg(SecAggPlus):
    """SecAgg+ whose client halves compute their masked input on one thread (the comparison run)."""

    def client_half(self, round_idx, layout, update):  # type: ignore[no-untyped-def]
        half = super().client_half(round_idx, layout, update)
        assert isinstance(half, SecAggClientHalf)
        half.workers = 1
        return half


def make_updates(n: int, length: int, seed: int) -> tuple[list[ClientUpdate], LayerLayout]:
    g = torch.Generator().manual_seed(seed)
    layout = LayerLayout([("w.weight", (length,))])
    ups = [ClientUpdate(i, torch.randn(length, generator=g) * 0.05, ("w",), float(1 + i % 7)) for i in range(n)]
    return ups, layout


def timed_round(proto: SecAggPlus, ups: list[ClientUpdate], layout: LayerLayout, round_idx: int, drops=None) -> dict:
    transport = DropAt(drops or {})
    c0 = time.process_time()
    t0 = time.perf_counter()
    out = proto.run_round(round_idx, ups, layout, defense=Mean(), transport=transport)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    accepted = set(out.accepted)
    w = sum(u.weight for u in ups if u.client_id in accepted)
    ref = sum(u.weight * u.vector.double().clamp(-1, 1) for u in ups if u.client_id in accepted) / w
    err = float((out.aggregate.double() - ref).abs().max())
    tim = out.extras["timings"]
    mask_cpu = tim.get("mask_cpu_s", 0.0)
    mask_crit = tim.get("mask_critical_cpu_s", 0.0)
    return {
        "round_s": wall,
        "main_process_cpu_s": cpu,  # process CPU time, every thread counted
        "mask_threads": out.extras.get("mask_threads"),
        "masked_inputs_cpu_s": mask_cpu,
        "masked_inputs_critical_cpu_s": mask_crit,
        "idle_cores_estimate_s": cpu - mask_cpu + mask_crit,
        "clients_s": tim.get("clients_s", float("nan")),
        "server_s": tim["server_s"],
        "accepted": len(out.accepted),
        "k_t": out.extras["params"][0],
        "clipped_fraction": out.extras.get("clipped_fraction"),
        "upload_bytes": out.bytes_uploaded,
        "max_abs_error": err,
        "error_bound": out.extras["error_bound"],
    }


def checks_cost(n: int, length: int, k: int, repeats: int, signatures: bool) -> dict:
    """Median round time with the issue-11 checks over the median without them (interleaved)."""
    ups, layout = make_updates(n, length, 5)
    times: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    on = SecAggPlus(neighbours=k, signatures=signatures, checks=True, max_weight=8.0)
    off = SecAggPlus(neighbours=k, signatures=signatures, checks=False, max_weight=8.0)
    for r in range(repeats):
        for checked, proto in ((True, on), (False, off)) if r % 2 == 0 else ((False, off), (True, on)):
            res = timed_round(proto, ups, layout, r + 1)
            times[checked].append(res["round_s"])
            cpu[checked].append(res["main_process_cpu_s"])
    med = {c: statistics.median(v) for c, v in times.items()}
    med_cpu = {c: statistics.median(v) for c, v in cpu.items()}
    return {
        "n": n, "L": length, "k": k, "signatures": signatures, "repeats": repeats,
        "round_s_checks_on": times[True], "round_s_checks_off": times[False],
        "median_round_s_checks_on": med[True], "median_round_s_checks_off": med[False],
        "ratio_on_over_off": med[True] / med[False],
        "median_main_cpu_s_on": med_cpu[True], "median_main_cpu_s_off": med_cpu[False],
        "cpu_ratio_on_over_off": med_cpu[True] / med_cpu[False],
    }


def scenario(n: int, length: int, k: int | None, drop_frac: float, floor: float, seed: int,
             checks: bool = True, rounds: int = 2) -> dict:
    ups, layout = make_updates(n, length, seed)
    drops = {c: "masked" for c in range(0, n, max(1, round(1 / drop_frac)))} if drop_frac else {}
    proto = SecAggPlus(neighbours=k, checks=checks, max_weight=8.0)  # weights 1..7: the public bound is 8
    runs = [timed_round(proto, ups, layout, r + 1, drops) for r in range(rounds)]
    best = min(runs, key=lambda r: r["round_s"])
    live = n - len(drops)
    best.update(
        {
            "n": n,
            "L": length,
            "dropouts": len(drops),
            "rounds_s": [r["round_s"] for r in runs],
            "cpu_s": [r["main_process_cpu_s"] for r in runs],
            "server_over_floor": best["server_s"] / floor,
            "round_over_floor": best["round_s"] / floor,
            # all bytes any client sent, over 4 bytes x L per client that sent a masked vector
            "upload_per_client_over_4L": best["upload_bytes"] / (live * 4 * length),
            "floor_s": floor,
            "live_clients": live,
        }
    )
    return best


def workers_comparison(n: int, length: int, k: int, rounds: int) -> dict:
    """The main scenario with one mask thread and with the automatic count, interleaved."""
    ups, layout = make_updates(n, length, 6)
    one = OneThreadSecAgg(neighbours=k, max_weight=8.0)
    auto = SecAggPlus(neighbours=k, max_weight=8.0)
    res: dict[str, list[dict]] = {"one": [], "auto": []}
    for r in range(rounds):
        order = (("one", one), ("auto", auto)) if r % 2 == 0 else (("auto", auto), ("one", one))
        for name, proto in order:
            res[name].append(timed_round(proto, ups, layout, 100 + 2 * r + (name == "auto")))
    med = {name: {key: statistics.median(x[key] for x in runs)
                  for key in ("round_s", "main_process_cpu_s", "idle_cores_estimate_s")}
           for name, runs in res.items()}
    return {
        "n": n, "L": length, "k": k, "rounds": rounds, "cpus": available_cpus(),
        "auto_threads": res["auto"][0]["mask_threads"],
        "round_s_one": [x["round_s"] for x in res["one"]], "round_s_auto": [x["round_s"] for x in res["auto"]],
        "median_one": med["one"], "median_auto": med["auto"],
        "wall_auto_over_one": med["auto"]["round_s"] / med["one"]["round_s"],
        "idle_estimate_auto_over_one": med["auto"]["idle_cores_estimate_s"] / med["one"]["idle_cores_estimate_s"],
        "cpu_auto_over_one": med["auto"]["main_process_cpu_s"] / med["one"]["main_process_cpu_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N=20, L=100,000 (a smoke run)")
    ap.add_argument("--no-checks", action="store_true", help="main scenarios without the issue-11 checks")
    ap.add_argument("--only-checks-cost", action="store_true", help="only the interleaved checks on/off rounds")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds of each kind for checks_cost")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per scenario (the best is reported)")
    ap.add_argument("--out", help="also write the JSON here (e.g. benchmarks/json/secagg.json)")
    args = ap.parse_args()
    n, big, small = (20, 100_000, 20_000) if args.quick else (100, 1_000_000, 100_000)
    machine = {"cpus": os.cpu_count(), "load_avg": os.getloadavg(),
               "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch_threads": torch.get_num_threads()}
    if args.only_checks_cost:
        out0: dict[str, object] = {
            "machine": machine,
            "checks_cost": checks_cost(n, big, 15, args.repeats, False),
            "checks_cost_signed": checks_cost(n, big, 15, args.repeats, True),
        }
        out0["targets"] = {"checks_le_1.1x": out0["checks_cost"]["ratio_on_over_off"] <= 1.1}  # type: ignore[index]
        emit(out0, args.out)
        return
    checks = not args.no_checks

    ups, layout = make_updates(n, big, 1)
    vecs = [u.vector.numpy() for u in ups]
    floor = floor_sum(vecs)
    t0 = time.perf_counter()
    Plaintext().run_round(0, ups, layout, defense=Mean())
    plaintext_round = time.perf_counter() - t0
    del ups, vecs

    out: dict[str, object] = {
        "machine": machine,
        "floor_plain_sum_s": floor,
        "plaintext_protocol_round_s": plaintext_round,
        "mask_floor": mask_floor(n, big, 15),
        "gil": gil_check(),
        "checks": checks,
        "secaggplus": scenario(n, big, 15, 0.0, floor, 2, checks, args.rounds),
        "secaggplus_10pct_dropouts": scenario(n, big, 15, 0.1, floor, 3, checks, args.rounds),
    }
    out["workers_1_vs_auto"] = workers_comparison(n, big, 15, max(2, args.rounds))
    if args.repeats:
        out["checks_cost"] = checks_cost(n, big, 15, args.repeats, False)
    ups_s, layout_s = make_updates(n, small, 4)
    floor_small = floor_sum([u.vector.numpy() for u in ups_s])
    out["floor_plain_sum_small_s"] = floor_small
    out["secagg_full"] = scenario(n, small, n - 1, 0.0, floor_small, 4, checks, args.rounds)
    sp, dr, full = out["secaggplus"], out["secaggplus_10pct_dropouts"], out["secagg_full"]
    mf = out["mask_floor"]
    sp["round_cpu_over_mask_floor"] = sp["main_process_cpu_s"] / mf["floor_cpu_s"]  # type: ignore[index]
    # the floor on the cores this process may use: the mask expansion spread over all of them
    sp["idle_estimate_over_mask_floor_per_core"] = (  # type: ignore[index]
        sp["idle_cores_estimate_s"] / (mf["floor_cpu_s"] / min(2, available_cpus())))  # type: ignore[index]
    wc = out["workers_1_vs_auto"]
    out["machine_after"] = {"load_avg": os.getloadavg()}
    out["targets"] = {
        # issue 15: <= 1.0 s on 2 cores; wall time on a shared machine says little, so the CPU time is given too
        "round_le_1s": sp["round_s"] <= 1.0,  # type: ignore[index]
        "round_cpu_le_1s": sp["main_process_cpu_s"] <= 1.0,  # type: ignore[index]
        "round_idle_cores_estimate_le_1s": sp["idle_cores_estimate_s"] <= 1.0,  # type: ignore[index]
        # "more workers never slower than fewer", on the load-independent estimate and on wall time
        "auto_workers_not_slower_estimate": wc["idle_estimate_auto_over_one"] <= 1.0,  # type: ignore[index]
        "auto_workers_not_slower_wall": wc["wall_auto_over_one"] <= 1.0,  # type: ignore[index]
        "server_le_5x_floor": sp["server_over_floor"] <= 5.0,  # type: ignore[index]
        "server_le_10x_floor_with_10pct_dropouts": dr["server_over_floor"] <= 10.0,  # type: ignore[index]
        "full_secagg_le_10s": full["round_s"] <= 10.0,  # type: ignore[index]
        "upload_le_1.01x_4L": sp["upload_per_client_over_4L"] <= 1.01,  # type: ignore[index]
    }
    if "checks_cost" in out:
        out["targets"]["checks_le_1.1x"] = out["checks_cost"]["ratio_on_over_off"] <= 1.1  # type: ignore[index]
    # Flower's SecAgg+ is timed in the same run by benchmarks/flower.py (its own engineer);
    # no ratio against it, or against a typed-in constant, is computed here
    out["flower"] = {"anchor": "not measured"}
    emit(out, args.out)


def emit(out: dict, path: str | None) -> None:
    text = json.dumps(out, indent=2)
    print(text)
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
