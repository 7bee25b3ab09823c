"""The small interface every meta-learner implements, written on ``torch.func``.

A learner is stateless apart from its configuration: it maps ``(params, task)`` to a new set
of parameters.  Parameters are plain ``dict[str, Tensor]`` so that the same code runs on any
device and composes with ``torch.func.grad``/``vmap`` (second-order MAML, per-example
gradients for DP).

Vectorized cohorts (issue 15): a learner whose round is a pure function of the client's
tensors (``client_step``: MAML, FOMAML, Meta-SGD, Reptile, FedAvg) runs a whole cohort of
same-shaped tasks as one ``torch.func.vmap`` over the stacked tasks (``update_many``), the
same code as one client at a time, so the results agree to float rounding.  Learners that
do anything else per client (record-level DP, which keeps a ledger per client) keep the
loop: ``update_many`` falls back to ``update``.

Gradients (issue 13).  Every gradient a learner takes of a loss on local data goes through
``self.gradients`` (``securefml.meta.gradients``), injected at construction (default:
``PlainGradients``, i.e. ``torch.func.grad``); ``with_gradients`` returns the same learner
with another gradient function, which is how record-level DP privatizes any learner that
declares ``released_gradients()``.

Layer roles.  A learner declares what each of its extra meta-parameters is
(``layer_roles()``: Meta-SGD's learned rates, the Bayesian learners' log-variances) and
``layout()`` puts those roles on the ``LayerLayout``, where selection, attacks and the server
query them (``layout.layers_with_role(Role.LEARNED_RATE)``) instead of matching name prefixes.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from torch.func import functional_call, vmap

from securefml.data.base import Task
from securefml.errors import ConfigError
from securefml.meta.gradients import Gradients, LossFn, Params, PlainGradients
from securefml.models import batchnorm_on_batch_statistics
from securefml.updates import LayerLayout, ParamRole

__all__ = ["MetaConfig", "MetaLearner", "QueryLossLearner", "Params", "task_loss"]

_L = TypeVar("_L", bound="MetaLearner")


@dataclass(frozen=True)
class MetaConfig:
    """Hyper-parameters shared by the learners.

    Attributes
    ----------
    inner_steps:
        Adaptation (inner-loop) steps on the support set; for FedAvg/Reptile, local SGD steps.
    inner_lr:
        Inner-loop learning rate (Meta-SGD's initial per-parameter rate).
    outer_lr:
        Client-side learning rate of the meta-step (MAML/FOMAML/Meta-SGD).
    outer_steps:
        Meta-steps each client takes per round before sending its update.
    """

    inner_steps: int = 5
    inner_lr: float = 0.01
    outer_lr: float = 0.001
    outer_steps: int = 1

    def __post_init__(self) -> None:
        if self.inner_steps < 0 or self.outer_steps < 1:
            raise ConfigError("inner_steps must be >= 0 and outer_steps >= 1")
        if not (self.inner_lr > 0 and self.outer_lr > 0):
            raise ConfigError("learning rates must be positive")


def task_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "classification":
        return nn.functional.cross_entropy
    if kind == "regression":
        return nn.functional.mse_loss
    raise ConfigError(f"unknown task kind {kind!r}")


class MetaLearner(ABC):
    """Base class: ``adapt`` (inner loop) and ``meta_update`` (one client's round).

    Parameters
    ----------
    model:
        The architecture; its own parameters are never modified (``functional_call``).  A model
        with BatchNorm is run on a copy whose BatchNorm layers use batch statistics
        (``securefml.models.batchnorm_on_batch_statistics`` says why).
    config:
        Learning rates and step counts.
    gradients:
        How the learner takes every gradient of a loss on local data
        (:class:`~securefml.meta.gradients.Gradients`; default ``PlainGradients``).
    """

    name = "learner"
    #: whether personalization should use the learner's own adaptation (Meta-SGD's rates)
    adapts_with_learned_rates = False

    def __init__(self, model: nn.Module, config: MetaConfig | None = None, *,
                 gradients: Gradients | None = None) -> None:
        self.model = batchnorm_on_batch_statistics(model)  # BatchNorm on batch statistics: see there
        self.config = config or MetaConfig()
        self.gradients: Gradients = gradients if gradients is not None else PlainGradients()

    # -- the gradient contract ---------------------------------------------------------------
    def with_gradients(self: _L, gradients: Gradients) -> _L:
        """This learner (a shallow copy sharing model and config) taking its gradients through ``gradients``."""
        clone = copy.copy(self)
        clone.gradients = gradients
        return clone

    def released_gradients(self) -> int | None:
        """Released gradients one client round takes through ``self.gradients`` (``None``: unknown).

        A learner returns a count only if *every* gradient it takes of local data goes through
        ``self.gradients`` and its round's output is computed from those gradients and public
        values alone: record-level DP relies on it (each released gradient is one composition on
        the client's ledger, planned before the run) and refuses a learner returning ``None``.
        """
        return None

    @property
    def traces_local_gradients(self) -> bool:
        """Whether the round differentiates through gradients of local data (``Gradients.traced``).

        Those examples (the support set of second-order MAML / Meta-SGD) influence every
        per-example outer gradient, so record-level DP does not cover them.
        """
        return False

    # -- layer roles -------------------------------------------------------------------------
    def layer_roles(self) -> Mapping[str, ParamRole]:
        """Role of each meta-parameter that is not a plain model weight (none by default)."""
        return {}

    def layout(self, device: torch.device | str | None = None) -> LayerLayout:
        """The ``LayerLayout`` of ``init_params`` with the roles this learner declares."""
        return LayerLayout.from_params(self.init_params(device), roles=self.layer_roles())

    # -- parameters ------------------------------------------------------------------------
    def init_params(self, device: torch.device | str | None = None) -> Params:
        """Meta-parameters the server holds and broadcasts (model weights, plus extras)."""
        return {n: p.detach().clone().to(device or p.device) for n, p in self.model.named_parameters()}

    def model_params(self, params: Params) -> Params:
        """The subset of ``params`` that are model weights (drops learner-specific extras)."""
        return params

    # -- functional model ------------------------------------------------------------------
    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.model_params(params), (x,))

    def loss(self, params: Params, x: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
        return task_loss(kind)(self.forward(params, x), y)

    def loss_fn(self, kind: str) -> LossFn:
        """``loss(params, x, y)`` for the gradient contract: this learner's batch-mean task loss."""
        return lambda p, x, y: self.loss(p, x, y, kind)

    def weights_loss_fn(self, kind: str) -> LossFn:
        """The task loss of the bare model at model weights ``p`` (what the SGD inner loop steps on)."""
        lf = task_loss(kind)
        return lambda p, x, y: lf(functional_call(self.model, p, (x,)), y)

    def sgd_adapt(self, params: Params, x: torch.Tensor, y: torch.Tensor, kind: str, *, steps: int,
                  lr: float, traced: bool = False) -> Params:
        """Plain SGD on the model weights, one gradient through ``self.gradients`` per step.

        ``traced=True`` takes traced gradients (differentiable: second-order MAML's inner loop);
        otherwise released ones (constants: FedAvg, Reptile, first-order learners).
        """
        weights = self.model_params(params)
        loss = self.weights_loss_fn(kind)
        take = self.gradients.traced if traced else self.gradients
        for _ in range(steps):
            g = take(loss, weights, (x, y))
            weights = {n: w - lr * g[n] for n, w in weights.items()}
        return weights

    def adapt(self, params: Params, task_x: torch.Tensor, task_y: torch.Tensor, kind: str,
              *, steps: int | None = None) -> Params:
        """Fine-tune on a support set; returns model weights (personalization uses this)."""
        steps = self.config.inner_steps if steps is None else steps
        return self.sgd_adapt(params, task_x, task_y, kind, steps=steps, lr=self.config.inner_lr)

    def calibrate(self, adapted: Params, support_x: torch.Tensor, support_y: torch.Tensor, kind: str) -> Params:
        """Post-hoc calibration of adapted parameters on the support set (none by default).

        Personalization calls it after ``adapt``; temperature scaling
        (``securefml.bayes.MetaSGDTemperature``) overrides it.
        """
        return adapted

    # -- one client round --------------------------------------------------------------------
    #: name of the loss ``client_step`` returns, as reported in the metrics
    step_loss_name = "query_loss"

    @abstractmethod
    def meta_update(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        """Return the client's new meta-parameters (detached) and training metrics."""

    def client_step(
        self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor, kind: str
    ) -> tuple[Params, torch.Tensor]:
        """One client's round as a pure tensor function: new meta-parameters and the loss.

        Learners that define it get ``meta_update`` for one task and ``update_many`` for a
        vmapped cohort from this one function.  Must not leave tensor-land (no ``float()``).
        A learner without it defines ``meta_update`` itself and runs one client at a time
        (``vectorizes`` is then False); calling it there is a configuration error.
        """
        raise ConfigError(
            f"{type(self).__name__} has no client_step: it updates one client at a time through meta_update"
        )

    def meta_update_by_step(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        """``meta_update`` through ``client_step`` (assign it as ``meta_update`` in a subclass)."""
        new, loss = self.client_step(params, task.support_x, task.support_y, task.query_x, task.query_y, task.kind)
        return {n: p.detach() for n, p in new.items()}, {self.step_loss_name: float(loss.detach())}

    def update(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        """``meta_update`` as a difference: ``theta_local - theta`` (what the client uploads)."""
        new, metrics = self.meta_update({n: p.detach() for n, p in params.items()}, task)
        return {n: (new[n] - params[n]).detach() for n in params}, metrics

    def vectorizes(self, tasks: Sequence[Task]) -> bool:
        """Whether ``update_many`` runs ``tasks`` as one vmap.

        True when the learner's round is exactly ``client_step`` (neither ``meta_update`` nor
        ``update`` overridden by a subclass, e.g. a DP wrapper), its gradient function is a pure
        tensor function (``Gradients.vmappable``), and the tasks can be stacked: at least two,
        with identical shapes, dtypes, kind and device.
        """
        cls = type(self)
        if cls.meta_update is not MetaLearner.meta_update_by_step or cls.update is not MetaLearner.update:
            return False
        if not self.gradients.vmappable:  # e.g. DP gradients: per-client coins, noise and ledger
            return False
        if len(tasks) < 2:
            return False
        first = tasks[0]

        def sig(t: Task) -> tuple[object, ...]:
            ts = (t.support_x, t.support_y, t.query_x, t.query_y)
            return (t.kind, *(x.shape for x in ts), *(x.dtype for x in ts), *(x.device for x in ts))

        want = sig(first)
        return all(sig(t) == want for t in tasks[1:])

    def update_many(self, params: Params, tasks: Sequence[Task]) -> list[tuple[Params, dict[str, float]]]:
        """``[self.update(params, t) for t in tasks]``, as one ``vmap`` when ``vectorizes(tasks)``."""
        if not self.vectorizes(tasks):
            return [self.update(params, t) for t in tasks]
        base = {n: p.detach() for n, p in params.items()}
        kind = tasks[0].kind
        fields = ("support_x", "support_y", "query_x", "query_y")
        stacked = [torch.stack([getattr(t, k) for t in tasks]) for k in fields]

        def one(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor) -> tuple[Params, torch.Tensor]:
            return self.client_step(base, sx, sy, qx, qy, kind)

        new, loss = vmap(one)(*stacked)
        losses = loss.detach().tolist()
        return [({n: (new[n][i] - base[n]).detach() for n in base}, {self.step_loss_name: losses[i]})
                for i in range(len(tasks))]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class QueryLossLearner(MetaLearner):
    """A learner whose round adapts on the support set and differentiates the query loss (MAML, Meta-SGD).

    ``first_order`` decides what record-level DP must account for: second order differentiates
    through the inner gradients (one released gradient per outer step; the support set is traced),
    first order releases every inner gradient as a constant (``inner_steps + 1`` per outer step).
    """

    first_order = False

    def released_gradients(self) -> int:
        cfg = self.config
        return cfg.outer_steps * (cfg.inner_steps + 1) if self.first_order else cfg.outer_steps

    @property
    def traces_local_gradients(self) -> bool:
        return not self.first_order

    def query_loss(self, params: Params, task: Task) -> torch.Tensor:
        """The query loss after ``adapt`` on the support set: what the meta-gradient differentiates."""
        adapted = self.adapt(params, task.support_x, task.support_y, task.kind)
        return self.loss(adapted, task.query_x, task.query_y, task.kind)

    @abstractmethod
    def _meta_gradient(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor,
                       qy: torch.Tensor, kind: str) -> tuple[Params, torch.Tensor]:
        """The gradient of the query loss after adaptation, and that loss."""

    def client_step(
        self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor, kind: str
    ) -> tuple[Params, torch.Tensor]:
        """``outer_steps`` meta-steps of size ``outer_lr``; a parameter without a gradient stays."""
        loss = torch.zeros(())
        for _ in range(self.config.outer_steps):
            g, loss = self._meta_gradient(params, sx, sy, qx, qy, kind)
            params = {n: (p - self.config.outer_lr * g[n]).detach() if n in g else p for n, p in params.items()}
        return params, loss

    meta_update = MetaLearner.meta_update_by_step
