"""Meta-SGD (Li et al., 2017): learn a per-parameter inner learning rate with the initialization."""

from __future__ import annotations

import torch
from torch.func import grad, grad_and_value

from securefml.data.base import Task
from securefml.meta.base import MetaLearner, Params, task_loss

__all__ = ["MetaSGD", "ALPHA_PREFIX"]

ALPHA_PREFIX = "alpha."


class MetaSGD(MetaLearner):
    """Inner step ``theta - alpha * grad`` with ``alpha`` learned, shipped and aggregated.

    The rates live in the meta-parameters under ``alpha.<param name>``, so they form layers
    of their own in the ``LayerLayout`` (``alpha.layers.0`` ...) and travel through every
    protocol like any other layer.  ``first_order=True`` treats the inner gradient as a
    constant (useful with record-level DP), which still gives alpha a gradient.
    """

    name = "metasgd"
    adapts_with_learned_rates = True

    def __init__(self, model, config=None, *, first_order: bool = False) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model, config)
        self.first_order = first_order

    def init_params(self, device: torch.device | str | None = None) -> Params:
        params = super().init_params(device)
        alphas = {ALPHA_PREFIX + n: torch.full_like(p, self.config.inner_lr) for n, p in params.items()}
        return {**params, **alphas}

    def model_params(self, params: Params) -> Params:
        return {n: p for n, p in params.items() if not n.startswith(ALPHA_PREFIX)}

    def adapt(self, params: Params, task_x: torch.Tensor, task_y: torch.Tensor, kind: str,
              *, steps: int | None = None) -> Params:
        steps = self.config.inner_steps if steps is None else steps
        weights = self.model_params(params)
        loss_fn = task_loss(kind)
        grad_fn = grad(lambda p: loss_fn(self.forward(p, task_x), task_y))
        for _ in range(steps):
            g = grad_fn(weights)
            if self.first_order:
                g = {n: t.detach() for n, t in g.items()}
            weights = {n: w - params[ALPHA_PREFIX + n] * g[n] for n, w in weights.items()}
        return weights

    def query_loss(self, params: Params, task: Task) -> torch.Tensor:
        adapted = self.adapt(params, task.support_x, task.support_y, task.kind)
        return self.loss(adapted, task.query_x, task.query_y, task.kind)

    def _query_loss(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor,
                    kind: str) -> torch.Tensor:
        return self.loss(self.adapt(params, sx, sy, kind), qx, qy, kind)

    def client_step(
        self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor, kind: str
    ) -> tuple[Params, torch.Tensor]:
        loss = torch.zeros(())
        for _ in range(self.config.outer_steps):
            g, loss = grad_and_value(self._query_loss)(params, sx, sy, qx, qy, kind)
            loss = loss.detach()
            params = {n: (p - self.config.outer_lr * g[n]).detach() for n, p in params.items()}
        return params, loss

    meta_update = MetaLearner.meta_update_by_step
