"""What saving a client half in ``Context.state`` costs a SuperNode, per SecAgg+ stage, same run.

On a real SuperNode every message meets a fresh ClientApp process, so ``securefml_mod`` writes the
client half's state as bytes after every stage (``securefml.flower.half_state.dump_half``) and the
next process rebuilds it (``load_half``).  This drives one SecAgg+ round of ``N`` clients in this
process (``SecAggPlus.server_half`` / ``client_half``, every message as bytes) and, for every
client at every stage, times the half's own answer (``respond``), ``dump_half`` and ``load_half``,
and records the saved bytes.  The ratio is (dump + load) over the answer of the same stage,
measured in the same run (the floor is the protocol's own client work).

Usage: ``python benchmarks/flower_state.py [--nodes 20] [--length 100000]
[--out benchmarks/json/flower_state.json]``.  Run under ``nice``; the machine's load is recorded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers import write_report

from securefml.defenses import make_defense  # noqa: E402
from securefml.flower.half_state import dump_half, load_half  # noqa: E402
from securefml.protocols.secagg import SecAggPlus  # noqa: E402
from securefml.rounds import ClientUpdate  # noqa: E402
from securefml.updates import LayerLayout  # noqa: E402


def _machine() -> dict[str, Any]:
    return {"utc": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "cpus": os.cpu_count(),
            "load_avg": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def measure(nodes: int, length: int, k: int) -> dict[str, Any]:
    layout = LayerLayout([("w", (length,))])
    proto = SecAggPlus(max_weight=1.0, neighbours=min(k, nodes - 1))
    gen = torch.Generator().manual_seed(0)
    ups = {c: ClientUpdate(c, 0.1 * torch.randn(length, generator=gen), layout.layer_names, 1.0)
           for c in range(nodes)}
    setup = proto.halves_setup(make_defense("mean"), max_weight=1.0)
    server = proto.server_half(0, layout, list(ups), setup=setup)
    halves = {c: proto.client_half(0, layout, u) for c, u in ups.items()}
    stages: list[dict[str, Any]] = []
    while (opened := server.next_stage()) is not None:
        respond, dump, load, size = [], [], [], []
        for party, message in sorted(opened.messages.items()):
            half = halves[party]
            t0 = time.perf_counter()
            reply = half.respond(opened.stage, message)
            t1 = time.perf_counter()
            data = dump_half(half, round_idx=0)
            t2 = time.perf_counter()
            halves[party] = load_half(data, proto, layout, round_idx=0, party=party)  # the next stage uses it
            t3 = time.perf_counter()
            respond.append(t1 - t0)
            dump.append(t2 - t1)
            load.append(t3 - t2)
            size.append(len(data))
            server.receive(party, reply)
        server.close_stage()
        med = {name: statistics.median(v) for name, v in (("respond", respond), ("dump", dump), ("load", load))}
        stages.append({"stage": opened.stage, "respond_ms": 1e3 * med["respond"], "dump_ms": 1e3 * med["dump"],
                       "load_ms": 1e3 * med["load"], "state_bytes": int(statistics.median(size)),
                       "codec_over_respond": (med["dump"] + med["load"]) / med["respond"] if med["respond"] else None})
    revealed = server.revealed()
    return {"nodes": nodes, "length": length, "k": min(k, nodes - 1), "stages": stages,
            "all_accepted": len(revealed.contributors[0]) == nodes}  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--length", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out: dict[str, Any] = {"benchmark": "flower_state", "machine_before": _machine()}
    out.update(measure(args.nodes, args.length, args.k))
    out["machine_after"] = _machine()
    write_report(out, args.out)


if __name__ == "__main__":
    main()
