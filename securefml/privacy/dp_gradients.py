"""Record-level DP-SGD as a gradient function: what ``RecordLevelDP`` swaps into a learner.

:class:`DPGradients` implements the learners' gradient contract
(``securefml.meta.gradients.Gradients``).  Each *released* gradient is one application of the
sampled Gaussian mechanism (Abadi et al. 2016):

1. Poisson sampling: each of the ``n`` examples of the batch joins with probability ``q``
   (secret coins from the client's :class:`~securefml.privacy.randomness.NoiseSource`);
2. per-example gradients of the loss, vectorized (no module hooks, so any learner's functional
   loss works, on any device): ``torch.func.vmap`` over ``torch.func.grad`` of the loss on one
   example, which handles every loss (weights and learned rates alike, gradients through a
   traced inner loop); or, where the loss reaches its parameters only through layers torch's
   expanded weights support (``linear``, ``conv``, ``embedding``, the norms), one batched
   backward with the parameters wrapped as ``ExpandedWeight`` -- the per-example machinery of
   Opacus' ``"ew"`` mode, faster than ``vmap`` on small CPU models (``benchmarks/dp_step.py``).
   ``per_sample="auto"`` (default) tries expanded weights and falls back to ``vmap`` for a loss
   they refuse (remembered per loss function); both give the same per-example gradients
   (tested);
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

import logging
import math
from types import CodeType

import numpy as np
import torch

from securefml.errors import ConfigError
from securefml.meta.gradients import Batch, Gradients, LossFn, Params
from securefml.privacy.accounting import Ledger
from securefml.privacy.randomness import NoiseSource

__all__ = ["PER_SAMPLE_ENGINES", "DPGradients", "clip_and_sum", "expanded_weights_per_sample"]

logger = logging.getLogger(__name__)

#: how per-example gradients are computed (see the module docstring)
PER_SAMPLE_ENGINES = ("auto", "vmap", "expanded-weights")


def expanded_weights_per_sample(loss: LossFn, params: Params, batch: Batch) -> Params:
    """Per-example gradients of a batch-mean ``loss`` in one backward pass (torch's ``ExpandedWeight``).

    Raises ``RuntimeError`` when the loss uses a parameter other than through a layer expanded
    weights support (Meta-SGD's ``theta - alpha * g``, a traced inner gradient, ``p.sum()``): the
    caller then uses ``vmap``.  A parameter the loss does not use gets a zero gradient.
    """
    from torch.nn.utils._expanded_weights import ExpandedWeight

    x, y = batch
    b = int(x.shape[0])
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}  # new leaves, shared storage
    wrapped: Params = {n: ExpandedWeight(leaf, b, "sum") for n, leaf in leaves.items()}
    (loss(wrapped, x, y) * b).backward()  # batch mean times b: the sum of the per-example losses
    out = {}
    for n, leaf in leaves.items():
        gs = getattr(leaf, "grad_sample", None)
        out[n] = gs.detach() if gs is not None else torch.zeros((b, *leaf.shape), dtype=leaf.dtype, device=leaf.device)
    return out


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
        if not bool(finite.all()):  # 0 * inf is NaN: zero the rows themselves
            g = torch.where(finite.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros_like(g))
        out[n] = torch.einsum("i,i...->...", factor.to(g.dtype), g)
    return out


def _under_transform(x: torch.Tensor) -> bool:
    """Whether ``x`` is being traced by a ``torch.func`` transform (batched by vmap, wrapped by grad)."""
    functorch = getattr(torch._C, "_functorch", None)
    if functorch is None:  # pragma: no cover - every supported torch has it
        return False
    return bool(functorch.is_batchedtensor(x) or functorch.is_gradtrackingtensor(x))


class ReleasedGradients(Gradients):
    """What every record-level DP gradient function shares: the guards around a released gradient.

    A released gradient is sampled, clipped and noised once per call, so nothing may ask for
    another one while it is computed (``_busy``), the diagnostic loss of ``with_value`` is taken
    without releasing anything, and traced (uncovered, second-order) gradients are refused unless
    the caller acknowledged them (``allow_traced``).  ``DPGradients`` (one client) and
    ``CohortDPGradients`` (one client inside the vmap over a cohort) differ only in how they draw.
    """

    allow_traced: bool = False
    #: traced (uncovered) gradient evaluations so far
    traced_calls: int = 0
    _busy: bool = False

    def _refuse_nested(self) -> None:
        """A released gradient asked for inside another one's loss would be released per example."""
        if self._busy:
            raise ConfigError("a released gradient was requested inside the loss of another gradient: under "
                              "record-level DP it would be sampled and noised once per example; take inner "
                              "gradients before the outer loss, or as traced gradients (Gradients.traced)")

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


class DPGradients(ReleasedGradients):
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
    per_sample:
        ``"auto"`` (expanded weights where the loss allows, else ``vmap``), ``"vmap"`` or
        ``"expanded-weights"`` (no fallback: a loss it refuses raises).
    """

    def __init__(self, *, noise_multiplier: float, max_grad_norm: float, sample_rate: float, ledger: Ledger,
                 source: NoiseSource, secure_mode: bool = True, allow_traced: bool = False,
                 per_sample: str = "auto") -> None:
        self.check(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, sample_rate=sample_rate,
                   per_sample=per_sample)
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
        self.per_sample_engine = per_sample
        #: per-example gradient computations by engine (``"vmap"``, ``"expanded-weights"``)
        self.engine_calls = {"vmap": 0, "expanded-weights": 0}
        self._ew_refused: set[CodeType] = set()
        self._busy = False

    @staticmethod
    def check(*, noise_multiplier: float, max_grad_norm: float, sample_rate: float, per_sample: str = "auto") -> None:
        """Raise ``ConfigError`` for settings the mechanism cannot run with (before any client trains)."""
        if per_sample not in PER_SAMPLE_ENGINES:
            raise ConfigError(f"unknown per-sample engine {per_sample!r}; "
                              f"choose one of {', '.join(PER_SAMPLE_ENGINES)}")
        if not max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if math.isinf(max_grad_norm) and noise_multiplier > 0:
            raise ConfigError("clipping off (max_grad_norm=inf) needs zero noise: noise is sized by the clip norm")
        if not 0 < sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not noise_multiplier >= 0:
            raise ConfigError(f"noise_multiplier must be >= 0, got {noise_multiplier}")

    # -- the contract ---------------------------------------------------------------------------
    def __call__(self, loss: LossFn, params: Params, batch: Batch) -> Params:
        if _under_transform(batch[0]):
            raise ConfigError("DP gradients cannot run under a torch.func transform (vmap over clients, an outer "
                              "grad): their coins, noise and ledger are one client's; run clients one at a time")
        self._refuse_nested()
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

    def per_sample(self, loss: LossFn, params: Params, batch: Batch) -> Params:
        """Per-example gradients by the configured engine (``auto``: expanded weights, else ``vmap``)."""
        code = getattr(loss, "__code__", None)
        if self.per_sample_engine != "vmap" and code not in self._ew_refused:
            try:
                out = expanded_weights_per_sample(loss, params, batch)
            except (RuntimeError, TypeError, NotImplementedError, ImportError) as exc:
                if self.per_sample_engine == "expanded-weights":
                    raise ConfigError(f"expanded weights cannot compute this loss's per-example gradients: {exc}; "
                                      "use per_sample='vmap' or 'auto'") from exc
                if isinstance(code, CodeType):
                    self._ew_refused.add(code)
                logger.debug("expanded weights refused %s (%s); per-example gradients by vmap", code, exc)
            else:
                self.engine_calls["expanded-weights"] += 1
                return out
        self.engine_calls["vmap"] += 1
        return super().per_sample(loss, params, batch)

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
                f"sample_rate={self.sample_rate}, secure_mode={self.secure_mode}, allow_traced={self.allow_traced}, "
                f"per_sample={self.per_sample_engine!r})")
