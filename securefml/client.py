"""A federated client does client work: train, then turn its update into what it uploads.

The round flows one way.  The server broadcasts an ``UploadPlan`` (the round, the global model,
the layer set when the selection is server-dictated); each client

1. trains on its own task (``Client.local_update`` -> ``LocalResult``; the simulator may batch several
   clients' training as one ``vmap``, ``securefml.cohort``);
2. if malicious, hands its update to the ``securefml.adversary.Adversary`` that controls it;
3. prepares its upload (``Client.prepare_upload``): error feedback, layer selection (Cedar
   probes run on the client's own support inputs, here), then the user-level DP hook (clip and
   noise) on exactly what is sent;
4. encodes it in its protocol's client half (``AggregationProtocol.client_half``).

The server never reads a client's data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from securefml.attacks.base import Attack
from securefml.data.base import Task
from securefml.meta.base import MetaLearner, Params
from securefml.rounds import ClientUpdate, check_finite
from securefml.selection import LayerSelector
from securefml.updates import LayerLayout, Role

__all__ = ["Client", "LocalResult", "UploadPlan", "UpdateHook"]

#: User-level DP's client-side hook: ``hook(client_id, full_update) -> full_update`` (clip, noise).
UpdateHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class LocalResult:
    """What a client computed in a round, before selection and encoding."""

    client_id: int
    update: torch.Tensor  # full-length flat update, laid out by the round's LayerLayout
    weight: float
    metrics: dict[str, float]


@dataclass(frozen=True)
class UploadPlan:
    """What the server broadcasts with the model: how clients prepare this round's upload.

    Attributes
    ----------
    round:
        The round index.
    layout:
        The model's flat layout.
    global_vector:
        The flat global model every client starts from.
    layers:
        The layer set every client sends (server-dictated selection), or None when each client
        selects its own with ``selector``.
    selector:
        The client-driven layer selector (used only when ``layers`` is None).
    error_feedback:
        Whether honest clients carry what they withheld into their next upload.
    update_hook:
        User-level DP clipping and noise, applied last, on exactly what is sent.
    equal_weights:
        Every client weighs 1 instead of its sample count (user-level DP sizes noise for it).
    """

    round: int
    layout: LayerLayout
    global_vector: torch.Tensor
    layers: tuple[str, ...] | None
    selector: LayerSelector
    error_feedback: bool = False
    update_hook: UpdateHook | None = None
    equal_weights: bool = False


@dataclass
class Client:
    """One participant.  A malicious client carries the attack that controls it.

    Data poisoning happens once, when the client is built (``attack.poison_task``); model
    poisoning by the colluding group happens between training and upload, in the round's
    ``Adversary``.
    """

    task: Task
    attack: Attack | None = None
    #: withheld part of earlier updates, re-sent later when the selector uses error feedback; kept
    #: across the rounds the client is not sampled (on digits-fewshot a residual is ~10 rounds old
    #: when it is sent, and dropping or capping old residuals cost accuracy: docs/selection.md)
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

    def probe(
        self, learner: MetaLearner, layout: LayerLayout, *, device: torch.device | str = "cpu"
    ) -> Callable[[torch.Tensor], Mapping[str, torch.Tensor]]:
        """Per-layer features of a model on this client's own support inputs (Cedar's stimuli)."""
        stimulus = self.task.support_x[:32].to(device)
        model = learner.model
        # the model's own layers (a learner's rates and log-variances are not modules of the model)
        names = layout.layers_with_role(Role.WEIGHT)

        def probe(vector: torch.Tensor) -> Mapping[str, torch.Tensor]:
            feats: dict[str, torch.Tensor] = {}
            hooks = [
                model.get_submodule(n).register_forward_hook(lambda _m, _i, out, n=n: feats.__setitem__(n, out))
                for n in names
            ]
            try:
                with torch.no_grad():
                    learner.forward(layout.unflatten(vector), stimulus)
            finally:
                for h in hooks:
                    h.remove()
            return feats

        return probe

    def prepare_upload(
        self, result: LocalResult, plan: UploadPlan, learner: MetaLearner, *, device: torch.device | str = "cpu"
    ) -> ClientUpdate:
        """Error feedback, layer selection, then the DP hook: the update this client sends.

        The hook runs last, on exactly what is sent, so its clipping bound holds for the
        uploaded vector whatever selection and error feedback did.  A malicious client keeps no
        residual (its update is the adversary's).
        """
        layout = plan.layout
        update = result.update
        feedback = plan.error_feedback and not self.malicious
        if feedback and self.residual is not None:
            update = update + self.residual
        if plan.layers is not None:
            layers = plan.layers
        else:
            layers = plan.selector.select(layout, update, plan.global_vector,
                                          probe=self.probe(learner, layout, device=device))
        sent = layout.gather(update, layers)
        if feedback:  # what was withheld now is added to this client's next upload
            self.residual = update - layout.scatter(sent, layers)
        if plan.update_hook is not None:
            sent = layout.gather(plan.update_hook(self.client_id, layout.scatter(sent, layers)), layers)
        return ClientUpdate(self.client_id, sent, tuple(layers), 1.0 if plan.equal_weights else result.weight)
