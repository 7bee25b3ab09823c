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

Why relevance weights on the shared part: when the clients' tasks conflict (``digits-clusters``
with several groups), the plain mean of ``P``, ``Q`` mixes the conflicting tasks' adapters;
weighting by relevance pools mainly the clients of the same task, whatever their architecture,
which is where a small architecture group (one client per task) can gain.

Guarantees (tested): every client's effective weights over its candidates form a distribution,
and permuting the clients permutes the per-client aggregates the same way (the rule does not
depend on the order of uploads).  The weights come from task vectors, so what this leaks and
how it is enforced under a secure protocol is the relevance step's (``docs/relevance.md``);
this module runs in plaintext.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from securefml.errors import ConfigError
from securefml.relevance.colora import HeteroUpload, check_upload

__all__ = ["restricted_rows", "relevance_aggregate_heterogeneous"]

State = dict[str, torch.Tensor]


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


def _combine(states: Sequence[Mapping[str, torch.Tensor]], row: torch.Tensor, key: str) -> torch.Tensor:
    acc = torch.zeros_like(states[0][key], dtype=torch.float64)
    for wj, s in zip(row.tolist(), states):
        if wj:
            acc = acc + wj * s[key].to(torch.float64)
    return acc.to(states[0][key].dtype)


def relevance_aggregate_heterogeneous(
    uploads: Sequence[HeteroUpload], weights: torch.Tensor, *, share: bool = True
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

    Returns
    -------
    list
        ``out[i] = (shared_i, arch_i)`` for ``uploads[i]``.
    """
    n = len(uploads)
    if n == 0:
        raise ConfigError("no uploads to aggregate")
    if weights.shape != (n, n) or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ConfigError(f"weights must be a finite non-negative [{n}, {n}] matrix, got {tuple(weights.shape)}")
    for u in uploads:
        check_upload(u)
    archs = [u.architecture for u in uploads]
    same = torch.tensor([[a == b for b in archs] for a in archs], dtype=torch.bool)
    arch_rows = restricted_rows(weights, same)
    out: list[tuple[State, State]] = []
    for i, u in enumerate(uploads):
        group = [j for j in range(n) if same[i, j]]
        arch_states = [uploads[j].arch for j in group]
        if any(s.keys() != u.arch.keys() for s in arch_states):
            raise ConfigError(f"uploads of architecture {u.architecture!r} must hold the same parameters")
        arch_i = {k: _combine(arch_states, arch_rows[i, group], k) for k in u.arch}
        shared_i: State = {}
        for key, value in u.shared.items():
            cand = torch.tensor([(share or same[i, j].item()) and key in uploads[j].shared for j in range(n)],
                                dtype=torch.bool)
            shapes = {tuple(uploads[j].shared[key].shape) for j in range(n) if cand[j]}
            if shapes != {tuple(value.shape)}:
                raise ConfigError(f"shared {key} has shapes {sorted(shapes)} across clients: ranks differ")
            row = restricted_rows(weights[i:i + 1], cand[None, :])[0]
            having = [j for j in range(n) if cand[j]]
            shared_i[key] = _combine([uploads[j].shared for j in having], row[having], key)
        out.append((shared_i, arch_i))
    return out
