"""A per-client temperature with a prior shared by the federation: cross-validated on the support set, shrunk.

Why.  Temperature scaling fitted on the support set sharpens (the model was just adapted on it);
fitted on cross-validated support predictions (``MetaSGDTemperatureCV``) it is right for most
clients, but 10% of clients make no out-of-fold mistake and fit the grid's minimum, 0.05, which
made the rare query mistakes cost NLL 0.33 (``docs/bayes.md``).  One temperature fitted on
training clients fixes the level but is the same for every client, so it cannot follow a client's
misfit.  A hierarchical model does both.

Model.  Client ``c`` has a temperature ``T_c`` with ``log T_c ~ N(m, tau^2)``, ``(m, tau)`` shared
by the federation.  Its evidence is the likelihood of its out-of-fold predictions on its own
support set (``out_of_fold_logits``: the model adapted on the other folds predicts each held-out
fold), ``p(D_c | T) = prod_i softmax(z_i / T)[y_i]``.  The client's temperature is the posterior
mean of ``log T_c`` given ``D_c`` (quadrature on ``TEMPERATURE_GRID``, uniform in ``log T``): a
client whose out-of-fold predictions are confidently wrong gets a higher temperature, one with no
mistakes (whose likelihood keeps rising as ``T`` falls) is held near the federation's ``m`` by the
prior.  ``(m, tau)`` are fitted by type-II maximum likelihood on *training* clients' out-of-fold
predictions (``fit_temperature_prior``: the product over clients of ``int p(D_c | T) N(log T; m,
tau^2) d log T``, on a grid of ``m`` and ``tau``); held-out clients fit nothing but their own
posterior.  ``tau -> 0`` is one temperature for everyone, ``tau -> inf`` is ``MetaSGDTemperatureCV``.

Assumption, stated: out-of-fold models are adapted on ``(k-1)/k`` of the support set, so they are
a little less confident than the final one; the temperature they call for is, if anything, a
little low for it.  Guarantees (``tests/unit/test_bayes_temperature_prior.py``): the posterior
mean by quadrature equals a direct computation; with a very narrow prior it is the prior's ``m``,
with a very wide one the cross-validated maximum-likelihood temperature; confidently wrong
out-of-fold predictions never lower a client's temperature; the fitted prior recovers the level
and spread of temperatures that generated the data.

References
----------
Guo et al., On Calibration of Modern Neural Networks, ICML 2017.  Gelman et al., Bayesian Data
Analysis, 3rd ed., chapter 5 (hierarchical models, the marginal likelihood of hyper-parameters).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from securefml.bayes.temperature import TEMPERATURE_GRID
from securefml.errors import ConfigError

__all__ = ["TAU_GRID", "TemperaturePrior", "fit_temperature_prior", "out_of_fold_logits", "temperature_log_likelihood"]

#: spreads of ``log T`` tried by ``fit_temperature_prior``
TAU_GRID = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def temperature_log_likelihood(logits: torch.Tensor, labels: torch.Tensor,
                               grid: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_i log softmax(z_i / T)[y_i]`` for every ``T`` on ``grid`` (``TEMPERATURE_GRID``), float64."""
    grid = TEMPERATURE_GRID if grid is None else grid.to(torch.float64)
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ConfigError(f"the temperature likelihood needs [n, C] logits and [n] labels, got "
                          f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    z = logits.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(z).all()):
        raise ConfigError("the temperature likelihood needs finite logits")
    y = labels.detach().cpu().long()
    logp = torch.log_softmax(z.unsqueeze(0) / grid[:, None, None], dim=-1)
    return logp.gather(2, y[None, :, None].expand(grid.numel(), -1, 1)).squeeze(2).sum(dim=1)


def _log_prior(m: float, tau: float, log_grid: torch.Tensor) -> torch.Tensor:
    """The discretized ``N(m, tau^2)`` on the grid of ``log T`` (normalized over the grid)."""
    lp = -0.5 * ((log_grid - m) / tau) ** 2
    return lp - torch.logsumexp(lp, dim=0)


