"""Shared vectorised kernels for the robust rules: Gram matrices, mixing, coordinate chunks.

Every kernel works column block by column block so that a float64 working copy never holds
more than ``chunk`` columns of an ``[n, d]`` update matrix: ``n = 100, d = 10**6`` float32
updates (400 MB) are never duplicated in float64 (800 MB).  All pairwise geometry comes from
one Gram matmul; no kernel loops over pairs of clients in Python.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

__all__ = [
    "DEFAULT_CHUNK",
    "column_blocks",
    "gram_matrix",
    "sq_distances_from_gram",
    "mix",
    "row_norms",
    "coordinatewise",
]

#: Columns per block: 65,536 columns x 100 rows x 8 bytes = 52 MB of float64 scratch.
DEFAULT_CHUNK = 1 << 16


def column_blocks(d: int, chunk: int = DEFAULT_CHUNK) -> Iterator[slice]:
    """Consecutive column slices of width at most ``chunk`` covering ``range(d)``."""
    for start in range(0, d, chunk):
        yield slice(start, min(start + chunk, d))


def gram_matrix(x: torch.Tensor, *, center: bool = False, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``[n, n]`` float64 inner products of the rows of ``x`` (one blocked matmul).

    Parameters
    ----------
    x:
        ``[n, d]`` updates, any floating dtype, any device.
    center:
        Subtract the coordinate-wise mean first.  Pairwise distances are translation
        invariant, so a centred Gram gives the same distances with far less cancellation in
        ``||a||^2 + ||b||^2 - 2<a, b>`` when the updates share a large common component.
    """
    n, d = x.shape
    g = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for s in column_blocks(d, chunk):
        xc = x[:, s].to(torch.float64)
        if center:
            xc = xc - xc.mean(dim=0, keepdim=True)
        g.addmm_(xc, xc.T)
    return g


def sq_distances_from_gram(g: torch.Tensor) -> torch.Tensor:
    """``||u_i - u_j||^2`` from a Gram matrix, clamped at 0 with an exact zero diagonal."""
    diag = torch.diagonal(g)
    out = diag[:, None] + diag[None, :] - 2 * g
    out.fill_diagonal_(0)
    return out.clamp_min(0)


def mix(
    m: torch.Tensor, x: torch.Tensor, *, dtype: torch.dtype | None = None, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """``m @ x`` accumulated in float64 block by block, returned in ``dtype`` (default: x's)."""
    k, n = m.shape
    out = torch.empty(k, x.shape[1], dtype=dtype or x.dtype, device=x.device)
    m64 = m.to(device=x.device, dtype=torch.float64)
    for s in column_blocks(x.shape[1], chunk):
        out[:, s] = m64 @ x[:, s].to(torch.float64)
    return out


def row_norms(x: torch.Tensor, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Euclidean norm of each row, accumulated in float64 (no overflow for float32 rows)."""
    acc = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for s in column_blocks(x.shape[1], chunk):
        acc += x[:, s].to(torch.float64).square().sum(dim=1)
    return acc.sqrt()


def coordinatewise(
    x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], *, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Apply a column-wise reduction ``fn([n, c]) -> [c]`` block by block; result in x's dtype."""
    out = torch.empty(x.shape[1], dtype=x.dtype, device=x.device)
    for s in column_blocks(x.shape[1], chunk):
        out[s] = fn(x[:, s]).to(x.dtype)
    return out
