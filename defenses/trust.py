"""FLTrust: trust bootstrapped from a small root dataset held by the server."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from securefml.defenses.base import AggregationResult, Defense
from securefml.defenses.distance import combine
from securefml.defenses.linalg import DEFAULT_CHUNK, column_blocks, row_norms
from securefml.defenses.registry import DEFENSES
from securefml.errors import ConfigError
from securefml.gram import Gram
from securefml.reveals import Reveals

__all__ = ["fltrust_coefficients", "reference_inner", "FLTrust"]


def reference_inner(x: torch.Tensor, ref: torch.Tensor, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``[n]`` float64 inner products ``<u_i, ref>`` accumulated block by block."""
    acc = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    r = ref.to(device=x.device, dtype=torch.float64)
    for s in column_blocks(x.shape[1], chunk):
        acc += x[:, s].to(torch.float64) @ r[s]
    return acc


def fltrust_coefficients(
    inner_ref: torch.Tensor, norms: torch.Tensor, ref_norm: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLTrust's coefficients and trust scores.

    ``TS_i = ReLU(cos(u_i, g0))``; each update is rescaled to ``||g0||`` and the aggregate is
    ``sum_i TS_i (||g0|| / ||u_i||) u_i / sum_j TS_j`` (zero when every score is zero).
    """
    nrm = norms.to(torch.float64).clamp_min(1e-300)
    cos = (inner_ref.to(torch.float64) / (nrm * ref_norm)).clamp(-1, 1)
    ts = cos.clamp_min(0)
    total = ts.sum()
    if float(total) <= 0:
        return torch.zeros_like(ts), ts
    return ts * (ref_norm / nrm) / total, ts


@DEFENSES.register("fltrust")
class FLTrust(Defense):
    """FLTrust (Cao et al., NDSS 2021): trust scores from a server reference update.

    The server computes its own update ``g0`` on a small clean root dataset and passes it as
    ``context["reference"]`` (same length as the client rows).  Each client's trust score is
    ``ReLU(cos(u_i, g0))``; updates are rescaled to ``||g0||`` and averaged with the trust
    scores as weights.  ``flagged`` lists clients with a zero trust score.

    Threat model: any number of Byzantine clients (the paper reports robustness even with a
    Byzantine majority), provided the root dataset is clean and representative enough that
    ``g0`` points in a benign direction.  Client sample-count weights are ignored, as in the
    paper.  Needs norms and inner products with ``g0`` only: runs on a CKKS Gram that carries
    reference inner products (the protocol is given ``reference=g0``).

    References
    ----------
    X. Cao, M. Fang, J. Liu, N. Z. Gong. FLTrust: Byzantine-robust Federated Learning via
    Trust Bootstrapping. NDSS 2021.
    """

    needs_reference = True

    name = "fltrust"
    runs_on = frozenset({Reveals.UPDATES, Reveals.GRAM, Reveals.BUCKETS})

    def __init__(self, *, chunk: int = DEFAULT_CHUNK) -> None:
        self.chunk = int(chunk)

    @staticmethod
    def _reference(context: Mapping[str, Any], d: int) -> torch.Tensor:
        ref = context.get("reference")
        if ref is None:
            raise ConfigError("FLTrust needs context['reference']: the server's update on its root dataset")
        ref = torch.as_tensor(ref).reshape(-1)
        if ref.numel() != d:
            raise ConfigError(f"FLTrust context['reference'] has {ref.numel()} entries, client rows have {d}")
        if not bool(torch.isfinite(ref).all()):
            raise ConfigError("FLTrust context['reference'] contains NaN or Inf")
        return ref

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        ref = self._reference(context, updates.shape[1])
        ref_norm = float(ref.to(torch.float64).norm())
        if ref_norm == 0:
            raise ConfigError("FLTrust context['reference'] is the zero vector: it gives no direction")
        coeffs, ts = fltrust_coefficients(
            reference_inner(updates, ref, chunk=self.chunk), row_norms(updates, chunk=self.chunk), ref_norm
        )
        return self._result(combine(coeffs, updates), client_ids, coeffs, ts)

    def decide_gram(self, gram: Gram, weights: torch.Tensor, *, context: Mapping[str, Any]) -> AggregationResult:
        if gram.reference is None or gram.reference_sq_norm is None:
            raise ConfigError(
                "FLTrust on a Gram needs reference inner products: give the protocol the server's reference update"
            )
        ref_norm = float(gram.reference_sq_norm) ** 0.5
        if ref_norm == 0:
            raise ConfigError("FLTrust reference update is the zero vector: it gives no direction")
        coeffs, ts = fltrust_coefficients(gram.reference, gram.norms, ref_norm)
        return self._result(None, gram.client_ids, coeffs, ts)

    @staticmethod
    def _result(
        agg: torch.Tensor | None, ids: tuple[int, ...], coeffs: torch.Tensor, ts: torch.Tensor
    ) -> AggregationResult:
        flagged = tuple(ids[i] for i in (ts <= 0).nonzero().flatten().tolist())
        return AggregationResult(agg, ids, weights=coeffs, scores=ts, flagged=flagged)