@dataclass(frozen=True)
class TemperaturePrior:
    """``log T ~ N(log_t0, tau^2)``: the federation's prior over a client's predictive temperature.

    Attributes
    ----------
    log_t0:
        Mean of ``log T`` (0: temperature 1).
    tau:
        Spread of ``log T`` across clients (> 0).
    """

    log_t0: float = 0.0
    tau: float = 0.5

    def __post_init__(self) -> None:
        if not math.isfinite(self.log_t0):
            raise ConfigError(f"the temperature prior's log_t0 must be finite, got {self.log_t0}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(f"the temperature prior's tau must be a positive number, got {self.tau}")

    def posterior_log_temperature(self, logits: torch.Tensor | None, labels: torch.Tensor | None) -> float:
        """Posterior mean of ``log T`` given out-of-fold ``logits`` and ``labels``, by quadrature on the grid.

        Without evidence (``None`` or no rows) it is the mean of the prior restricted to the grid
        (``log_t0`` unless the prior reaches past the grid's ends, 0.05 and 20).
        """
        log_grid = torch.log(TEMPERATURE_GRID)
        post = _log_prior(self.log_t0, self.tau, log_grid)
        if logits is not None and labels is not None and logits.shape[0] > 0:
            post = post + temperature_log_likelihood(logits, labels)
        w = torch.softmax(post, dim=0)
        return float((w * log_grid).sum())

    def temperature(self, logits: torch.Tensor | None, labels: torch.Tensor | None) -> float:
        """``exp`` of ``posterior_log_temperature``."""
        return math.exp(self.posterior_log_temperature(logits, labels))


def fit_temperature_prior(evidence: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                          taus: Sequence[float] = TAU_GRID) -> TemperaturePrior:
    """Type-II maximum likelihood of ``(m, tau)`` from several clients' out-of-fold ``(logits, labels)``.

    Maximizes ``sum_c log sum_T p(D_c | T) N(log T; m, tau^2)`` over ``m`` on the grid of ``log T``
    and ``tau`` in ``taus``.  Meant for *training* clients' support sets; ``ConfigError`` without any.
    """
    evidence = [(z, y) for z, y in evidence if z.shape[0] > 0]
    if not evidence:
        raise ConfigError("fitting the temperature prior needs at least one client's out-of-fold predictions")
    if not taus or not all(math.isfinite(t) and t > 0 for t in taus):
        raise ConfigError(f"taus must be positive numbers, got {taus}")
    log_grid = torch.log(TEMPERATURE_GRID)
    lik = torch.stack([temperature_log_likelihood(z, y) for z, y in evidence])  # [clients, T]
    best: tuple[float, float, float] | None = None
    for tau in taus:
        for m in log_grid.tolist():
            value = float(torch.logsumexp(lik + _log_prior(m, tau, log_grid)[None, :], dim=1).sum())
            if best is None or value > best[0]:
                best = (value, m, tau)
    assert best is not None
    return TemperaturePrior(log_t0=best[1], tau=best[2])


def shot_folds(labels: torch.Tensor, folds: int) -> torch.Tensor:
    """Fold of each support example: its rank among its class's examples, modulo ``folds`` (stratified)."""
    fold = torch.empty_like(labels)
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        fold[idx] = torch.arange(idx.numel(), device=labels.device) % folds
    return fold


def out_of_fold_logits(adapt: Callable[[torch.Tensor, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]],
                       x: torch.Tensor, y: torch.Tensor, *, folds: int
                       ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Out-of-fold logits on a support set: for each stratified fold, adapt on the others, predict it.

    ``adapt(x_keep, y_keep)`` returns the adapted model's prediction function (logits, or the log of
    a predictive).  ``(None, None)`` when fewer than two folds have both sides (no evidence).
    """
    if folds < 2:
        raise ConfigError(f"out-of-fold predictions need folds >= 2, got {folds}")
    fold = shot_folds(y, folds)
    logits, labels = [], []
    with torch.no_grad():
        for f in range(int(fold.max()) + 1 if fold.numel() else 0):
            out, keep = fold == f, fold != f
            if not bool(out.any()) or not bool(keep.any()):
                continue
            logits.append(adapt(x[keep], y[keep])(x[out]))
            labels.append(y[out])
    if len(logits) < 2:
        return None, None
    return torch.cat(logits), torch.cat(labels)
