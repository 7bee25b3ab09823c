"""Record-level DP-SGD as a gradient function: what ``RecordLevelDP`` swaps into a learner.

:class:`DPGradients` implements the learners' gradient contract
(``securefml.meta.gradients.Gradients``).  Each *released* gradient is one application of the
sampled Gaussian mechanism (Abadi et al. 2016):

1. Poisson sampling: each of the ``n`` examples of the batch joins with probability ``q``
   (secret coins from the client's :class:`~securefml.privacy.randomness.NoiseSource`);
2. per-example gradients of the loss, vectorized: ``torch.func.vmap`` over ``torch.func.grad``
   of the loss on one example (no module hooks, so any learner's functional loss works, weights
   and learned rates alike, on any device);
3. each example's gradient clipped to L2 norm ``C`` over all parameters together (Opacus'
   flat clipping: factor ``min(1, C / (norm + 1e-6))``), summed;
4. Gaussian noise of std ``sigma * C`` per coordinate added to the sum, divided by the public
   expected batch size ``q * n``;
5. one step ``(sigma, q)`` on the client's Opacus accountant (``Ledger``), exactly the step
   Opacus' ``DPOptimizer`` hook records.

The released gradient is a constant: the learner's update is post-processing of released
gradients (what ``MetaLearner.released_gradients`` promises), so the client's ledger covers its
update.  Guarantee checks (tests): every clipped per-example gradient has norm <= C, the noise
has std ``sigma * C``, zero noise without clipping gives the plain gradient, and a requested
gradient inside another gradient's loss (which would be sampled and noised once per example)
is refused.

*Traced* gradients (second-order inner loops) cannot be noised: the outer gradient is
differentiated through them.  They are plain gradients here, refused unless
``allow_traced=True`` (the caller acknowledged that the examples they are taken on -- the
support set -- are not covered).

References
----------
Abadi et al., Deep Learning with Differential Privacy, CCS 2016; Mironov, Talwar, Zhang, Renyi
Differential Privacy of the Sampled Gaussian Mechanism, 2019; Yousefpour et al., Opacus, 2021.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from securefml.errors import ConfigError
from securefml.meta.gradients import Batch, Gradients, LossFn, Params
from securefml.privacy.accounting import Ledger
from securefml.privacy.randomness import NoiseSource

__all__ = ["DPGradients", "clip_and_sum"]


def clip_and_sum(per_sample: Params, max_grad_norm: float) -> Params:
    """Sum over examples of per-example gradients clipped to ``max_grad_norm`` (all parameters together).

    ``per_sample`` maps each name to a ``[B, *shape]`` tensor; ``math.inf`` sums without clipping.
    The factor is Opacus' ``min(1, C / (norm + 1e-6))``.  An example whose gradient is not finite
    (or whose norm overflows) contributes zero: with Opacus' formula it would turn the whole sum
    into NaN, and the presence of one such example would be visible in the release.
    """
    if math.isinf(max_grad_norm):
        return {n: g.sum(0) for n, g in per_sample.items()}
    first = next(iter(per_sample.values()))
    b = first.shape[0]
    norms = torch.stack([g.reshape(b, -1).norm(2, dim=1) for g in per_sample.values()], dim=1).norm(2, dim=1)
    finite = torch.isfinite(norms)
    factor = torch.where(finite, (max_grad_norm / (norms + 1e-6)).clamp(max=1.0), torch.zeros_like(norms))
    out = {}
    for n, g in per_sample.items():
        if not bool(finite.all()):
            g = torch.where(finite.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros_like(g))
        out[n] = torch.tensordot(factor.to(g.dtype), g, dims=1)
    return out


class DPGradients(Gradients):
    """One client's DP-SGD gradient function (its own ledger and noise stream).

    Parameters
    ----------
    noise_multiplier:
        sigma.
    max_grad_norm:
        C (``math.inf``: no clipping, only with zero noise).
    sample_rate:
        Poisson rate q of every released gradient.
    ledger:
        The client's accountant; one step per released gradient.
    source:
        The client's noise stream (sampling coins and Gaussian noise; drawn on the CPU, moved
        to the gradients' device).
    secure_mode:
        Floating-point-attack-resistant noise (sum of four draws scaled by 1/2).
    allow_traced:
        Accept traced gradients (plain, not private: the support set of second-order learners).
    """

    def __init__(self, *, noise_multiplier: float, max_grad_norm: float, sample_rate: float, ledger: Ledger,
                 source: NoiseSource, secure_mode: bool = True, allow_traced: bool = False) -> None:
        if not max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if math.isinf(max_grad_norm) and noise_multiplier > 0:
            raise ConfigError("clipping off (max_grad_norm=inf) needs zero noise: noise is sized by the clip norm")
        if not 0 < sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not noise_multiplier >= 0:
            raise ConfigError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.sample_rate = float(sample_rate)
        self.ledger = ledger
        self.source = source
        self.secure_mode = bool(secure_mode)
        self.allow_traced = bool(allow_traced)
        #: released gradients so far (each one step on the ledger)
        self.steps = 0
        #: traced (uncovered) gradient evaluations so far
        self.traced_calls = 0
        self._busy = False

    # -- the contract ---------------------------------------------------------------------------
    def __call__(self, loss: LossFn, params: Params, batch: Batch) -> Params:
        if self._busy:
            raise ConfigError("a released gradient was requested inside the loss of another gradient: under "
                              "record-level DP it would be sampled and noised once per example; take inner "
                              "gradients before the outer loss, or as traced gradients (Gradients.traced)")
        x, y = batch
        n = int(x.shape[0])
        coins = self.source.bernoulli(n, self.sample_rate)
        idx = torch.from_numpy(np.flatnonzero(coins)).to(x.device)
        base = {k: v.detach() for k, v in params.items()}
        self._busy = True
        try:
            if idx.numel():
                summed = clip_and_sum(self.per_sample(loss, base, (x[idx], y[idx])), self.max_grad_norm)
            else:
                summed = {k: torch.zeros_like(v) for k, v in base.items()}
        finally:
            self._busy = False
        released = self._noise(summed, expected=self.sample_rate * n)
        self.ledger.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.steps += 1
        return released

    def with_value(self, loss: LossFn, params: Params, batch: Batch) -> tuple[Params, torch.Tensor]:
        g = self(loss, params, batch)
        self._busy = True  # the diagnostic loss must not take released gradients either
        try:
            with torch.no_grad():
                value = loss({k: v.detach() for k, v in params.items()}, *batch).detach()
        finally:
            self._busy = False
        return g, value

    def traced(self, loss: LossFn, params: Params, batch: Batch) -> Params:
        if not self.allow_traced:
            raise ConfigError("the learner differentiates through a gradient of local data (second-order): "
                              "record-level DP cannot cover those examples; use user-level DP (--dp user), a "
                              "first-order learner, or acknowledge with allow_support_leak=True")
        self.traced_calls += 1
        return super().traced(loss, params, batch)

    # -- the mechanism --------------------------------------------------------------------------
    def _noise(self, summed: Params, *, expected: float) -> Params:
        """``(sum + N(0, (sigma C)^2 I)) / expected`` with the noise from the client's stream."""
        std = self.noise_multiplier * self.max_grad_norm if self.noise_multiplier > 0 else 0.0
        if std == 0.0:
            return {k: v / expected for k, v in summed.items()}
        sizes = [v.numel() for v in summed.values()]
        flat = torch.from_numpy(self.source.normal(sum(sizes), std, fp_resistant=self.secure_mode))
        out = {}
        for (k, v), part in zip(summed.items(), torch.split(flat, sizes)):
            out[k] = (v + part.reshape(v.shape).to(device=v.device, dtype=v.dtype)) / expected
        return out

    def __repr__(self) -> str:
        return (f"DPGradients(noise_multiplier={self.noise_multiplier:.4g}, max_grad_norm={self.max_grad_norm}, "
                f"sample_rate={self.sample_rate}, secure_mode={self.secure_mode}, allow_traced={self.allow_traced})")
