"""Relevance-weighted Co-LoRA aggregation: one personalized (P, Q, A, B) per client.

FedMosaic (Seo et al., ICLR 2026) combines its two ideas: the server gives each client its own
aggregate, weighted by task relevance (RELA), and Co-LoRA's dimension-invariant ``P``, ``Q``
let that aggregate draw on clients of every architecture.  Here, for clients ``i`` and ``j``
with relevance weight ``w[i, j]`` (a row-stochastic matrix, e.g. ``relevance_weights`` of the
cosine similarities of their task vectors):

* shared part of client i: ``sum_j w[i, j] * shared_j`` over every client ``j`` that has the
  block key (``share=True``), or over the clients of i's architecture only (``share=False``:
  each architecture group alone), the row renormalised over those candidates;
* architecture part of client i (base, ``A``, ``B``): the same, over the clients of i's
  architecture only (the issue's definition: ``A``, ``B`` stay within the group).

Evidence-gated sharing (``own_evidence=m``, optional, ``share=True`` only): a client whose own
architecture already holds enough relevant evidence keeps that architecture's shared part
instead of the cross-architecture one.  For client i let ``p`` be its relevance row restricted
to its own architecture (self included, renormalised) and ``n_own = 1 / sum p^2`` its effective
number of same-architecture contributors; the client takes

    ``shared_i = lam_i * cross_i + (1 - lam_i) * own_i``,  ``lam_i = clip((m - n_own) / (m - 1), 0, 1)``

where ``cross_i`` is the relevance-weighted mean over every architecture and ``own_i`` the one
over its own.  A client alone with its task in its architecture (``n_own = 1``, the smallest
group's case) takes the whole cross-architecture part; one with ``m`` or more equally relevant
same-architecture contributors (the largest group's case) keeps its own, so the other shapes'
P, Q cannot pull it away from what its group learns alone, while its own P, Q still reach the
others.  Both candidates are mixtures of the same uploads with the same weights, so the rule
adds no data and nothing to what the server learns; ``lam_i`` depends only on the weight row.

Why relevance weights on the shared part: when the clients' tasks conflict (``digits-clusters``
with several groups), the plain mean of ``P``, ``Q`` mixes the conflicting tasks' adapters;
weighting by relevance pools mainly the clients of the same task, whatever their architecture,
which is where a small architecture group (one client per task) can gain.

Guarantees (tested): every client's effective weights over its candidates form a distribution,
and permuting the clients permutes the per-client aggregates the same way (the rule does not
depend on the order of uploads).  The weights come from task vectors, so what this leaks and
how it is enforced under a secure protocol is the relevance step's (``docs/relevance.md``);
this module runs in plaintext, ``hetero_secure`` computes the same rows under CKKS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from securefml.errors import ConfigError
from securefml.relevance.colora import HeteroUpload, check_upload

__all__ = ["restricted_rows", "relevance_aggregate_heterogeneous", "cross_share", "check_rows"]

State = dict[str, torch.Tensor]


def check_rows(uploads: Sequence[HeteroUpload], weights: torch.Tensor) -> int:
    """The number of uploads, after refusing an empty round, a bad weight matrix or a bad upload.

    Both the plaintext rule and its CKKS twin (``hetero_secure``) start here, so both refuse
    the same inputs with the same typed errors before any work.
    """
    n = len(uploads)
    if n == 0:
        raise ConfigError("no uploads to aggregate")
    if weights.shape != (n, n) or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ConfigError(f"weights must be a finite non-negative [{n}, {n}] matrix, got {tuple(weights.shape)}")
    for u in uploads:
        check_upload(u)
    return n

def restricted_rows(weights: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Each row of ``weights`` restricted to its ``candidates`` (bool mask) and renormalised.

    A row whose candidates all have weight 0 (e.g. a softmax underflow) falls back to the
    uniform distribution over its candidates; a row without candidates is an error.
    """
    w = torch.where(candidates, weights.to(torch.float64), torch.zeros((), dtype=torch.float64))
    if not bool(candidates.any(1).all()):
        raise ConfigError("every client needs at least one candidate to aggregate over")
    total = w.sum(1, keepdim=True)
    uniform = candidates.to(torch.float64) / candidates.sum(1, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(1e-300), uniform)


