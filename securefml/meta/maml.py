"""MAML (Finn et al., 2017) and its first-order approximation, on ``torch.func``.

Gradients go through the learner's gradient function (``securefml.meta.gradients``):

* second-order MAML: the inner SGD steps take *traced* gradients (the query loss is
  differentiated through them) and the meta-gradient is one *released* gradient of the query
  loss through the inner loop: ``outer_steps`` released gradients per round;
* FOMAML: the inner steps take *released* gradients (constants) and the meta-gradient is one
  released gradient of the query loss at the adapted weights: ``outer_steps * (inner_steps + 1)``.
"""

from __future__ import annotations

import torch

from securefml.data.base import Task
from securefml.meta.base import Params, QueryLossLearner
from securefml.meta.registry import LEARNERS

__all__ = ["MAML", "FOMAML"]


@LEARNERS.register("maml")
class MAML(QueryLossLearner):
    """Second-order MAML: differentiate the query loss through the inner SGD steps.

    Each client (FedMeta, Chen et al. 2018) adapts on its support set, computes the
    meta-gradient on its query set and takes ``outer_steps`` meta-steps of size ``outer_lr``.
    ``torch.func.grad`` nested inside ``grad`` gives the exact Hessian-vector terms.
    """

    name = "maml"
    first_order = False

    def meta_gradient(self, params: Params, task: Task) -> tuple[Params, float]:
        g, loss = self._meta_gradient(params, task.support_x, task.support_y, task.query_x, task.query_y, task.kind)
        return g, float(loss)

    def _meta_gradient(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor,
                       kind: str) -> tuple[Params, torch.Tensor]:
        cfg = self.config
        if self.first_order:
            adapted = self.sgd_adapt(params, sx, sy, kind, steps=cfg.inner_steps, lr=cfg.inner_lr)
            return self.gradients.with_value(self.loss_fn(kind), adapted, (qx, qy))

        def through_inner_loop(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            adapted = self.sgd_adapt(p, sx, sy, kind, steps=cfg.inner_steps, lr=cfg.inner_lr, traced=True)
            return self.loss(adapted, x, y, kind)

        return self.gradients.with_value(through_inner_loop, params, (qx, qy))


@LEARNERS.register("fomaml")
class FOMAML(MAML):
    """First-order MAML: the query gradient at the adapted weights, no second derivatives."""

    name = "fomaml"
    first_order = True
