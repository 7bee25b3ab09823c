"""The statistics a geometry-only robust rule needs, and nothing more.

Under CKKS the key holder computes and decrypts this small matrix from the round's signed
uploads (never releasing an individual update): squared norms, all pairwise inner products, and
inner products with a reference vector signed by the reference party its policy names.  In
plaintext it is one matmul.  Rules derive distances and cosines from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from securefml.errors import ConfigError

__all__ = ["Gram"]


@dataclass(frozen=True)
class Gram:
    """Pairwise geometry of n client updates.

    Attributes
    ----------
    client_ids:
        The clients the rows refer to, in order.
    inner:
        ``[n, n]`` float64 matrix of inner products <u_i, u_j> (its diagonal: squared norms).
    reference:
        ``[n]`` inner products <u_i, r> with a server reference vector, or None.
    reference_sq_norm:
        ||r||^2 when ``reference`` is given.
    """

    client_ids: tuple[int, ...]
    inner: torch.Tensor
    reference: torch.Tensor | None = None
    reference_sq_norm: float | None = None

    def __post_init__(self) -> None:
        n = len(self.client_ids)
        if self.inner.shape != (n, n):
            raise ConfigError(f"Gram matrix shape {tuple(self.inner.shape)} does not match {n} clients")
        if self.reference is not None and self.reference.shape != (n,):
            raise ConfigError("reference inner products must have one entry per client")

    @classmethod
    def from_updates(
        cls,
        updates: torch.Tensor,
        client_ids: Sequence[int] | None = None,
        *,
        reference: torch.Tensor | None = None,
    ) -> Gram:
        """Exact plaintext Gram (float64): one matmul."""
        u = updates.to(torch.float64)
        ids = tuple(range(u.shape[0])) if client_ids is None else tuple(int(c) for c in client_ids)
        ref = ref_sq = None
        if reference is not None:
            r = reference.to(torch.float64)
            ref = u @ r
            ref_sq = float(r @ r)
        return cls(ids, u @ u.T, ref, ref_sq)

    @property
    def n(self) -> int:
        return len(self.client_ids)

    @property
    def sq_norms(self) -> torch.Tensor:
        return torch.diagonal(self.inner).clamp_min(0)

    @property
    def norms(self) -> torch.Tensor:
        return self.sq_norms.sqrt()

    def sq_distances(self) -> torch.Tensor:
        """||u_i - u_j||^2 = ||u_i||^2 + ||u_j||^2 - 2<u_i, u_j>, clamped at 0."""
        d = self.sq_norms
        out = d[:, None] + d[None, :] - 2 * self.inner
        out.fill_diagonal_(0)
        return out.clamp_min(0)

    def cosine(self) -> torch.Tensor:
        nrm = self.norms.clamp_min(1e-12)
        return (self.inner / (nrm[:, None] * nrm[None, :])).clamp(-1, 1)

    def reference_cosine(self) -> torch.Tensor:
        if self.reference is None or self.reference_sq_norm is None:
            raise ConfigError("this Gram carries no reference inner products")
        rn = max(self.reference_sq_norm, 1e-24) ** 0.5
        return (self.reference / (self.norms.clamp_min(1e-12) * rn)).clamp(-1, 1)

    def subset(self, keep: Sequence[int]) -> Gram:
        """The Gram restricted to rows/columns ``keep`` (positions, not client ids)."""
        idx = torch.as_tensor(list(keep), dtype=torch.long)
        ref = None if self.reference is None else self.reference[idx]
        return Gram(
            tuple(self.client_ids[i] for i in keep), self.inner[idx][:, idx], ref, self.reference_sq_norm
        )