def cross_share(weights: torch.Tensor, same: torch.Tensor, own_evidence: float | None) -> torch.Tensor:
    """Per client, the share ``lam_i`` of the cross-architecture shared part (module docstring).

    ``weights`` ``[n, n]`` relevance rows, ``same`` ``[n, n]`` bool (same architecture);
    ``own_evidence`` None gives 1 for every client (plain cross-architecture sharing).
    """
    n = weights.shape[0]
    if own_evidence is None:
        return torch.ones(n, dtype=torch.float64)
    if not own_evidence > 1:
        raise ConfigError(f"own_evidence must be > 1 (effective same-architecture contributors), got {own_evidence}")
    p = restricted_rows(weights, same)
    n_own = 1.0 / (p * p).sum(1).clamp_min(1e-300)
    return ((own_evidence - n_own) / (own_evidence - 1.0)).clamp(0.0, 1.0)


def _combine(states: Sequence[Mapping[str, torch.Tensor]], row: torch.Tensor, key: str) -> torch.Tensor:
    acc = torch.zeros_like(states[0][key], dtype=torch.float64)
    for wj, s in zip(row.tolist(), states):
        if wj:
            acc = acc + wj * s[key].to(torch.float64)
    return acc.to(states[0][key].dtype)


def relevance_aggregate_heterogeneous(
    uploads: Sequence[HeteroUpload], weights: torch.Tensor, *, share: bool = True,
    own_evidence: float | None = None,
) -> list[tuple[State, State]]:
    """Per-client ``(shared part, architecture part)`` aggregates (see the module docstring).

    Parameters
    ----------
    uploads:
        The round's uploads (checked: a non-finite one is refused naming its client).
    weights:
        ``[n, n]`` non-negative relevance weights, row i for client i (self may be included).
    share:
        Pool the shared part across architectures (True) or within the architecture (False).
    own_evidence:
        Evidence-gated sharing (``share=True``): the effective number of same-architecture
        contributors at which a client keeps its own architecture's shared part (module
        docstring); None: every client takes the cross-architecture part.

    Returns
    -------
    list
        ``out[i] = (shared_i, arch_i)`` for ``uploads[i]``.
    """
    n = check_rows(uploads, weights)
    archs = [u.architecture for u in uploads]
    same = torch.tensor([[a == b for b in archs] for a in archs], dtype=torch.bool)
    arch_rows = restricted_rows(weights, same)
    lam = cross_share(weights, same, own_evidence if share else None)
    out: list[tuple[State, State]] = []
    for i, u in enumerate(uploads):
        group = [j for j in range(n) if same[i, j]]
        arch_states = [uploads[j].arch for j in group]
        if any(s.keys() != u.arch.keys() for s in arch_states):
            raise ConfigError(f"uploads of architecture {u.architecture!r} must hold the same parameters")
        arch_i = {k: _combine(arch_states, arch_rows[i, group], k) for k in u.arch}
        shared_i: State = {}
        li = float(lam[i])
        for key, value in u.shared.items():
            cand = torch.tensor([(share or same[i, j].item()) and key in uploads[j].shared for j in range(n)],
                                dtype=torch.bool)
            shapes = {tuple(uploads[j].shared[key].shape) for j in range(n) if cand[j]}
            if shapes != {tuple(value.shape)}:
                raise ConfigError(f"shared {key} has shapes {sorted(shapes)} across clients: ranks differ")
            row = restricted_rows(weights[i:i + 1], cand[None, :])[0]
            if li < 1.0:  # evidence-gated: mix in the own-architecture row
                own = cand & same[i]
                row = li * row + (1.0 - li) * restricted_rows(weights[i:i + 1], own[None, :])[0]
            having = [j for j in range(n) if cand[j]]
            shared_i[key] = _combine([uploads[j].shared for j in having], row[having], key)
        out.append((shared_i, arch_i))
    return out
