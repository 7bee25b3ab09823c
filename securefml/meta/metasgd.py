"""Meta-SGD (Li et al., 2017): learn a per-parameter inner learning rate with the initialization.

Gradients go through the learner's gradient function (``securefml.meta.gradients``):

* second-order (default): the inner steps ``theta - alpha * g`` take *traced* gradients and the
  meta-gradient (weights and rates) is one *released* gradient of the query loss through them;
* ``first_order=True``: the inner gradients are *released* (constants ``g_k``), so the adapted
  weights are ``theta - alpha * sum_k g_k`` and the meta-gradient is one released gradient of the
  query loss of that expression with respect to ``theta`` and ``alpha`` -- ``outer_steps *
  (inner_steps + 1)`` released gradients, every one of which record-level DP can noise.

The rates are declared on the layout as ``Role.LEARNED_RATE`` of their weight
(``layer_roles``); code outside this module finds them by role, never by their names.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from securefml.meta.base import MetaConfig, Params, QueryLossLearner
from securefml.meta.gradients import Gradients
from securefml.meta.registry import LEARNERS
from securefml.updates import ParamRole, Role

__all__ = ["MetaSGD", "ALPHA_PREFIX"]

#: how Meta-SGD names a weight's learned rate (its own naming; others query ``Role.LEARNED_RATE``)
ALPHA_PREFIX = "alpha."


@LEARNERS.register("metasgd")
class MetaSGD(QueryLossLearner):
    """Inner step ``theta - alpha * grad`` with ``alpha`` learned, shipped and aggregated.

    The rates live in the meta-parameters under ``alpha.<param name>``, so they form layers
    of their own in the ``LayerLayout`` (``alpha.layers.0`` ...), declared
    ``Role.LEARNED_RATE`` of their weight, and travel through every protocol like any other
    layer.  ``first_order=True`` treats the inner gradient as a constant (useful with
    record-level DP), which still gives alpha a gradient.
    """

    name = "metasgd"
    adapts_with_learned_rates = True

    def __init__(self, model: nn.Module, config: MetaConfig | None = None, *, first_order: bool = False,
                 gradients: Gradients | None = None) -> None:
        super().__init__(model, config, gradients=gradients)
        self.first_order = first_order
        self._rates = {n: ALPHA_PREFIX + n for n, _ in self.model.named_parameters()}

    def init_params(self, device: torch.device | str | None = None) -> Params:
        params = super().init_params(device)
        alphas = {self._rates[n]: torch.full_like(p, self.config.inner_lr) for n, p in params.items()}
        return {**params, **alphas}

    def layer_roles(self) -> Mapping[str, ParamRole]:
        return {rate: ParamRole(Role.LEARNED_RATE, of=weight) for weight, rate in self._rates.items()}

    def model_params(self, params: Params) -> Params:
        rates = set(self._rates.values())
        return {n: p for n, p in params.items() if n not in rates}

    def _adapt(self, params: Params, x: torch.Tensor, y: torch.Tensor, kind: str, *, steps: int,
               traced: bool) -> tuple[Params, Params]:
        """The inner loop; returns the adapted weights and the sum of the inner gradients."""
        weights = self.model_params(params)
        loss = self.weights_loss_fn(kind)
        take = self.gradients.traced if traced else self.gradients
        total = {n: torch.zeros_like(w) for n, w in weights.items()}
        for _ in range(steps):
            g = take(loss, weights, (x, y))
            weights = {n: w - params[self._rates[n]] * g[n] for n, w in weights.items()}
            total = {n: total[n] + g[n] for n in total}
        return weights, total

    def adapt(self, params: Params, task_x: torch.Tensor, task_y: torch.Tensor, kind: str,
              *, steps: int | None = None) -> Params:
        steps = self.config.inner_steps if steps is None else steps
        return self._adapt(params, task_x, task_y, kind, steps=steps, traced=False)[0]

    def _meta_gradient(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor,
                       kind: str) -> tuple[Params, torch.Tensor]:
        steps = self.config.inner_steps
        if self.first_order:
            _, total = self._adapt(params, sx, sy, kind, steps=steps, traced=False)  # released: constants

            def query(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                adapted = {n: p[n] - p[self._rates[n]] * g for n, g in total.items()}
                return self.loss(adapted, x, y, kind)
        else:

            def query(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return self.loss(self._adapt(p, sx, sy, kind, steps=steps, traced=True)[0], x, y, kind)

        return self.gradients.with_value(query, params, (qx, qy))

