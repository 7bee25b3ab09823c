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
    "stable_gram",
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


def gram_matrix(
    x: torch.Tensor, *, center: bool | torch.Tensor = False, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """``[n, n]`` float64 inner products of the rows of ``x`` (one blocked matmul).

    Parameters
    ----------
    x:
        ``[n, d]`` updates, any floating dtype, any device.
    center:
        ``True`` subtracts the coordinate-wise mean first; a ``[d]`` tensor subtracts that
        vector.  Pairwise distances (and any combination whose coefficients sum to 1) are
        translation invariant, so a centred Gram gives the same geometry with far less
        cancellation in ``||a||^2 + ||b||^2 - 2<a, b>`` when the rows share a large component.
    """
    n, d = x.shape
    g = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    vec = center if isinstance(center, torch.Tensor) else None
    if vec is not None:
        vec = vec.to(device=x.device, dtype=torch.float64).reshape(-1)
    for s in column_blocks(d, chunk):
        xc = x[:, s].to(torch.float64)
        if vec is not None:
            xc = xc - vec[s]
        elif center:
            xc = xc - xc.mean(dim=0, keepdim=True)
        g.addmm_(xc, xc.T)
    return g


#: Recentre on a medoid when the largest row norm exceeds the median row norm by this factor.
_SCALE_GAP = 1e3


def stable_gram(x: torch.Tensor, *, chunk: int = DEFAULT_CHUNK, max_passes: int = 8) -> torch.Tensor:
    """A translated Gram of ``x`` whose pairwise distances survive rows of wildly different scale.

    One mean-centred matmul in the common case.  A Byzantine row of norm 1e30 would swamp
    that centre and, through cancellation in ``||a||^2 + ||b||^2 - 2<a, b>``, hide the
    distances between the honest rows (and a second Byzantine row of norm 1e15 among them).
    So when the largest row norm exceeds the median one by ``1e3``, the Gram is recomputed
    centred on the medoid row (smallest median distance to the others: an honest row when
    honest rows are a majority) until the medoid no longer changes.  Only distances and
    affine combinations (coefficients summing to 1) may be read from the result.
    """
    n, d = x.shape
    g = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    sq = torch.zeros(n, dtype=torch.float64, device=x.device)
    for s in column_blocks(d, chunk):  # mean-centred Gram and raw row norms in one pass
        xc = x[:, s].to(torch.float64)
        sq += xc.square().sum(dim=1)
        xc = xc - xc.mean(dim=0, keepdim=True)  # never in place: x[:, s] may be a view of x
        g.addmm_(xc, xc.T)
    norms = sq.sqrt()
    if float(norms.max()) <= _SCALE_GAP * max(float(norms.median()), 1e-300):
        return g
    previous = -1
    for _ in range(max_passes):
        medoid = int(torch.argmin(sq_distances_from_gram(g).median(dim=1).values))
        if medoid == previous:
            break
        previous = medoid
        g = gram_matrix(x, center=x[medoid], chunk=chunk)
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
