"""Relevance weights from task-vector geometry, and the effective-contributors policy.

Pure functions on small matrices (``[n, n]`` for n clients), shared by every protocol path.

Weights
-------
Client i's weight on client j is ``softmax_j(sim[i, j] / T)`` over the clients j it may
use: all others (``include_self=False``, FedMosaic's RELA) or all including itself, where
its own similarity counts as that of its most similar other client (``cos(v_i, v_i) = 1``
would otherwise always dominate).  With
``standardize=True`` each row's similarities are first centred and divided by their standard
deviation over the row's candidates, so that ``T`` is scale-free: cosines of gradient task
vectors of a randomly initialised network sit close together (0.9 to 1.0), and a fixed ``T``
would be either too hot for one dataset or too cold for another.

Effective contributors (the key-holder policy)
----------------------------------------------
A per-client aggregate ``a_i = sum_j w_ij x_j`` is decrypted for client i.  Client i knows its
own ``x_i`` and ``w_ii``, so what it learns about the others is ``sum_{j != i} w_ij x_j``.
If that weight is concentrated on one other client, client i essentially reads that client's
model. The policy: the weights on the *others*, renormalised, must have an effective number of
contributors ``n_eff = (sum_{j!=i} w_ij)^2 / sum_{j!=i} w_ij^2 >= m_min``. This implies every
other client carries at most ``1 / sqrt(m_min)`` of the others' mass. ``temper`` raises a
failing row's temperature just enough to satisfy the bound: it replaces the row by its
*escort* ``w^beta / sum w^beta`` with the largest ``beta`` in (0, 1] that meets it (a
bisection; ``beta`` divides the softmax logits, so this is the same softmax at temperature ``T
/ beta``). ``n_eff`` of the escort family decreases monotonically in ``beta``: ``log sum_j
p_beta,j^2 = A(2 beta) - 2 A(beta)`` with the convex ``A(beta) = log sum_j w_j^beta``, whose
derivative ``2 (A'(2 beta) - A'(beta))`` is >= 0. Raising the temperature spreads a row over
its *most relevant* clients first, so the added mass goes to the client's own cluster; the
earlier rule, mixing with the uniform row, handed the same mass to every client alike,
unrelated ones included (on ``digits-clusters`` it moved about 5-20 % of each held-out
client's weight to other groups, see ``docs/relevance.md``). Only when even ``beta -> 0``
(uniform over the row's non-zero entries) falls short does ``temper`` mix with the uniform row
over all candidates.
``check_effective`` refuses a row that does not satisfy the bound (what a key holder runs
before decrypting).
"""

from __future__ import annotations

import torch

from securefml.errors import ConfigError, ProtocolError
from securefml.gram import Gram

__all__ = [
    "cosine_similarity",
    "relevance_weights",
    "cross_weights",
    "cross_cosine",
    "effective_contributors",
    "temper",
    "temper_row",
    "worst_case_effective",
    "check_effective",
]


