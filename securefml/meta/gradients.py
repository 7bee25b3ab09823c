"""The gradient-function contract: every gradient a learner takes of a loss on local data.

Why a contract.  A learner's round is a sequence of gradients of losses on the client's
examples.  Record-level DP (``securefml.privacy.record``) privatizes exactly those gradients:
Poisson-sample the batch, clip each example's gradient, add Gaussian noise.  If every learner
takes every gradient through one injected object, DP is that object swapped in
(``learner.with_gradients(dp)``), and no privacy code knows any learner's loop.

The contract (:class:`Gradients`) has three calls a learner may make, distinguished by what the
learner does with the result:

* ``gradients(loss, params, batch)`` -- a **released** gradient: the learner uses it as data (a
  step it takes, an accumulated inner gradient).  It is a constant: nothing differentiates
  through it (``PlainGradients`` detaches it).  Under record-level DP each released gradient is
  one sampled Gaussian mechanism, one composition on the client's ledger.
* ``gradients.with_value(loss, params, batch)`` -- the same released gradient and the plain
  batch-mean loss at ``params`` (a diagnostic the learner reports; under DP it is computed
  without noise and is not covered, as the privacy module documents).
* ``gradients.traced(loss, params, batch)`` -- a **traced** gradient that the learner
  differentiates through (second-order inner loops).  DP cannot noise it (the outer gradient
  depends on it), so the examples it is taken on are not covered by per-example clipping of the
  outer gradient; the DP version refuses it unless that leak is acknowledged.

plus ``per_sample(loss, params, batch)``: each example's gradient, stacked (``torch.func.vmap``
over ``torch.func.grad``), which the DP version clips.

``loss(params, x, y)`` is always the **mean** loss over the batch ``(x, y)``; the per-example
loss is ``loss(params, x[i:i+1], y[i:i+1])``.

A learner declares what record-level DP needs to account for it before any work:
``MetaLearner.released_gradients()`` (how many released gradients one round takes; ``None``
when it does not take all its gradients through the contract, which makes record-level DP
refuse it) and ``MetaLearner.traces_local_gradients`` (whether it calls ``traced``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch.func import grad, grad_and_value, vmap

__all__ = ["Batch", "Gradients", "LossFn", "PlainGradients"]

Params = dict[str, torch.Tensor]
#: ``(inputs, targets)`` of one batch of local examples
Batch = tuple[torch.Tensor, torch.Tensor]
#: ``loss(params, x, y)``: the mean loss over the batch ``(x, y)`` at ``params``
LossFn = Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor]


class Gradients(ABC):
    """How a learner takes its gradients (the default: plain ``torch.func.grad``)."""

    #: whether a learner using it may run a cohort as one ``torch.func.vmap`` (``update_many``):
    #: only for gradient functions that are pure tensor functions (not DP: its coins, noise and
    #: ledger are per client, and would be shared by every client of the vmapped batch)
    vmappable: bool = False

    @abstractmethod
    def __call__(self, loss: LossFn, params: Params, batch: Batch) -> Params:
        """A released gradient of ``loss`` at ``params`` on ``batch`` (a constant)."""

    def with_value(self, loss: LossFn, params: Params, batch: Batch) -> tuple[Params, torch.Tensor]:
        """A released gradient and the (detached) batch-mean loss at ``params``."""
        g = self(loss, params, batch)
        return g, loss(params, *batch).detach()

    def traced(self, loss: LossFn, params: Params, batch: Batch) -> Params:
        """A gradient the caller differentiates through (``torch.func.grad``, not detached)."""
        return grad(loss)(params, *batch)

    def per_sample(self, loss: LossFn, params: Params, batch: Batch) -> Params:
        """Each example's gradient, stacked along a new leading dimension (``vmap`` over ``grad``)."""
        x, y = batch

        def one(p: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return loss(p, xi.unsqueeze(0), yi.unsqueeze(0))

        return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)


class PlainGradients(Gradients):
    """Non-private gradients: ``torch.func.grad`` of the batch-mean loss.

    Composes with ``torch.func`` transforms (a learner's round runs under ``vmap`` for
    vectorized cohorts, and under an outer ``grad`` for second-order MAML).

    >>> g = PlainGradients()(lambda p, x, y: ((p["w"] * x - y) ** 2).mean(), {"w": torch.tensor(1.0)},
    ...                      (torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])))
    >>> float(g["w"])  # d/dw mean(w^2 x^2) = mean(2 w x^2) = 5
    5.0
    """

    vmappable = True

    def __call__(self, loss: LossFn, params: Params, batch: Batch) -> Params:
        return {n: t.detach() for n, t in grad(loss)(params, *batch).items()}

    def with_value(self, loss: LossFn, params: Params, batch: Batch) -> tuple[Params, torch.Tensor]:
        g, value = grad_and_value(loss)(params, *batch)
        return {n: t.detach() for n, t in g.items()}, value.detach()

    def __repr__(self) -> str:
        return "PlainGradients()"
