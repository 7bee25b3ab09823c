"""MAML (Finn et al., 2017) and its first-order approximation, on ``torch.func``."""

from __future__ import annotations

import torch
from torch.func import grad

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

    def meta_gradient(self, params: Params, task: Task) -> tuple[Params, float]:
        if self.first_order:
            adapted = self.adapt(params, task.support_x, task.support_y, task.kind)
            adapted = {n: p.detach() for n, p in adapted.items()}
            loss = self.loss(adapted, task.query_x, task.query_y, task.kind)
            g = grad(lambda p: self.loss(p, task.query_x, task.query_y, task.kind))(adapted)
            return g, float(loss)
        g = grad(self.query_loss)(params, task)
        return g, float(self.query_loss(params, task).detach())

    def meta_update(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        loss = 0.0
        for _ in range(self.config.outer_steps):
            g, loss = self.meta_gradient(params, task)
            params = {n: (p - self.config.outer_lr * g[n]).detach() for n, p in params.items()}
        return params, {"query_loss": loss}


class FOMAML(MAML):
    """First-order MAML: the query gradient at the adapted weights, no second derivatives."""

    name = "fomaml"
    first_order = True
