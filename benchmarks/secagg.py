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
far below the call's duration only if the GIL was released).  ``workers_1_vs_auto`` runs the
main scenario three ways, interleaved (``--comparison-rounds`` of each, medians):
``one_thread`` (every reply and every masked input on one thread), ``mask_threads`` (replies
one by one, each masked input split over the mask threads: the previous design) and
``concurrent_replies`` (the default: the driver computes the masked inputs of several clients at
once, ``halves.simulate``).  On a loaded machine wall time says little, so each round also
reports ``idle_cores_bound_s``: per stage, the larger of the process CPU time over the cores and
the busiest thread's CPU time (``halves.StageTimes``), summed over the stages; a lower bound of
the wall time the round takes on idle cores, computed the same way for every variant.

Cost of the issue-11 checks (``checks_cost``): rounds with ``SecAggPlus(checks=True)`` (clients
verify exclusions and keep ``t`` mask peers; the decoded sum is range-checked) and with
``checks=False`` are run interleaved, ``--repeats`` of each, at N=100, L=1,000,000, k=15, and the
ratio of the median round times is printed (target <= 1.1).  ``--no-checks`` runs the main
scenarios without the checks; ``--only-checks-cost`` runs just the interleaved comparison.

Usage: ``python benchmarks/secagg.py [--quick] [--no-checks] [--only-checks-cost] [--repeats 5]
[--comparison-rounds 5] [--out benchmarks/json/secagg.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import threading
import time

import numpy as np
import torch
from peers import write_report

from securefml.defenses import Mean
from securefml.protocols import ClientUpdate, Plaintext, SecAggPlus
from securefml.protocols.base import finish_round
from securefml.protocols.prg import MaskStreams, keystream, new_seed
from securefml.protocols.quantize import FixedPoint
from securefml.protocols.secagg_client import MaskJob
from securefml.protocols.secagg_halves import SecAggClientHalf
from securefml.protocols.secagg_masking import available_cpus, run_mask_job_threaded
from securefml.protocols.secagg_server import SecAggServer
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
    """SecAgg+ on one thread: each client's masked input on one thread, replies one by one."""

    def client_half(self, round_idx, layout, update):  # type: ignore[no-untyped-def]
        half = super().client_half(round_idx, layout, update)
        assert isinstance(half, SecAggClientHalf)
        half.workers = 1
        return half


class _NoConcurrentReplies(SecAggClientHalf):
    def concurrent(self, stage: str) -> bool:
        return False


class MaskThreadsSecAgg(SecAggPlus):
    """The previous design: replies one by one, each client's masked input split over the mask threads."""

    def client_half(self, round_idx, layout, update):  # type: ignore[no-untyped-def]
        half = super().client_half(round_idx, layout, update)
        assert isinstance(half, SecAggClientHalf)
        half.__class__ = _NoConcurrentReplies
        return half


def make_updates(n: int, length: int, seed: int) -> tuple[list[ClientUpdate], LayerLayout]:
    g = torch.Generator().manual_seed(seed)
    layout = LayerLayout([("w.weight", (length,))])
    ups = [ClientUpdate(i, torch.randn(length, generator=g) * 0.05, ("w",), float(1 + i % 7)) for i in range(n)]
    return ups, layout


def timed_round(proto: SecAggPlus, ups: list[ClientUpdate], layout: LayerLayout, round_idx: int, drops=None) -> dict:
    """One round exactly as ``run_round`` drives it (``collect`` then ``finish_round``), timed stage by stage."""
    transport = DropAt(drops or {})
    defense = Mean()
    c0 = time.process_time()
    t0 = time.perf_counter()
    revealed, transcript, halves = proto.collect(round_idx, ups, layout, setup=proto.halves_setup(defense),
                                                 transport=transport)
    out = finish_round(revealed, transcript, proto.round_stats(halves), defense, layout, context=None,
                       round_idx=round_idx, offered=len(ups))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    accepted = set(out.accepted)
    w = sum(u.weight for u in ups if u.client_id in accepted)
    ref = sum(u.weight * u.vector.double().clamp(-1, 1) for u in ups if u.client_id in accepted) / w
    err = float((out.aggregate.double() - ref).abs().max())
    tim = out.extras["timings"]
    cpus = min(2, available_cpus())
    # per stage: the larger of the process CPU over the cores and the busiest thread's CPU, summed
    bound = sum(max(st.cpu_s / cpus, st.busiest_thread_cpu_s) for st in transcript.stages)
    masked = next(st for st in transcript.stages if st.stage == "masked")
    return {
        "round_s": wall,
        "main_process_cpu_s": cpu,  # process CPU time, every thread counted
        "idle_cores_bound_s": bound,
        "mask_threads": out.extras.get("mask_threads"),
        "reply_pool_threads": masked.pool_threads,
        "masked_stage": {"wall_s": masked.wall_s, "cpu_s": masked.cpu_s,
                         "busiest_thread_cpu_s": masked.busiest_thread_cpu_s},
        "stages_cpu_s": {st.stage: round(st.cpu_s, 4) for st in transcript.stages},
        "masked_inputs_cpu_s": tim.get("mask_cpu_s", 0.0),
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


class HeldMessagesSecAgg(SecAggPlus):
    """Concurrent replies, but the server keeps each masked message itself (the design before issue 15's
    second pass): every message stays referenced until the unmask, so each is fresh memory."""


@contextlib.contextmanager
def _server_holds(proto: SecAggPlus):  # noqa: ANN202
    """While a ``HeldMessagesSecAgg`` round runs, the server keeps the message's view, not a copy."""
    if not isinstance(proto, HeldMessagesSecAgg):
        yield
        return
    own = SecAggServer.__dict__["_hold"]
    SecAggServer._hold = staticmethod(lambda vec: vec)  # type: ignore[method-assign]
    try:
        yield
    finally:
        SecAggServer._hold = own  # type: ignore[method-assign]


VARIANTS = {"one_thread": OneThreadSecAgg, "mask_threads": MaskThreadsSecAgg, "concurrent_replies": SecAggPlus,
            "held_messages": HeldMessagesSecAgg}
KEYS = ("round_s", "main_process_cpu_s", "idle_cores_bound_s")


def workers_comparison(n: int, length: int, k: int, rounds: int) -> dict:
    """The main scenario on one thread, with mask threads per client, and with concurrent replies, interleaved."""
    ups, layout = make_updates(n, length, 6)
    protos = {name: cls(neighbours=k, max_weight=8.0) for name, cls in VARIANTS.items()}
    res: dict[str, list[dict]] = {name: [] for name in protos}
    order = list(protos.items())
    r = 0
    for rep in range(rounds):
        for name, proto in order if rep % 2 == 0 else order[::-1]:
            r += 1
            with _server_holds(proto):
                res[name].append(timed_round(proto, ups, layout, 100 + r))
    med = {name: {key: statistics.median(x[key] for x in runs) for key in KEYS} for name, runs in res.items()}
    one, old, new = med["one_thread"], med["mask_threads"], med["concurrent_replies"]
    held = med["held_messages"]
    return {
        "n": n, "L": length, "k": k, "rounds": rounds, "cpus": available_cpus(),
        "reply_pool_threads": res["concurrent_replies"][0]["reply_pool_threads"],
        "runs": {name: [{key: round(x[key], 4) for key in KEYS} for x in runs] for name, runs in res.items()},
        "median": med,
        "wall_concurrent_over_one": new["round_s"] / one["round_s"],
        "bound_concurrent_over_one": new["idle_cores_bound_s"] / one["idle_cores_bound_s"],
        "cpu_concurrent_over_one": new["main_process_cpu_s"] / one["main_process_cpu_s"],
        "wall_concurrent_over_mask_threads": new["round_s"] / old["round_s"],
        "bound_concurrent_over_mask_threads": new["idle_cores_bound_s"] / old["idle_cores_bound_s"],
        "cpu_concurrent_over_mask_threads": new["main_process_cpu_s"] / old["main_process_cpu_s"],
        "wall_mask_threads_over_one": old["round_s"] / one["round_s"],
        # issue 15, second pass: the server copies each vector into warm memory and the message is freed
        "wall_concurrent_over_held_messages": new["round_s"] / held["round_s"],
        "bound_concurrent_over_held_messages": new["idle_cores_bound_s"] / held["idle_cores_bound_s"],
        "cpu_concurrent_over_held_messages": new["main_process_cpu_s"] / held["main_process_cpu_s"],
    }


def _previous_rounding(fp: FixedPoint, x: np.ndarray, weight: float, out: np.ndarray, seed: bytes,
                       chunk: int = 1 << 15) -> None:
    """The stochastic rounding before issue 15's second pass: ``floor(v + r / 2**32)`` in float64.

    Kept here as the peer of ``FixedPoint.encode``'s integer form (same chunking, same keystream
    call), so the two are timed on the same input in the same run.
    """
    from securefml.protocols.secagg_masking import _ctr

    factor = min(weight, fp.max_weight) * fp.scale
    hi = fp.clip * factor
    enc = _ctr(seed, 0, 4)
    rnd = np.empty(chunk + 4, dtype=np.uint32)
    rview = rnd.view(np.uint8)
    zeros = memoryview(bytes(chunk * 4))
    tmp, uni = np.empty(chunk), np.empty(chunk)
    signed = out.view(np.int32)
    for start in range(0, x.size, chunk):
        stop = min(start + chunk, x.size)
        m = stop - start
        t = tmp[:m]
        np.multiply(x[start:stop], np.float64(factor), out=t)
        if not math.isfinite(np.add.reduce(t)):
            raise ValueError("non-finite entry")
        enc.update_into(zeros[: m * 4], rview)
        np.clip(t, -hi, hi, out=t)
        u = uni[:m]
        np.multiply(rnd[:m], 2.0**-32, out=u)
        t += u
        np.floor(t, out=t)
        np.copyto(signed[start:stop], t, casting="unsafe")


def rounding_kernels(length: int, k: int, repeats: int) -> dict:
    """CPU ms of one client's rounding, previous float64 form vs the integer form, interleaved (medians).

    Also one whole masked input (the integer rounding plus ``k + 1`` mask streams, one thread)
    and the ``k + 1`` streams alone on the same input (``MaskStreams``): the masked input's cost
    above its floor.
    """
    fp = FixedPoint(1.0, 100, 32, max_weight=8.0)
    x = (np.random.default_rng(7).standard_normal(length) * 0.05).astype(np.float32)
    seed = new_seed()
    out = np.empty(length + 1, dtype=np.uint32)
    acc = np.zeros(length + 1, dtype=np.uint32)
    job = MaskJob(x, 3.0, fp, [new_seed() for _ in range(k + 1)], [], 1, 1, {"commit": b"c" * 32})
    streams = [new_seed() for _ in range(k + 1)]
    cands = {
        "previous_float64_floor": lambda: _previous_rounding(fp, x, 3.0, out, seed),
        "integer_trunc": lambda: fp.encode(x, 3.0, seed=seed, out=out),
        "masked_input_one_thread": lambda: run_mask_job_threaded(job, 1),
        "mask_streams_alone": lambda: MaskStreams(streams).apply(acc),
    }
    runs: dict[str, list[float]] = {name: [] for name in cands}
    for f in cands.values():
        f()  # warm-up
    for rep in range(repeats):
        for name, f in (list(cands.items()) if rep % 2 == 0 else list(cands.items())[::-1]):
            c0 = time.thread_time()
            f()
            runs[name].append((time.thread_time() - c0) * 1e3)
    med = {name: statistics.median(v) for name, v in runs.items()}
    return {
        "L": length, "k": k, "repeats": repeats, "unit": "CPU ms of the calling thread",
        "median_ms": med, "min_ms": {name: min(v) for name, v in runs.items()},
        "integer_over_previous": med["integer_trunc"] / med["previous_float64_floor"],
        "masked_input_over_streams": med["masked_input_one_thread"] / med["mask_streams_alone"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N=20, L=100,000 (a smoke run)")
    ap.add_argument("--no-checks", action="store_true", help="main scenarios without the issue-11 checks")
    ap.add_argument("--only-checks-cost", action="store_true", help="only the interleaved checks on/off rounds")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds of each kind for checks_cost")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per scenario (the best is reported)")
    ap.add_argument("--comparison-rounds", type=int, default=3,
                    help="interleaved rounds of each variant in workers_1_vs_auto (medians)")
    ap.add_argument("--out", help="also write the JSON here (e.g. benchmarks/json/secagg.json)")
    args = ap.parse_args()
    n, big, small = (20, 100_000, 20_000) if args.quick else (100, 1_000_000, 100_000)
    torch.set_num_threads(1)
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
    out["rounding"] = rounding_kernels(big, 15, 21)
    out["workers_1_vs_auto"] = workers_comparison(n, big, 15, args.comparison_rounds)
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
    sp["idle_bound_over_mask_floor_per_core"] = (  # type: ignore[index]
        sp["idle_cores_bound_s"] / (mf["floor_cpu_s"] / min(2, available_cpus())))  # type: ignore[index]
    sp["wall_over_mask_floor_per_core"] = (  # type: ignore[index]
        sp["round_s"] / (mf["floor_cpu_s"] / min(2, available_cpus())))  # type: ignore[index]
    wc = out["workers_1_vs_auto"]
    out["machine_after"] = {"load_avg": os.getloadavg()}
    out["targets"] = {
        # issue 15: <= 1.0 s on 2 cores; wall time on a shared machine says little, so the CPU time is given too
        "round_le_1s": sp["round_s"] <= 1.0,  # type: ignore[index]
        "round_cpu_le_1s": sp["main_process_cpu_s"] <= 1.0,  # type: ignore[index]
        "round_idle_cores_bound_le_1s": sp["idle_cores_bound_s"] <= 1.0,  # type: ignore[index]
        "comparison_median_wall_le_1s": wc["median"]["concurrent_replies"]["round_s"] <= 1.0,  # type: ignore[index]
        # "more workers never slower than fewer", on wall time and on the load-independent bound
        "auto_workers_not_slower_wall": wc["wall_concurrent_over_one"] <= 1.0,  # type: ignore[index]
        "auto_workers_not_slower_bound": wc["bound_concurrent_over_one"] <= 1.0,  # type: ignore[index]
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
    write_report(out, path)


if __name__ == "__main__":
    main()
