"""Record-level DP-SGD inside each client: the learner's gradient function swapped for a DP one.

Threat model and guarantee
--------------------------
The privacy unit is one example of one client's local data (support or query).  Every learner
takes every gradient of local data through its injected gradient function
(``securefml.meta.gradients``); :class:`RecordLevelDP` gives each client its own
:class:`~securefml.privacy.dp_gradients.DPGradients` (its Opacus accountant and noise stream)
and runs the wrapped learner's own round with it (``learner.with_gradients(...)``).  Every
*released* gradient is a DP-SGD step: Poisson sampling at rate q, per-example gradients (one
``torch.func.vmap`` over ``grad``) clipped to L2 norm C, Gaussian noise of std ``sigma * C`` on
their sum, division by the expected batch size, one composition on the client's ledger.  The
learner's update is computed from released gradients and public values alone (what a learner
promises by declaring ``released_gradients()``), so it is post-processing and the epsilon the
client reports covers everything that left it.  Cohort sampling is not used for amplification
(a conservative choice: a client's ledger only knows the rounds it took part in).

This module knows no learner: what it needs, each learner declares.

* ``released_gradients()``: compositions per round, planned before the run (calibration of
  sigma, budget of rounds).  A learner that returns ``None`` (it does not take all its
  gradients through the contract, e.g. the Bayesian learners, whose local inference draws
  random noise inside the loss) is refused with a ``ConfigError`` that names user-level DP.
  After each round the count actually taken is checked against the declaration; a mismatch
  is a ``ConfigError`` and the round's update is not released.
* ``traces_local_gradients``: the learner differentiates through gradients of local data
  (second-order MAML and Meta-SGD: the support set).  Those cannot be noised, and every support
  example influences every per-example meta-gradient, so clipping per query example bounds no
  support example's influence: the guarantee then holds for query examples only.  This must be
  acknowledged with ``allow_support_leak=True``; user-level DP is the recommended mode.  The
  gradient function refuses traced gradients of a learner that did not declare them.

For the bundled learners: FedAvg and Reptile take ``inner_steps`` released gradients per round,
FOMAML and first-order Meta-SGD ``outer_steps * (inner_steps + 1)`` (the inner steps and the
query gradient), second-order MAML/Meta-SGD ``outer_steps`` (per-query-example meta-gradients
through the plain inner loop) -- the same compositions, hence the same epsilon, as the Opacus
``GradSampleModule`` routes this module replaced.

Not covered in any mode: the training-loss numbers a learner returns as metrics (diagnostics the
simulation records, computed on local data without noise).

Cost: per-example gradients by torch's expanded weights where the loss allows, else ``vmap``
(``benchmarks/dp_step.py`` measures a DP step against the non-private step and Opacus'
``GradSampleModule`` in the same run).

References
----------
Abadi et al., Deep Learning with Differential Privacy, CCS 2016; Li, Khodak, Caldas, Talwalkar,
Differentially Private Meta-Learning, ICLR 2020; Yousefpour et al., Opacus, 2021.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from securefml.data.base import Task
from securefml.errors import ConfigError, PrivacyBudgetExceeded
from securefml.meta.base import MetaLearner, Params
from securefml.privacy.accounting import Ledger
from securefml.privacy.dp_gradients import DPGradients
from securefml.privacy.randomness import NoiseSource
from securefml.privacy.vectorized import run_cohort
from securefml.updates import ParamRole

__all__ = ["RecordLevelDP", "steps_per_participation"]


def steps_per_participation(learner: MetaLearner) -> int:
    """DP steps (accountant compositions) one client takes each round it joins, as the learner declares.

    Raises ``ConfigError`` for a learner that does not declare ``released_gradients()``.
    """
    steps = learner.released_gradients()
    if steps is None:
        raise ConfigError(
            f"record-level DP cannot privatize {type(learner).__name__}: it does not declare "
            "released_gradients(), i.e. that every gradient it takes of local data goes through its injected "
            "gradient function; use user-level DP (--dp user), which wraps any learner"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"{type(learner).__name__}.released_gradients() must be an int >= 0, got {steps!r}")
    return steps


@dataclass
class _ClientState:
    """One client's ledger and DP gradient function, built on its first round and reused afterwards."""

    gradients: DPGradients
    ledger: Ledger
    participations: int = 0


