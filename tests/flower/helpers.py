"""Small fixtures shared by the Flower tests: a ClientApp whose training returns a known update."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from securefml.flower import LocalGrid, add_hello, securefml_mod
from securefml.flower.client import ClientHalves, ServiceHost
from securefml.flower.records import METRICS_KEY, UPDATE_KEY, write_vector
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("w", (3, 4)), ("b", (4,))])


def known_updates(n: int, seed: int = 0, scale: float = 0.1) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {c: scale * torch.randn(LAYOUT.numel, generator=gen) for c in range(n)}


def fixed_app(
    protocol: ClientHalves,
    updates: Mapping[int, torch.Tensor],
    weights: Mapping[int, float] | None = None,
    layout: LayerLayout = LAYOUT,
    services: ServiceHost | None = None,
) -> ClientApp:
    """A ClientApp (wrapped in ``securefml_mod``) whose training returns ``updates[client]``."""
    app = ClientApp(mods=[securefml_mod(protocol, layout, services=services)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cid = int(context.node_config["partition-id"])
        content = write_vector(RecordDict(), UPDATE_KEY, updates[cid])
        content[METRICS_KEY] = MetricRecord({"num_examples": float((weights or {}).get(cid, 1.0))})
        return Message(content, reply_to=msg)

    return add_hello(app, services=services)


def local_grid(app: ClientApp, n: int, *, offline: Callable[[int, Message], bool] | None = None,
               extra: Mapping[int, Mapping[str, bool | float | int | str]] | None = None) -> LocalGrid:
    """``n`` nodes with ids 100+c running ``app``, client c's partition id c; ``extra``: node id -> config."""
    configs: dict[int, Mapping[str, bool | float | int | str]] = {100 + c: {"partition-id": c} for c in range(n)}
    configs.update(extra or {})
    return LocalGrid({node: app for node in configs}, configs, offline=offline)
