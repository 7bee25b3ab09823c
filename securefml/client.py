"""A federated client: local task -> meta-update -> flat update over the round's layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from securefml.attacks.base import Attack
from securefml.data.base import Task
from securefml.meta.base import MetaLearner, Params
from securefml.protocols.base import check_finite
from securefml.updates import LayerLayout

__all__ = ["Client", "LocalResult"]


@dataclass
class LocalResult:
    """What a client computed in a round, before selection and encoding."""

    client_id: int
    update: torch.Tensor  # full-length flat update, laid out by the round's LayerLayout
    weight: float
    metrics: dict[str, float]


@dataclass
class Client:
    """One participant.  A malicious client carries the attack that controls it.

    Data poisoning happens once, when the client is built (``attack.poison_task``); model
    poisoning happens in the server loop, where the colluding group's updates are rewritten
    together (``attack.poison_updates``) before encoding.
    """

    task: Task
    attack: Attack | None = None
    #: withheld part of earlier updates, re-sent later when the selector uses error feedback
    residual: torch.Tensor | None = None

    @property
    def client_id(self) -> int:
        return self.task.client_id

    @property
    def malicious(self) -> bool:
        return self.attack is not None

    @classmethod
    def build(cls, task: Task, *, attack: Attack | None = None, generator: torch.Generator | None = None) -> Client:
        if attack is not None:
            task = attack.poison_task(task, generator=generator)
        return cls(task, attack)

    def local_update(
        self, learner: MetaLearner, params: Params, layout: LayerLayout, *, device: torch.device | str = "cpu"
    ) -> LocalResult:
        """Run the learner's client step and flatten the difference ``theta_local - theta``.

        Raises ``InvalidUpdateError`` (naming this client) if the update is not finite.
        """
        task = self.task.to(device)
        update, metrics = learner.update(params, task)
        flat = layout.flatten(update).detach()
        check_finite(flat, self.client_id)
        return LocalResult(self.client_id, flat, float(task.support_x.shape[0]), metrics)
