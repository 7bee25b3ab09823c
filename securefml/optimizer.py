"""The server's step on the global model from one round's aggregate.

The aggregate is a pseudo-gradient: ``-aggregate`` is fed to SGD or Adam on the flat global
vector, and every layer nobody uploaded keeps its value (``RoundOutput.layer_weight == 0``).
One class for the in-process ``securefml.server.Server`` and the Flower strategy, so both take
the same step (the Flower interop tests compare their models).
"""

from __future__ import annotations

import torch

from securefml.errors import ConfigError
from securefml.rounds import RoundOutput
from securefml.updates import LayerLayout

__all__ = ["ServerOptimizer"]


class ServerOptimizer:
    """SGD or Adam on the flat global vector; ``step(out)`` applies one round's aggregate.

    Parameters
    ----------
    layout:
        The model's layer layout (which slice is which layer).
    vector:
        The initial global vector (copied).
    name, lr:
        ``"sgd"`` or ``"adam"`` and its learning rate.
    """

    def __init__(self, layout: LayerLayout, vector: torch.Tensor, *, name: str = "sgd", lr: float = 1.0) -> None:
        if lr <= 0:
            raise ConfigError(f"server_lr must be positive, got {lr}")
        if vector.numel() != layout.numel:
            raise ConfigError(f"global vector has {vector.numel()} entries, the layout {layout.numel}")
        self.layout = layout
        self._vector = torch.nn.Parameter(vector.detach().to(torch.float32).clone())
        if name == "sgd":
            self._opt: torch.optim.Optimizer = torch.optim.SGD([self._vector], lr=lr)
        elif name == "adam":
            self._opt = torch.optim.Adam([self._vector], lr=lr)
        else:
            raise ConfigError(f"unknown server optimizer {name!r}; choose sgd or adam")

    @property
    def vector(self) -> torch.Tensor:
        """The current global vector (a detached view; do not modify)."""
        return self._vector.detach()

    def assign(self, vector: torch.Tensor) -> None:
        """Set the global vector outright (a server that decides the model itself, e.g. relevance)."""
        with torch.no_grad():
            self._vector.copy_(vector.to(self._vector.device, self._vector.dtype))

    def step(self, out: RoundOutput) -> None:
        """One optimizer step on ``-out.aggregate``; no-op when nothing was accepted."""
        if not out.accepted:
            return
        agg = out.aggregate.to(self._vector.device, self._vector.dtype)
        untouched = self.layout.mask([n for n, w in out.layer_weight.items() if w == 0], device=self._vector.device)
        before = self._vector.detach().clone()
        self._opt.zero_grad(set_to_none=False)
        self._vector.grad = -agg
        self._opt.step()
        with torch.no_grad():
            self._vector[untouched] = before[untouched]
