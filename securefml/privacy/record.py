"""Record-level DP-SGD inside each client, on Opacus' ``GradSampleModule`` and ``DPOptimizer``.

Threat model and guarantee
--------------------------
The privacy unit is one example of one client's local data (support or query).  Every use of
local data goes through a DP step: Poisson sampling at rate q (each example joins the step's
batch independently), per-example gradients clipped to L2 norm C, Gaussian noise of std
``sigma * C`` on their sum, division by the expected batch size.  Each client has its own
ledger (Opacus accountant) fed by the optimizers' step hook, so the epsilon it reports covers
everything that left the client: its update is post-processing of the noisy gradients.  Cohort
sampling is not used for amplification (a conservative choice: a client's ledger only knows the
rounds it took part in).

How each learner is privatized:

* FedAvg, Reptile: the local SGD steps are DP-SGD steps: per-example gradients from Opacus'
  ``GradSampleModule`` (expanded-weights mode ``"ew"`` by default, the fastest here on small
  models; ``"hooks"`` gives the same gradients), clipped and noised by ``DPOptimizer``.
* FOMAML: the inner steps on the support set are DP-SGD steps; the query gradient at the
  adapted weights is one more DP step on the same module and the same ledger.
* first-order Meta-SGD: the inner gradients are DP-SGD steps (hence constants); the
  meta-gradient with respect to both the weights and the learned rates is computed per query
  example with ``torch.func.vmap(grad(...))`` and clipped/noised by a ``DPOptimizer`` over a
  ``no_op`` ``GradSampleModule`` (the rates are not module parameters, so hooks cannot see them).
* second-order MAML (and second-order Meta-SGD): Opacus' hooks cannot follow a functional inner
  loop, so per-query-example meta-gradients are computed with ``vmap(grad(...))`` through the
  inner loop and clipped/noised the same way.  **The support set is not covered**: every support
  example influences every per-example meta-gradient, so clipping per query example bounds no
  support example's influence.  The guarantee then holds for query examples only; this must be
  acknowledged with ``allow_support_leak=True``, and user-level DP is the recommended mode for
  these learners.

Not covered in any mode: the training-loss numbers a learner returns as metrics (diagnostics the
simulation records, computed on local data without noise).

Cost: each client wraps its own copy of the model once (about 11 ms) and reuses it in every
round it joins; per-example gradients cost about 1.5-1.7x a non-private step on small models.

References
----------
Abadi et al., Deep Learning with Differential Privacy, CCS 2016; Li, Khodak, Caldas, Talwalkar,
Differentially Private Meta-Learning, ICLR 2020; Yousefpour et al., Opacus, 2021.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from opacus.grad_sample import AbstractGradSampleModule, wrap_model
from opacus.grad_sample.gsm_no_op import GradSampleModuleNoOp
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn
from torch.func import grad, vmap

from securefml.data.base import Task
from securefml.errors import ConfigError, PrivacyBudgetExceeded
from securefml.meta.base import MetaLearner, Params
from securefml.meta.local import FedAvg, Reptile
from securefml.meta.maml import MAML
from securefml.meta.metasgd import ALPHA_PREFIX, MetaSGD
from securefml.privacy.accounting import Ledger
from securefml.privacy.randomness import NoiseSource

__all__ = ["RecordLevelDP", "record_route", "steps_per_participation", "summed_loss"]

#: a finite stand-in for "no clipping" (Opacus multiplies the clip norm by the noise multiplier)
_NO_CLIP = 1e30

ROUTES = ("fedavg", "reptile", "fomaml", "metasgd-fo", "second-order")


def record_route(learner: MetaLearner) -> str:
    """How ``learner`` is privatized at record level (see the module docstring)."""
    if isinstance(learner, FedAvg):
        return "fedavg"
    if isinstance(learner, Reptile):
        return "reptile"
    if isinstance(learner, MAML):
        return "fomaml" if learner.first_order else "second-order"
    if isinstance(learner, MetaSGD):
        return "metasgd-fo" if learner.first_order else "second-order"
    raise ConfigError(f"record-level DP does not know how to privatize {type(learner).__name__}; "
                      "use user-level DP (--dp user), which wraps any learner")


def steps_per_participation(learner: MetaLearner) -> int:
    """DP steps (accountant compositions) one client takes each round it joins."""
    cfg = learner.config
    route = record_route(learner)
    if route in ("fedavg", "reptile"):
        return cfg.inner_steps
    if route in ("fomaml", "metasgd-fo"):
        return cfg.outer_steps * (cfg.inner_steps + 1)
    return cfg.outer_steps


def summed_loss(out: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Sum over the batch of per-example losses (the learners' mean loss times the batch size)."""
    if kind == "classification":
        return nn.functional.cross_entropy(out, y, reduction="sum")
    if kind == "regression":
        return ((out - y) ** 2).reshape(out.shape[0], -1).mean(dim=1).sum()
    raise ConfigError(f"unknown task kind {kind!r}")


