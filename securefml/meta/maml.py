"""MAML (Finn et al., 2017) and its first-order approximation, on ``torch.func``."""

from __future__ import annotations

import torch
from torch.func import grad_and_value

from securefml.data.base import Task
from securefml.meta.base import MetaLearner, Params

__all__ = ["MAML", "FOMAML"]


class MAML(MetaLearner):
    """Second-order MAML: differentiate the query loss through the inner SGD steps.

    Each client (FedMeta, Chen et al. 2018) adapts on its support set, computes the
    meta-gradient on its query set and takes ``outer_steps`` meta-steps of size ``outer_lr``.
    ``torch.func.grad`` nested inside ``grad`` gives the exact Hessian-vector terms.
    """

    name = "maml"
    first_order = False

    def query_loss(self, params: Params, task: Task) -> torch.Tensor:
        adapted = self.adapt(params, task.support_x, task.support_y, task.kind)
        return self.loss(adapted, task.query_x, task.query_y, task.kind)

    def _query_loss(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor,
                    kind: str) -> torch.Tensor:
        return self.loss(self.adapt(params, sx, sy, kind), qx, qy, kind)

    def meta_gradient(self, params: Params, task: Task) -> tuple[Params, float]:
        g, loss = self._meta_gradient(params, task.support_x, task.support_y, task.query_x, task.query_y, task.kind)
        return g, float(loss)

    def _meta_gradient(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor,
                       kind: str) -> tuple[Params, torch.Tensor]:
        if self.first_order:
            adapted = {n: p.detach() for n, p in self.adapt(params, sx, sy, kind).items()}
            g, loss = grad_and_value(lambda p: self.loss(p, qx, qy, kind))(adapted)
            return g, loss.detach()
        g, loss = grad_and_value(self._query_loss)(params, sx, sy, qx, qy, kind)
        return g, loss.detach()

    def client_step(
        self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor, kind: str
    ) -> tuple[Params, torch.Tensor]:
        loss = torch.zeros(())
        for _ in range(self.config.outer_steps):
            g, loss = self._meta_gradient(params, sx, sy, qx, qy, kind)
            params = {n: (p - self.config.outer_lr * g[n]).detach() for n, p in params.items()}
        return params, loss

    meta_update = MetaLearner.meta_update_by_step


class FOMAML(MAML):
    """First-order MAML: the query gradient at the adapted weights, no second derivatives."""

    name = "fomaml"
    first_order = True
