"""Record-level DP-SGD for a cohort as one ``torch.func.vmap``: the loop's mechanism, batched.

``RecordLevelDP`` runs each client's round through the client's own
:class:`~securefml.privacy.dp_gradients.DPGradients`, one client at a time.  In simulation,
clients whose tasks stack can run the wrapped learner's ``client_step`` as one vmap over
clients instead (``RecordLevelDP.update_many``, used by ``securefml.cohort.train_cohort``).
This module is that path.  It changes nothing in the mechanism or in the accounting:

- **Randomness.**  Each released gradient draws, from *each client's own* noise stream, the
  Poisson coins of the batch and then the Gaussian noise of the sum, exactly the calls (and
  sizes) the loop makes in that client's DP step, in the same order within the client's
  stream.  So the coins and the noise are the loop's, bit for bit, when the clients' streams
  are (the streams are forked per client on its first round, in cohort order).
- **Sampling without data-dependent shapes.**  The loop computes per-example gradients of the
  sampled examples only; under vmap the batch keeps its shape, every example's gradient is
  computed and the unsampled ones are masked out (``torch.where``, so a non-finite gradient of
  an unsampled example cannot leak into the sum).  The clipping is Opacus' flat clipping, as in
  ``clip_and_sum`` (factor ``min(1, C / (norm + 1e-6))``; a sampled example whose gradient is not
  finite contributes zero).  The released gradient equals the loop's up to float summation order
  (tested: ``tests/unit/test_dp_vectorized.py``).
- **Accounting.**  The ledger of every client gets the same steps ``(sigma, q)`` the loop books,
  one per released gradient, after the vmap returns and only if every client took the declared
  number (otherwise ``ConfigError`` and nothing is booked or released): the same epsilon.
- **Budgets.**  A client whose budget is spent makes the whole vectorized group refuse before any
  work (``PrivacyBudgetExceeded``); ``train_cohort`` then runs that group client by client, where
  the spent client alone sits out.

Cost: per-example gradients of the whole batch instead of the sampled ``q`` fraction (with
``q`` near 1, the usual few-shot setting, nothing extra); ``benchmarks/meta.py --cohort-speed``
measures the vmap against the loop in the same run.

Threat model: unchanged.  The vmap is a simulation device: in a deployment every client runs its
own DP-SGD on its own device, and what leaves each client is the same released gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.func import vmap

from securefml.data.base import Task
from securefml.meta.gradients import Batch, LossFn, Params
from securefml.privacy.dp_gradients import DPGradients, ReleasedGradients

__all__ = ["CohortDPGradients", "run_cohort"]


class CohortDPGradients(ReleasedGradients):
    """The DP gradient function of one client inside the vmap over a cohort (see the module docstring).

    Parameters
    ----------
    clients:
        Every client's own ``DPGradients`` (its stream and settings), in vmap order.
    index:
        This vmapped client's position in ``clients`` (a batched scalar under the vmap).
    """

    vmappable = True

    def __init__(self, clients: Sequence[DPGradients], index: torch.Tensor) -> None:
        first = clients[0]
        self.clients = list(clients)
        self.index = index
        self.noise_multiplier = first.noise_multiplier
        self.max_grad_norm = first.max_grad_norm
        self.sample_rate = first.sample_rate
        self.secure_mode = first.secure_mode
        self.allow_traced = first.allow_traced
        #: released gradients so far (the same count for every client of the vmap)
        self.steps = 0
        self.traced_calls = 0
        self._busy = False

    def __call__(self, loss: LossFn, params: Params, batch: Batch) -> Params:
        self._refuse_nested()
        x, y = batch
        n = int(x.shape[0])
        base = {k: v.detach() for k, v in params.items()}
        sizes = [v.numel() for v in base.values()]
        std = self.noise_multiplier * self.max_grad_norm if self.noise_multiplier > 0 else 0.0
        # each client's coins, then its noise, from its own stream: the loop's draws in the loop's order
        coins_all, noise_all = [], []
        for g in self.clients:
            coins_all.append(g.source.bernoulli(n, self.sample_rate))
            if std > 0:
                noise_all.append(g.source.normal(sum(sizes), std, fp_resistant=self.secure_mode))
        coins = torch.from_numpy(np.stack(coins_all)).to(x.device)[self.index]
        self._busy = True
        try:
            per_sample = self.per_sample(loss, base, (x, y))
        finally:
            self._busy = False
        summed = _masked_clip_and_sum(per_sample, coins, self.max_grad_norm)
        expected = self.sample_rate * n
        self.steps += 1
        if std == 0.0:
            return {k: v / expected for k, v in summed.items()}
        noise = torch.from_numpy(np.stack(noise_all))[self.index]
        out = {}
        for (k, v), part in zip(summed.items(), torch.split(noise, sizes)):
            out[k] = (v + part.reshape(v.shape).to(device=v.device, dtype=v.dtype)) / expected
        return out

    def __repr__(self) -> str:
        return f"CohortDPGradients({len(self.clients)} clients, noise_multiplier={self.noise_multiplier:.4g})"


def _masked_clip_and_sum(per_sample: Params, mask: torch.Tensor, max_grad_norm: float) -> Params:
    """``clip_and_sum`` of the examples where ``mask`` is True, without indexing (vmap-safe).

    Every branch of ``clip_and_sum`` that depends on data is a ``torch.where`` here: rows not
    sampled, or not finite, contribute exactly zero.
    """
    first = next(iter(per_sample.values()))
    b = first.shape[0]
    norms = torch.stack([g.reshape(b, -1).norm(2, dim=1) for g in per_sample.values()], dim=1).norm(2, dim=1)
    keep = mask & torch.isfinite(norms)
    if math.isinf(max_grad_norm):
        factor = torch.where(keep, torch.ones_like(norms), torch.zeros_like(norms))
    else:
        factor = torch.where(keep, (max_grad_norm / (norms + 1e-6)).clamp(max=1.0), torch.zeros_like(norms))
    out = {}
    for n, g in per_sample.items():
        rows = keep.view(-1, *([1] * (g.dim() - 1)))
        g = torch.where(rows, g, torch.zeros_like(g))
        out[n] = torch.einsum("i,i...->...", factor.to(g.dtype), g)
    return out


def run_cohort(learner: object, clients: Sequence[DPGradients], params: Params,
               tasks: Sequence[Task]) -> tuple[list[Params], list[float], int, int]:
    """Every task's ``client_step`` under record-level DP as one vmap.

    ``learner`` is the wrapped (non-private) learner; ``clients[i]`` is task ``i``'s client's
    ``DPGradients``.  Returns the new parameters per task, the step losses, and the released
    and traced gradient counts each client took (the caller books them on the ledgers).
    """
    base = {n: p.detach() for n, p in params.items()}
    kind = tasks[0].kind
    fields = ("support_x", "support_y", "query_x", "query_y")
    stacked = [torch.stack([getattr(t, k) for t in tasks]) for k in fields]
    made: list[CohortDPGradients] = []

    def one(i: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor,
            qy: torch.Tensor) -> tuple[Params, torch.Tensor]:
        grads = CohortDPGradients(clients, i)
        made.append(grads)
        return learner.with_gradients(grads).client_step(base, sx, sy, qx, qy, kind)  # type: ignore[attr-defined]

    index = torch.arange(len(tasks), device=stacked[0].device)
    new, loss = vmap(one)(index, *stacked)
    losses = loss.detach().tolist()
    per_task = [{n: new[n][i].detach() for n in base} for i in range(len(tasks))]
    return per_task, losses, made[0].steps, made[0].traced_calls
