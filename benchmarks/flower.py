"""securefml SecAgg+ on Flower vs Flower's own ``SecAggPlusWorkflow`` + ``secaggplus_mod``, same run.

Both peers run through ``flwr.simulation.run_simulation`` (Flower 1.42's simulation runtime,
Ray) in this one process, on the same machine, with the same cohort (every SuperNode, each
returning a fixed random float32 vector of ``L`` entries as its update), the same number of
neighbours and threshold ``t`` (Flower's ring needs an odd ``num_shares``, one of them kept by
the client: ``num_shares = k`` for odd ``k``, so Flower masks with ``k - 1`` neighbours, one
fewer than securefml; both are recorded), no dropouts.  Per-round wall time is taken inside the ServerApp (securefml:
``SecureStrategy`` from ``configure_train`` to the end of ``aggregate_train``; Flower: one call
of ``SecAggPlusWorkflow``), so Ray's start-up is outside both.  Bytes per client are the
record bytes of the replies that reach the ServerApp (config-record values plus array data),
counted by the same ``Grid`` wrapper for both, divided by ``N``.

The securefml side drives ``SecAggPlus``'s halves; until ``SecAggPlus.server_half`` is ported
(another branch) it builds them from ``protocols/secagg_halves.py`` as the tests do
(``tests/flower/halves_adapters.py``).  The ratio is against Flower measured in this run; when
Flower is not installed the JSON says ``"anchor": "not measured"``.

Usage: ``python benchmarks/flower.py [--nodes 20 100] [--length 100000] [--rounds 3]
[--out benchmarks/json/flower.json]``.  Run under ``nice``; the machine's load is recorded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tests.flower.halves_adapters

from peers import NOT_MEASURED, machine, write_report  # noqa: E402


def _record_bytes(content: Any) -> int:
    total = 0
    for rec in content.config_records.values():
        for v in rec.values():
            for item in (v if isinstance(v, list) else [v]):
                total += len(item) if isinstance(item, (bytes, str)) else 8  # int, float, bool: 8 on the wire
    for rec in content.array_records.values():
        for arr in rec.values():
            total += len(arr.data)
    return int(total)


def _counting(grid: Any, sink: list[int]) -> Any:
    from flwr.serverapp import Grid

    class CountingGrid(Grid):
        """Delegates to ``grid``; adds up the record bytes of every reply."""

        def set_run(self, run: Any) -> None:
            grid.set_run(run)

        @property
        def run(self) -> Any:
            return grid.run

        def create_message(self, *a: Any, **k: Any) -> Any:
            return grid.create_message(*a, **k)

        def get_node_ids(self) -> Iterable[int]:
            return grid.get_node_ids()

        def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
            return grid.push_messages(messages)

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
            return grid.pull_messages(message_ids)

        def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            sink.append(sum(_record_bytes(m.content) for m in replies if m.has_content()))
            return replies

    return CountingGrid()


def _vectors(n: int, length: int) -> dict[int, np.ndarray]:
    gen = np.random.default_rng(0)
    return {c: (0.1 * gen.standard_normal(length)).astype(np.float32) for c in range(n)}


def _securefml_protocol(k: int, t: int) -> Any:
    from securefml.protocols.secagg import SecAggPlus

    probe = SecAggPlus(neighbours=k, threshold=t, max_weight=1.0)
    try:
        from securefml.protocols.base import HalvesSetup
        from securefml.updates import LayerLayout

        probe.server_half(0, LayerLayout([("w", (2,))]), [0, 1], setup=HalvesSetup(defense=None))  # type: ignore[arg-type]
        return probe, "SecAggPlus.server_half"
    except NotImplementedError:
        from tests.flower.halves_adapters import SecAggHalves

        return SecAggHalves(neighbours=k, threshold=t, max_weight=1.0), "secagg_halves (port pending)"


def run_securefml(n: int, length: int, rounds: int, k: int, t: int, backend: dict[str, Any]) -> dict[str, Any]:
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from securefml.defenses import make_defense
    from securefml.flower import SecureStrategy, StrategyConfig, add_hello, forget_halves, securefml_mod
    from securefml.flower.records import GLOBAL_KEY, METRICS_KEY, UPDATE_KEY, write_vector
    from securefml.updates import LayerLayout

    forget_halves()
    layout = LayerLayout([("w", (length,))])
    proto, driver = _securefml_protocol(k, t)
    vectors = _vectors(n, length)
    app = ClientApp(mods=[securefml_mod(proto, layout)])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        mine = vectors[int(ctx.node_config["partition-id"])]
        content = write_vector(RecordDict(), UPDATE_KEY, torch.from_numpy(mine))
        content[METRICS_KEY] = MetricRecord({"num_examples": 1.0})
        return Message(content, reply_to=msg)

    add_hello(app)
    strategy = SecureStrategy(proto, make_defense("mean"), layout, torch.zeros(length),
                              config=StrategyConfig(clients_per_round=n, min_nodes=n, max_weight=1.0),
                              cohort_fn=lambda _r, ids: ids)
    sink: list[int] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        g = _counting(grid, sink)
        strategy._discover(g)  # the one-time hello outside the timed rounds
        sink.clear()
        arrays = write_vector(RecordDict(), GLOBAL_KEY, torch.zeros(length)).array_records[GLOBAL_KEY]
        strategy.start(grid=g, initial_arrays=arrays, num_rounds=rounds)

    run_simulation(server_app=server, client_app=app, num_supernodes=n, backend_config=backend)
    secs = [r.seconds for r in strategy.history]
    ok = all(len(r.accepted) == n for r in strategy.history) and len(secs) == rounds
    mean = np.mean(np.stack(list(vectors.values())), 0)
    err = float(np.abs(strategy.model.vector.numpy() - mean).max()) if rounds == 1 else None
    return {"round_s": secs, "median_round_s": statistics.median(secs[1:] or secs), "all_accepted": ok,
            "bytes_per_client_per_round": sum(sink) / (n * rounds), "driver": driver,
            "stages": strategy.history[0].stages if strategy.history else [], "max_abs_error": err}


def run_flower(n: int, length: int, rounds: int, k: int, t: int, backend: dict[str, Any]) -> dict[str, Any]:
    from flwr.app import Context
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation

    vectors = _vectors(n, length)
    shares = k if k % 2 else k + 1  # Flower's ring: (shares - 1) / 2 neighbours on each side, one share kept

    class Fixed(NumPyClient):  # type: ignore[misc]
        def __init__(self, cid: int) -> None:
            self.cid = cid

        def fit(self, parameters: Any, config: Any) -> Any:
            return [vectors[self.cid]], 1, {}

    def client_fn(context: Context) -> Any:
        return Fixed(int(context.node_config["partition-id"])).to_client()

    client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    times: list[float] = []
    sink: list[int] = []

    class Timed(SecAggPlusWorkflow):  # type: ignore[misc]
        def __call__(self, grid: Any, context: Any) -> None:
            sink.clear() if not times else None
            t0 = time.perf_counter()
            super().__call__(_counting(grid, sink), context)
            times.append(time.perf_counter() - t0)

    server = ServerApp()
    captured: dict[str, Any] = {}

    @server.main()
    def main(grid: Any, context: Any) -> None:
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
                          initial_parameters=ndarrays_to_parameters([np.zeros(length, np.float32)]))
        ctx = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        DefaultWorkflow(fit_workflow=Timed(num_shares=shares, reconstruction_threshold=t, max_weight=1.0,
                                           clipping_range=1.0))(grid, ctx)
        captured["ctx"] = ctx

    run_simulation(server_app=server, client_app=client, num_supernodes=n, backend_config=backend)
    return {"round_s": times, "median_round_s": statistics.median(times[1:] or times) if times else None,
            "bytes_per_client_per_round": sum(sink) / (n * max(1, len(times))) if times else None,
            "num_shares": shares, "neighbours": shares - 1, "reconstruction_threshold": t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--length", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=15, help="neighbours (capped at N-1)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    out: dict[str, Any] = {"benchmark": "flower", "length": args.length, "rounds": args.rounds,
                           "machine_before": machine(), "scenarios": []}
    try:
        import flwr

        out["flower_version"] = flwr.__version__
    except ImportError:
        out["flower"] = {"anchor": NOT_MEASURED}
        print(json.dumps(out, indent=2))
        return
    from securefml.flower.engine import backend_config

    backend = backend_config()
    out["partial"] = True  # until every scenario ran: the JSON is written after each one
    for n in args.nodes:
        k = min(args.k, n - 1)
        t = k // 2 + 1
        ours = run_securefml(n, args.length, args.rounds, k, t, backend)
        peer = run_flower(n, args.length, args.rounds, k, t, backend)
        ratio = (peer["median_round_s"] / ours["median_round_s"]
                 if peer["median_round_s"] and ours["median_round_s"] else None)
        out["scenarios"].append({
            "nodes": n, "k": k, "t": t, "securefml": ours, "flower_secaggplus": peer,
            "flower_over_securefml_round_time": ratio,
            "bytes_ratio_flower_over_securefml": (peer["bytes_per_client_per_round"]
                                                  / ours["bytes_per_client_per_round"]
                                                  if peer["bytes_per_client_per_round"] else None),
        })
        if args.out:
            Path(args.out).write_text(json.dumps({**out, "machine_after": machine()}, indent=2) + "\n")
    out.pop("partial")
    out["machine_after"] = machine()
    out["cpus"] = os.cpu_count()
    write_report(out, args.out)


if __name__ == "__main__":
    main()