def cosine_similarity(vectors: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` cosine similarities of the rows of ``vectors`` (float64) via their Gram."""
    return Gram.from_updates(vectors).cosine()


def cross_cosine(new: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """``[h, n]`` cosine similarities (float64) of each row of ``new`` to each row of ``train``."""
    a, b = new.to(torch.float64), train.to(torch.float64)
    return (a @ b.T) / (a.norm(dim=1, keepdim=True).clamp_min(1e-12) * b.norm(dim=1)[None, :].clamp_min(1e-12))


def _candidates(n: int, include_self: bool, device: torch.device | None = None) -> torch.Tensor:
    mask = torch.ones((n, n), dtype=torch.bool, device=device)
    if not include_self:
        mask.fill_diagonal_(False)
    return mask


def relevance_weights(
    similarity: torch.Tensor,
    *,
    temperature: float,
    include_self: bool = False,
    standardize: bool = True,
) -> torch.Tensor:
    """Row-stochastic ``[n, n]`` weights ``softmax(sim / T)`` over each row's candidates.

    With ``include_self=False`` the diagonal is 0 (a single client, n = 1, then gets weight 1
    on itself: there is nobody else).  Permutation equivariant: permuting the clients permutes
    rows and columns of the result the same way.
    """
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    s = similarity.to(torch.float64)
    if s.dim() != 2 or s.shape[0] != s.shape[1]:
        raise ConfigError(f"similarity must be a square matrix, got shape {tuple(s.shape)}")
    n = s.shape[0]
    if n == 1:
        return torch.ones((1, 1), dtype=torch.float64)
    others = _candidates(n, False, s.device)
    if include_self:
        # cos(v_i, v_i) = 1 is trivially the largest entry and not comparable with the noisy
        # cross-client similarities: a client counts itself as its most relevant peer instead
        s = s.clone()
        s.fill_diagonal_(0)
        s = s + torch.diag(torch.where(others, s, torch.full_like(s, -torch.inf)).max(1).values)
    if standardize:
        s = _standardize_rows(s, others)
    mask = _candidates(n, include_self, s.device)
    logits = torch.where(mask, s / temperature, torch.full_like(s, -torch.inf))
    return torch.softmax(logits, dim=1)


def cross_weights(
    similarity: torch.Tensor, *, temperature: float, standardize: bool = True
) -> torch.Tensor:
    """``[h, n]`` weights of h new clients over n existing ones (every column is a candidate)."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    s = similarity.to(torch.float64)
    if s.dim() != 2 or s.shape[1] == 0:
        raise ConfigError(f"cross similarity must be [h, n] with n >= 1, got {tuple(s.shape)}")
    if standardize and s.shape[1] > 1:
        s = _standardize_rows(s, torch.ones_like(s, dtype=torch.bool))
    return torch.softmax(s / temperature, dim=1)


def _standardize_rows(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(s.dtype)
    count = m.sum(1, keepdim=True).clamp_min(1)
    mean = (s * m).sum(1, keepdim=True) / count
    var = (((s - mean) * m) ** 2).sum(1, keepdim=True) / count
    return (s - mean) / var.sqrt().clamp_min(1e-6)


def effective_contributors(weights: torch.Tensor, *, exclude: int | None = None) -> float:
    """``(sum w)^2 / sum w^2`` of a non-negative weight row, leaving out position ``exclude``."""
    w = weights.to(torch.float64).reshape(-1)
    if exclude is not None:
        w = torch.cat([w[:exclude], w[exclude + 1 :]])
    sq = float((w * w).sum())
    return float(w.sum()) ** 2 / sq if sq > 0 else 0.0


def _escort(row: torch.Tensor, beta: float) -> torch.Tensor:
    """``row^beta / sum row^beta`` computed on logarithms (zeros stay zero)."""
    pos = row > 0
    logits = torch.where(pos, beta * row.clamp_min(1e-300).log(), torch.full_like(row, -torch.inf))
    return torch.softmax(logits, dim=0)


def worst_case_effective(weights: torch.Tensor) -> float:
    """``min_k n_eff(w without k)`` over every entry k (and over leaving out nobody).

    The recipient-blind form of the policy: a party that checks a combination without
    knowing whose aggregate it is (the CKKS key holder) must assume the recipient is the
    client whose removal leaves the others most concentrated.  ``n_eff`` of the rest, for
    each k, is ``(sum_{j != k} w_j)^2 / sum_{j != k} w_j^2`` (summed directly: ``Q - w_k^2``
    would cancel to 0 next to a dominant entry).
    """
    w = weights.to(torch.float64).reshape(-1).clamp_min(0)
    total, sq = float(w.sum()), float((w * w).sum())
    if sq <= 0:
        return 0.0
    live = w[w > 0]
    off = ~torch.eye(live.numel(), dtype=torch.bool)  # sums without entry k, not S - w_k (no cancellation)
    rest_s = (live[None, :] * off).sum(1)
    rest_q = ((live * live)[None, :] * off).sum(1)
    per = torch.where(rest_q > 0, rest_s * rest_s / rest_q.clamp_min(1e-300), torch.zeros_like(rest_s))
    return min(total * total / sq, float(per.min()))


def _measure(w: torch.Tensor, position: int | None, blind: bool) -> float:
    return worst_case_effective(w) if blind else effective_contributors(w, exclude=position)


def temper_row(
    row: torch.Tensor, position: int | None, m_min: float, candidates: torch.Tensor, *, blind: bool = False,
    tol: float = 1e-9,
) -> torch.Tensor:
    """One row of ``temper``: the hottest escort of ``row`` that has ``n_eff >= m_min``.

    ``position`` is the row's own client (left out of ``n_eff``; None for a new client that
    is nobody's member), ``candidates`` the boolean mask of the entries the row may use (the
    uniform fallback spreads over them).  ``blind=True`` measures ``worst_case_effective``
    instead (the recipient-blind policy).  Returns the row unchanged when it already meets
    the bound.  Both measures decrease monotonically along the escort family (module
    docstring; the worst case is a minimum of such functions), so the bisection is exact.
    """
    w = row.to(torch.float64)
    if _measure(w, position, blind) >= m_min - tol:
        return w
    flat = _escort(w, 0.0)
    if _measure(flat, position, blind) >= m_min:
        lo, hi = 0.0, 1.0  # beta = lo meets the bound, beta = hi does not
        for _ in range(60):
            mid = (lo + hi) / 2
            if _measure(_escort(w, mid), position, blind) >= m_min:
                lo = mid
            else:
                hi = mid
        return _escort(w, lo)
    uniform = candidates.to(torch.float64)
    uniform = uniform / uniform.sum().clamp_min(1e-300)
    lo, hi = 0.0, 1.0  # fallback: mix with the uniform row, mixing coefficient hi meets the bound
    for _ in range(60):
        mid = (lo + hi) / 2
        if _measure((1 - mid) * flat + mid * uniform, position, blind) >= m_min:
            hi = mid
        else:
            lo = mid
    return (1 - hi) * flat + hi * uniform


def temper(
    weights: torch.Tensor, m_min: float, *, include_self: bool = False, blind: bool = False, tol: float = 1e-9
) -> torch.Tensor:
    """Raise each failing row's temperature until ``n_eff(others) >= m_min`` (module docstring).

    Rows that already satisfy the bound are returned unchanged; zero entries stay zero unless
    even the uniform row over a row's non-zero entries falls short, in which case the row is
    mixed with the uniform row over its candidates.  Raises ``ConfigError`` when even that
    cannot meet the bound (fewer than ``m_min`` other clients).
    """
    w = weights.to(torch.float64).clone()
    n = w.shape[0]
    if m_min <= 1:
        return w
    others = n - 1
    if others < m_min * (1 - 1e-5):  # (a caller's tempering margin must not turn n - 1 = m_min into an error)
        raise ConfigError(f"{n} clients cannot give any client {m_min} effective contributors besides itself")
    cand = _candidates(n, include_self, w.device)
    for i in range(n):
        w[i] = temper_row(w[i], i, m_min, cand[i], blind=blind, tol=tol)
    return w


def check_effective(weights: torch.Tensor, position: int, m_min: float, *, tol: float = 1e-6) -> float:
    """Refuse (``ProtocolError``) a weight row a key holder is asked to decrypt a sum with.

    The row must be finite, non-negative and sum to 1, and the others' effective number of
    contributors must be at least ``m_min``.  Returns that number.  This is the check the CKKS
    key holder should run itself before decrypting a per-client aggregate (it is given the row
    and recomputes the bound, instead of trusting the server's claim).
    """
    w = weights.to(torch.float64).reshape(-1)
    if not bool(torch.isfinite(w).all()) or bool((w < -tol).any()) or abs(float(w.sum()) - 1.0) > tol:
        raise ProtocolError("per-client aggregate weights must be a finite probability vector")
    if not 0 <= position < w.numel():
        raise ProtocolError(f"position {position} is outside a row of {w.numel()} weights")
    n_eff = effective_contributors(w.clamp_min(0), exclude=position)
    if n_eff < m_min - tol:
        raise ProtocolError(
            f"refusing to decrypt a per-client aggregate whose weight on the other clients has "
            f"{n_eff:.2f} effective contributors (minimum {m_min:g})"
        )
    return n_eff