class _MetaParams(nn.Module):
    """Holds the meta-parameters (weights and any learned rates) as parameters, in a fixed order."""

    def __init__(self, params: Params) -> None:
        super().__init__()
        self.names = list(params)
        self.values = nn.ParameterList([nn.Parameter(p.detach().clone()) for p in params.values()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called (no_op mode)
        return x


@dataclass
class _ClientState:
    """One client's Opacus objects, built on its first round and reused afterwards."""

    params: dict[str, nn.Parameter]
    gsm: AbstractGradSampleModule
    optimizer: DPOptimizer
    meta_names: list[str] = field(default_factory=list)
    meta_params: list[nn.Parameter] = field(default_factory=list)
    meta_optimizer: DPOptimizer | None = None
    ledger: Ledger | None = None
    participations: int = 0


class _SourcedDPOptimizer(DPOptimizer):
    """``DPOptimizer`` whose Gaussian noise comes from a :class:`NoiseSource` instead of a torch generator."""

    noise_source: NoiseSource
    fp_resistant: bool = True

    def add_noise(self) -> None:
        for p in self.params:
            summed = p.summed_grad  # type: ignore[attr-defined]
            _check_processed_flag(summed)
            std = self.noise_multiplier * self.max_grad_norm
            noise = torch.from_numpy(self.noise_source.normal(summed.numel(), std, fp_resistant=self.fp_resistant))
            p.grad = (summed + noise.reshape(summed.shape).to(device=summed.device, dtype=summed.dtype)).view_as(p)
            _mark_as_processed(summed)


class RecordLevelDP(MetaLearner):
    """A meta-learner whose client step is record-level DP-SGD (drop-in for the learner it wraps).

    Parameters
    ----------
    learner:
        The learner to privatize; everything but the client step (``init_params``, ``forward``,
        ``adapt`` for personalization) is delegated to it unchanged.
    noise_multiplier:
        sigma.
    max_grad_norm:
        C (``math.inf``: no clipping, only with zero noise).
    sample_rate:
        Poisson rate q of every local DP step.
    accountant, delta:
        Each client's ledger.
    max_participations:
        Rounds a client may join before its budget is spent (``None``: unlimited, epsilon is only
        reported); one more raises ``PrivacyBudgetExceeded`` naming the client, and the server
        drops it from the round.
    source:
        Where the Poisson sampling coins and the Gaussian noise come from
        (:class:`~securefml.privacy.randomness.NoiseSource`); ``None`` keys a fresh one from
        ``os.urandom``.  Noise is drawn on the CPU and moved to the model's device.
    generator:
        Shorthand for ``source=NoiseSource.seeded(...)`` from this torch generator (reproducible,
        insecure); ignored when ``source`` is given.
    secure_mode:
        Floating-point-attack-resistant Gaussian noise (the sum of four draws scaled by 1/2, as
        ``DPOptimizer(secure_mode=True)`` does).
    allow_support_leak:
        Required for second-order learners, whose guarantee covers query examples only.
    grad_sample_mode:
        Opacus' per-example gradient mode for the module route (``"ew"`` or ``"hooks"``).
    """

    def __init__(self, learner: MetaLearner, *, noise_multiplier: float, max_grad_norm: float, sample_rate: float,
                 accountant: str = "rdp", delta: float = 1e-5, max_participations: int | None = None,
                 source: NoiseSource | None = None, generator: torch.Generator | None = None,
                 secure_mode: bool = True, allow_support_leak: bool = False, grad_sample_mode: str = "ew") -> None:
        super().__init__(learner.model, learner.config)
        self.route = record_route(learner)
        if self.route == "second-order" and not allow_support_leak:
            raise ConfigError(
                f"record-level DP cannot protect the support set of second-order {learner.name}: every support "
                "example influences every per-example meta-gradient. Use user-level DP (--dp user, recommended), "
                "or a first-order learner (fomaml, reptile, first-order metasgd), or acknowledge query-only "
                "coverage with allow_support_leak=True"
            )
        if not max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if math.isinf(max_grad_norm) and noise_multiplier > 0:
            raise ConfigError("clipping off (max_grad_norm=inf) needs zero noise: noise is sized by the clip norm")
        if not 0 < sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.inner = learner
        self.name = learner.name
        self.adapts_with_learned_rates = learner.adapts_with_learned_rates
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.sample_rate = float(sample_rate)
        self.accountant = accountant
        self.delta = float(delta)
        self.max_participations = max_participations
        if source is None:
            source = (NoiseSource.seeded(int(torch.randint(0, 2**62, (1,), generator=generator)))
                      if generator is not None else NoiseSource.secure())
        self.source = source
        self.secure_mode = secure_mode
        self.allow_support_leak = allow_support_leak
        self.grad_sample_mode = grad_sample_mode
        self.clients: dict[int, _ClientState] = {}
        self.touched: set[int] = set()

    # -- delegation: everything but the client step is the wrapped learner's ---------------------
    def init_params(self, device: torch.device | str | None = None) -> Params:
        return self.inner.init_params(device)

    def model_params(self, params: Params) -> Params:
        return self.inner.model_params(params)

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return self.inner.forward(params, x)

    def adapt(self, params: Params, task_x: torch.Tensor, task_y: torch.Tensor, kind: str,
              *, steps: int | None = None) -> Params:
        return self.inner.adapt(params, task_x, task_y, kind, steps=steps)

    @property
    def steps_per_participation(self) -> int:
        return steps_per_participation(self.inner)

    # -- Opacus objects, once per client --------------------------------------------------------
    def _dp_optimizer(self, params: list[nn.Parameter], device: torch.device, ledger: Ledger) -> DPOptimizer:
        opt = _SourcedDPOptimizer(
            torch.optim.SGD(params, lr=1.0),
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=_NO_CLIP if math.isinf(self.max_grad_norm) else self.max_grad_norm,
            expected_batch_size=1,
            loss_reduction="mean",
        )
        opt.noise_source = self.source.fork(f"optimizer|{device}|{len(self.clients)}")
        opt.fp_resistant = self.secure_mode
        opt.attach_step_hook(ledger.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        return opt

    def _state(self, client_id: int, params: Params) -> _ClientState:
        st = self.clients.get(client_id)
        if st is not None:
            return st
        device = next(iter(params.values())).device
        module = copy.deepcopy(self.inner.model).to(device)
        module.requires_grad_(True)
        gsm = wrap_model(module, grad_sample_mode=self.grad_sample_mode, loss_reduction="sum")
        ledger = Ledger(self.accountant, self.delta)
        named = dict(module.named_parameters())
        st = _ClientState(named, gsm, self._dp_optimizer(list(named.values()), device, ledger), ledger=ledger)
        if self.route in ("metasgd-fo", "second-order"):
            container = _MetaParams(params)
            wrapped = GradSampleModuleNoOp(container, loss_reduction="sum")
            st.meta_names = container.names
            st.meta_params = list(container.values)
            st.meta_optimizer = self._dp_optimizer(st.meta_params, device, ledger)
            st.gsm_meta = wrapped  # type: ignore[attr-defined]  # kept alive with the optimizer
        self.clients[client_id] = st
        return st

    def _sample(self, n: int) -> list[int]:
        """Poisson sampling: each of ``n`` local examples joins the batch with probability q (secret coins)."""
        return [int(i) for i in self.source.bernoulli(n, self.sample_rate).nonzero()[0]]

    @staticmethod
    def _release(opt: DPOptimizer, params: list[tuple[str, nn.Parameter]], expected: float) -> Params:
        """Clip, noise and scale the per-example gradients in ``p.grad_sample``; return the noisy mean."""
        opt.expected_batch_size = expected  # type: ignore[assignment]
        opt.pre_step()  # clip + noise + scale + ledger step (Opacus' own sequence)
        out = {n: p.grad.detach().clone() for n, p in params if p.grad is not None}
        opt.zero_grad(set_to_none=True)
        return out

    # -- DP gradients ----------------------------------------------------------------------------
    def hook_gradient(self, st: _ClientState, weights: Params, x: torch.Tensor, y: torch.Tensor,
                      kind: str) -> Params:
        """One DP-SGD gradient at ``weights`` on a Poisson batch of ``(x, y)`` (GradSampleModule per-example grads)."""
        idx = self._sample(len(x))
        with torch.no_grad():
            for n, p in st.params.items():
                p.copy_(weights[n])
        st.optimizer.zero_grad(set_to_none=True)
        if idx:
            sel = torch.tensor(idx, device=x.device)
            with warnings.catch_warnings():  # inputs never need gradients here; Opacus' hooks still fire
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                summed_loss(st.gsm(x[sel]), y[sel], kind).backward()
        else:
            for p in st.params.values():
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]
        return self._release(st.optimizer, list(st.params.items()), self.sample_rate * len(x))

    def vmap_gradient(self, st: _ClientState, per_example_loss: Callable[[Params, torch.Tensor, torch.Tensor],
                                                                           torch.Tensor],
                      params: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
        """One DP gradient of ``per_example_loss`` w.r.t. all meta-parameters (vmap(grad) + no_op module)."""
        assert st.meta_optimizer is not None
        idx = self._sample(len(x))
        base = {n: params[n].detach() for n in st.meta_names}
        if idx:
            sel = torch.tensor(idx, device=x.device)
            per_ex = vmap(grad(per_example_loss), in_dims=(None, 0, 0))(base, x[sel], y[sel])
        else:
            per_ex = {n: torch.zeros((0, *t.shape), dtype=t.dtype, device=t.device) for n, t in base.items()}
        st.meta_optimizer.zero_grad(set_to_none=True)
        for n, p in zip(st.meta_names, st.meta_params):
            p.grad_sample = per_ex[n].detach()  # type: ignore[attr-defined]
        return self._release(st.meta_optimizer, list(zip(st.meta_names, st.meta_params)), self.sample_rate * len(x))

    # -- one client round ------------------------------------------------------------------------
    def meta_update(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        cid = task.client_id
        st = self._state(cid, params)
        if self.max_participations is not None and st.participations >= self.max_participations:
            raise PrivacyBudgetExceeded(
                f"client {cid}: its record-level budget is spent after {st.participations} rounds "
                f"(epsilon {st.ledger.epsilon() if st.ledger else float('nan'):.3g}); it sits out"
            )
        st.participations += 1
        self.touched.add(cid)
        cfg = self.inner.config
        kind = task.kind
        if self.route in ("fedavg", "reptile"):
            if self.route == "fedavg":
                x, y = torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])
            else:
                x, y = task.support_x, task.support_y
            w = self.model_params(params)
            for _ in range(cfg.inner_steps):
                g = self.hook_gradient(st, w, x, y, kind)
                w = {n: (p - cfg.inner_lr * g[n]).detach() for n, p in w.items()}
            new = {**params, **w}
            metric = "train_loss" if self.route == "fedavg" else "query_loss"
            ex, ey = (x, y) if self.route == "fedavg" else (task.query_x, task.query_y)
            return new, {metric: float(self.inner.loss(w, ex, ey, kind).detach())}
        loss = 0.0
        for _ in range(cfg.outer_steps):
            if self.route == "fomaml":
                w = self.model_params(params)
                for _ in range(cfg.inner_steps):
                    g = self.hook_gradient(st, w, task.support_x, task.support_y, kind)
                    w = {n: (p - cfg.inner_lr * g[n]).detach() for n, p in w.items()}
                gq = self.hook_gradient(st, w, task.query_x, task.query_y, kind)
                loss = float(self.inner.loss(w, task.query_x, task.query_y, kind).detach())
                params = {n: (p - cfg.outer_lr * gq[n]).detach() if n in gq else p for n, p in params.items()}
                continue
            if self.route == "metasgd-fo":
                w = self.model_params(params)
                total = {n: torch.zeros_like(p) for n, p in w.items()}
                for _ in range(cfg.inner_steps):
                    g = self.hook_gradient(st, w, task.support_x, task.support_y, kind)
                    w = {n: (p - params[ALPHA_PREFIX + n] * g[n]).detach() for n, p in w.items()}
                    total = {n: total[n] + g[n] for n in total}
                adapted = _first_order_adapted(total)
            else:
                adapted = _second_order_adapted(self.inner, task)

            def per_example(p: Params, x: torch.Tensor, y: torch.Tensor, adapted=adapted) -> torch.Tensor:
                return self.inner.loss(adapted(p), x.unsqueeze(0), y.unsqueeze(0), kind)

            g = self.vmap_gradient(st, per_example, params, task.query_x, task.query_y)
            with torch.no_grad():
                loss = float(self.inner.loss(adapted(params), task.query_x, task.query_y, kind))
            params = {n: (p - cfg.outer_lr * g[n]).detach() for n, p in params.items()}
        return params, {"query_loss": loss}

    # -- reporting -------------------------------------------------------------------------------
    def epsilons(self, client_ids: set[int] | None = None) -> dict[int, float]:
        """Epsilon per client (all clients that ever trained, or ``client_ids``), cached per history."""
        ids = self.clients if client_ids is None else client_ids
        return {cid: self.clients[cid].ledger.epsilon() for cid in ids  # type: ignore[union-attr]
                if cid in self.clients}

    def __repr__(self) -> str:
        return (f"RecordLevelDP({self.inner!r}, route={self.route!r}, noise_multiplier={self.noise_multiplier:.4g}, "
                f"max_grad_norm={self.max_grad_norm}, sample_rate={self.sample_rate}, accountant={self.accountant!r}, "
                f"secure_mode={self.secure_mode})")


def _first_order_adapted(total: Params) -> Callable[[Params], Params]:
    """First-order Meta-SGD's adapted weights ``theta - alpha * G`` with the DP inner gradients ``G`` fixed."""

    def adapted(p: Params) -> Params:
        return {n: p[n] - p[ALPHA_PREFIX + n] * g for n, g in total.items()}

    return adapted


def _second_order_adapted(learner: MetaLearner, task: Task) -> Callable[[Params], Params]:
    """The learner's own (differentiable) inner loop on the support set."""

    def adapted(p: Params) -> Params:
        return learner.adapt(p, task.support_x, task.support_y, task.kind)

    return adapted
