"""Learners whose client step is plain local SGD: FedAvg and Reptile."""

from __future__ import annotations

import torch

from securefml.data.base import Task
from securefml.meta.base import MetaLearner, Params

__all__ = ["FedAvg", "Reptile"]


class FedAvg(MetaLearner):
    """FedAvg (McMahan et al., 2017): ``inner_steps`` full-batch SGD steps on all local data.

    Not a meta-learner: the baseline that personalization ("FedAvg+FT") is compared against.
    """

    name = "fedavg"

    def meta_update(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        x = torch.cat([task.support_x, task.query_x])
        y = torch.cat([task.support_y, task.query_y])
        new = self.sgd_adapt(params, x, y, task.kind, steps=self.config.inner_steps, lr=self.config.inner_lr)
        loss = float(self.loss(new, x, y, task.kind).detach())
        return {n: p.detach() for n, p in new.items()}, {"train_loss": loss}


class Reptile(MetaLearner):
    """Reptile (Nichol et al., 2018): adapt on the task, move towards the adapted weights.

    The client sends ``phi - theta`` after ``inner_steps`` SGD steps on its support set; the
    server's learning rate is Reptile's outer step size epsilon.
    """

    name = "reptile"

    def meta_update(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        new = self.adapt(params, task.support_x, task.support_y, task.kind)
        loss = float(self.loss(new, task.query_x, task.query_y, task.kind).detach())
        return {n: p.detach() for n, p in new.items()}, {"query_loss": loss}
