"""Small fixtures shared by the Flower tests: a ClientApp whose training returns a known update."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from securefml.flower import LocalGrid, add_hello, securefml_mod
from securefml.flower.records import METRICS_KEY, UPDATE_KEY, write_vector
from securefml.protocols.base import AggregationProtocol
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("w", (3, 4)), ("b", (4,))])


def known_updates(n: int, seed: int = 0, scale: float = 0.1) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {c: scale * torch.randn(LAYOUT.numel, generator=gen) for c in range(n)}


def fixed_app(
    protocol: AggregationProtocol,
    updates: Mapping[int, torch.Tensor],
    weights: Mapping[int, float] | None = None,
    layout: LayerLayout = LAYOUT,
) -> ClientApp:
    """A ClientApp (wrapped in ``securefml_mod``) whose training returns ``updates[client]``."""
    app = ClientApp(mods=[securefml_mod(protocol, layout)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cid = int(context.node_config["partition-id"])
        content = write_vector(RecordDict(), UPDATE_KEY, updates[cid])
        content[METRICS_KEY] = MetricRecord({"num_examples": float((weights or {}).get(cid, 1.0))})
        return Message(content, reply_to=msg)

    return add_hello(app)


def local_grid(app: ClientApp, n: int, *, offline: Callable[[int, Message], bool] | None = None) -> LocalGrid:
    """``n`` nodes with ids 100+c running ``app``, client c's partition id c."""
    return LocalGrid({100 + c: app for c in range(n)}, {100 + c: {"partition-id": c} for c in range(n)},
                     offline=offline)
