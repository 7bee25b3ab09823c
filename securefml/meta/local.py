"""Learners whose client step is plain local SGD: FedAvg and Reptile.

Each SGD step takes one released gradient (``MetaLearner.sgd_adapt``), so under record-level DP
every step is a DP-SGD step and a round is ``inner_steps`` compositions.
"""

from __future__ import annotations

import torch

from securefml.meta.base import MetaLearner, Params
from securefml.meta.registry import LEARNERS

__all__ = ["FedAvg", "Reptile"]


@LEARNERS.register("fedavg")
class FedAvg(MetaLearner):
    """FedAvg (McMahan et al., 2017): ``inner_steps`` full-batch SGD steps on all local data.

    Not a meta-learner: the baseline that personalization ("FedAvg+FT") is compared against.
    """

    name = "fedavg"
    step_loss_name = "train_loss"

    def released_gradients(self) -> int:
        return self.config.inner_steps

    def client_step(
        self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor, kind: str
    ) -> tuple[Params, torch.Tensor]:
        x = torch.cat([sx, qx])
        y = torch.cat([sy, qy])
        new = self.sgd_adapt(params, x, y, kind, steps=self.config.inner_steps, lr=self.config.inner_lr)
        return new, self.loss(new, x, y, kind).detach()

    meta_update = MetaLearner.meta_update_by_step


@LEARNERS.register("reptile")
class Reptile(MetaLearner):
    """Reptile (Nichol et al., 2018): adapt on the task, move towards the adapted weights.

    The client sends ``phi - theta`` after ``inner_steps`` SGD steps on its support set; the
    server's learning rate is Reptile's outer step size epsilon.
    """

    name = "reptile"

    def released_gradients(self) -> int:
        return self.config.inner_steps

    def client_step(
        self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor, kind: str
    ) -> tuple[Params, torch.Tensor]:
        new = self.adapt(params, sx, sy, kind)
        return new, self.loss(new, qx, qy, kind).detach()

    meta_update = MetaLearner.meta_update_by_step