class RecordLevelDP(MetaLearner):
    """A meta-learner whose client step is record-level DP-SGD (drop-in for the learner it wraps).

    Parameters
    ----------
    learner:
        The learner to privatize; everything but the client step (``init_params``, ``forward``,
        ``adapt`` for personalization, ``layout``) is delegated to it unchanged.  It must declare
        ``released_gradients()`` (see the module docstring).
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
        ``os.urandom``.  Each client gets its own fork.  Noise is drawn on the CPU and moved to the
        model's device.
    generator:
        Shorthand for ``source=NoiseSource.seeded(...)`` from this torch generator (reproducible,
        insecure); ignored when ``source`` is given.
    secure_mode:
        Floating-point-attack-resistant Gaussian noise (the sum of four draws scaled by 1/2, as
        ``DPOptimizer(secure_mode=True)`` does).
    allow_support_leak:
        Required for learners that trace gradients of local data (second-order), whose guarantee
        covers query examples only.
    per_sample:
        How per-example gradients are computed (``"auto"``, ``"vmap"``, ``"expanded-weights"``;
        see ``securefml.privacy.dp_gradients``): the same gradients, different speed.
    """

    def __init__(self, learner: MetaLearner, *, noise_multiplier: float, max_grad_norm: float, sample_rate: float,
                 accountant: str = "rdp", delta: float = 1e-5, max_participations: int | None = None,
                 source: NoiseSource | None = None, generator: torch.Generator | None = None,
                 secure_mode: bool = True, allow_support_leak: bool = False, per_sample: str = "auto") -> None:
        super().__init__(learner.model, learner.config)
        self._steps = steps_per_participation(learner)
        if learner.traces_local_gradients and not allow_support_leak:
            raise ConfigError(
                f"record-level DP cannot protect the support set of second-order {learner.name}: every support "
                "example influences every per-example meta-gradient. Use user-level DP (--dp user, recommended), "
                "or a first-order learner (fomaml, reptile, first-order metasgd), or acknowledge query-only "
                "coverage with allow_support_leak=True"
            )
        # the checks of the mechanism itself, once, before any client trains
        DPGradients.check(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, sample_rate=sample_rate,
                          per_sample=per_sample)
        Ledger(accountant, delta)  # checks the accountant's name
        self.per_sample = per_sample
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
        self.clients: dict[int, _ClientState] = {}
        self.touched: set[int] = set()

    # -- delegation: everything but the client step is the wrapped learner's ---------------------
    def init_params(self, device: torch.device | str | None = None) -> Params:
        return self.inner.init_params(device)

    def model_params(self, params: Params) -> Params:
        return self.inner.model_params(params)

    def layer_roles(self) -> Mapping[str, ParamRole]:
        return self.inner.layer_roles()

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return self.inner.forward(params, x)

    def adapt(self, params: Params, task_x: torch.Tensor, task_y: torch.Tensor, kind: str,
              *, steps: int | None = None) -> Params:
        return self.inner.adapt(params, task_x, task_y, kind, steps=steps)

    def calibrate(self, adapted: Params, support_x: torch.Tensor, support_y: torch.Tensor, kind: str) -> Params:
        return self.inner.calibrate(adapted, support_x, support_y, kind)

    def released_gradients(self) -> int:
        return self._steps

    @property
    def steps_per_participation(self) -> int:
        return self._steps

    @property
    def covers_support(self) -> bool:
        """Whether every local example is covered (False: query examples only, second-order learners)."""
        return not self.inner.traces_local_gradients

    # -- per client -------------------------------------------------------------------------------
    def gradients_for(self, client_id: int) -> DPGradients:
        """The client's DP gradient function (built on first use; its ledger is the client's)."""
        return self._state(client_id).gradients

    def _state(self, client_id: int) -> _ClientState:
        st = self.clients.get(client_id)
        if st is None:
            ledger = Ledger(self.accountant, self.delta)
            grads = DPGradients(noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                                sample_rate=self.sample_rate, ledger=ledger,
                                source=self.source.fork(f"client|{int(client_id)}"), secure_mode=self.secure_mode,
                                allow_traced=self.allow_support_leak and self.inner.traces_local_gradients,
                                per_sample=self.per_sample)
            st = self.clients[client_id] = _ClientState(grads, ledger)
        return st

    # -- one client round ------------------------------------------------------------------------
    def meta_update(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        cid = task.client_id
        st = self._state(cid)
        if self.max_participations is not None and st.participations >= self.max_participations:
            raise PrivacyBudgetExceeded(
                f"client {cid}: its record-level budget is spent after {st.participations} rounds "
                f"(epsilon {st.ledger.epsilon():.3g}); it sits out"
            )
        st.participations += 1
        self.touched.add(cid)
        before = st.gradients.steps
        new, metrics = self.inner.with_gradients(st.gradients).meta_update(params, task)
        taken = st.gradients.steps - before
        if taken != self._steps:
            raise ConfigError(
                f"{type(self.inner).__name__} declared {self._steps} released gradients per round but took {taken}: "
                "the noise was calibrated for the declared count; fix released_gradients() (the update is not released)"
            )
        return {n: p.detach() for n, p in new.items()}, metrics

    # -- a cohort as one vmap (simulation) -----------------------------------------------------------
    def vectorizes(self, tasks: Sequence[Task]) -> bool:
        """Whether ``update_many`` runs ``tasks`` as one vmap (``securefml.privacy.vectorized``).

        True when the wrapped learner's round is its ``client_step`` and the tasks stack (as for
        the non-private learner), the clients are distinct, and per-example gradients may be
        taken by ``vmap`` (not ``per_sample="expanded-weights"``, which cannot run under a vmap).
        """
        if self.per_sample == "expanded-weights" or len({t.client_id for t in tasks}) != len(tasks):
            return False
        return self.inner.vectorizes(tasks)

    def update_many(self, params: Params, tasks: Sequence[Task]) -> list[tuple[Params, dict[str, float]]]:
        """``[self.update(params, t) for t in tasks]``: one vmap over the clients when ``vectorizes(tasks)``.

        The mechanism, each client's noise stream and the ledger steps are the loop's (see
        ``securefml.privacy.vectorized``).  Raises ``PrivacyBudgetExceeded`` before any work if
        one client's budget is spent (the caller then runs the clients one at a time, where that
        client alone sits out), and ``ConfigError`` (nothing booked) if the learner took another
        number of released gradients than it declared.
        """
        if not self.vectorizes(tasks):
            return [self.update(params, t) for t in tasks]
        states = [self._state(t.client_id) for t in tasks]
        for t, st in zip(tasks, states):
            if self.max_participations is not None and st.participations >= self.max_participations:
                raise PrivacyBudgetExceeded(
                    f"client {t.client_id}: its record-level budget is spent after {st.participations} rounds "
                    f"(epsilon {st.ledger.epsilon():.3g}); it sits out"
                )
        new, losses, taken, traced = run_cohort(self.inner, [st.gradients for st in states], params, tasks)
        if taken != self._steps:
            raise ConfigError(
                f"{type(self.inner).__name__} declared {self._steps} released gradients per round but took {taken}: "
                "the noise was calibrated for the declared count; fix released_gradients() (the update is not released)"
            )
        for t, st in zip(tasks, states):  # the loop's bookkeeping: one ledger step per released gradient
            st.participations += 1
            self.touched.add(t.client_id)
            for _ in range(taken):
                st.ledger.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
            st.gradients.steps += taken
            st.gradients.traced_calls += traced
            st.gradients.engine_calls["vmap"] += taken
        name = self.inner.step_loss_name
        return [({n: (upd[n] - params[n]).detach() for n in params}, {name: loss})
                for upd, loss in zip(new, losses)]

    # -- reporting -------------------------------------------------------------------------------
    def epsilons(self, client_ids: set[int] | None = None) -> dict[int, float]:
        """Epsilon per client (all clients that ever trained, or ``client_ids``), cached per history."""
        ids = self.clients if client_ids is None else client_ids
        return {cid: self.clients[cid].ledger.epsilon() for cid in ids if cid in self.clients}

    def __repr__(self) -> str:
        return (f"RecordLevelDP({self.inner!r}, covers_support={self.covers_support}, "
                f"noise_multiplier={self.noise_multiplier:.4g}, max_grad_norm={self.max_grad_norm}, "
                f"sample_rate={self.sample_rate}, accountant={self.accountant!r}, secure_mode={self.secure_mode})")
