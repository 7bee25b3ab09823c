"""Shared vectorised kernels for the robust rules: Gram matrices, mixing, coordinate chunks.

Every kernel works column block by column block so that a float64 working copy never holds
more than ``chunk`` columns of an ``[n, d]`` update matrix: ``n = 100, d = 10**6`` float32
updates (400 MB) are never duplicated in float64 (800 MB).  All pairwise geometry comes from
one Gram matmul; no kernel loops over pairs of clients in Python.

Speed (issue 15): each block is converted to float64 once and centred *in place* on that
private copy; raw row norms come from the centred Gram's diagonal plus two small products
with the block mean instead of another pass over the block.  Coordinate-wise rules sort the
transposed block row by row (``sorted_columns``): on CPU with numpy's vectorised sort of
contiguous rows, which is several times faster than ``torch.sort`` along ``dim=0`` for the
short columns (``n`` clients) these rules see; on other devices with ``torch.sort``.  The
arithmetic after the sort is the same torch code on every device.  ``float32_sq_distances``
is the one kernel that stays in float32: it returns a rigorous entrywise error bound with its
distances, and its callers use them only where the bound proves their decision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

__all__ = [
    "DEFAULT_CHUNK",
    "column_blocks",
    "gram_matrix",
    "stable_gram",
    "sq_distances_from_gram",
    "mix",
    "row_norms",
    "coordinatewise",
    "map_blocks",
    "sorted_columns",
    "SORT_CHUNK",
    "FAST_GRAM_CHUNK",
    "ieee_float32_matmul",
    "float32_sq_distances",
    "sq_distances_with_bound",
    "medoid",
    "tie_duplicates",
    "duplicate_representatives",
    "remap_rows",
]

#: Columns per block: 65,536 columns x 100 rows x 8 bytes = 52 MB of float64 scratch.
DEFAULT_CHUNK = 1 << 16

#: Columns per block of the coordinate-wise kernels: a transposed, sorted block of 100 rows
#: (3.2 MB in float64) stays in the last-level cache between the sort and the reductions.
SORT_CHUNK = 1 << 12

_NUMPY_SORTABLE = (torch.float16, torch.float32, torch.float64)


def column_blocks(d: int, chunk: int = DEFAULT_CHUNK) -> Iterator[slice]:
    """Consecutive column slices of width at most ``chunk`` covering ``range(d)``."""
    for start in range(0, d, chunk):
        yield slice(start, min(start + chunk, d))


def _centred_block(
    x: torch.Tensor, s: slice, vec: torch.Tensor | None, center: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Columns ``s`` of ``x`` as a private float64 copy, translated in place; and the shift used."""
    xc = x[:, s].to(torch.float64, copy=True)
    if vec is not None:
        shift = vec[s]
    elif center:
        shift = xc.mean(dim=0)
    else:
        return xc, None
    xc.sub_(shift)  # in place: the block is our own copy, never a view of x
    return xc, shift


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
    def block(s: slice) -> torch.Tensor:
        xc, _ = _centred_block(x, s, vec, bool(center) if vec is None else False)
        return xc @ xc.T

    for part in map_blocks(d, block, chunk=chunk, device=x.device):
        g += part
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
    cross = torch.zeros(n, dtype=torch.float64, device=x.device)
    shift_sq = torch.zeros((), dtype=torch.float64, device=x.device)
    def block(s: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xc, m = _centred_block(x, s, None, True)
        assert m is not None
        # ||x_i||^2 over the block = ||xc_i||^2 + 2 <xc_i, m> + ||m||^2 (no second pass)
        return xc @ xc.T, xc @ m, m @ m

    for gb, cb, mb in map_blocks(d, block, chunk=chunk, device=x.device):  # one pass
        g += gb
        cross += cb
        shift_sq += mb
    sq = (torch.diagonal(g) + 2 * cross + shift_sq).clamp_min(0)
    norms = sq.sqrt()
    if float(norms.max()) <= _SCALE_GAP * max(float(norms.median()), 1e-300):
        return g
    previous = -1
    for _ in range(max_passes):
        mid = medoid(sq_distances_from_gram(g))
        if mid == previous:
            break
        previous = mid
        g = gram_matrix(x, center=x[mid], chunk=chunk)
    return g


def medoid(sq: torch.Tensor) -> int:
    """The row with the smallest median squared distance to the rows (an honest one when they are a majority)."""
    return int(torch.argmin(sq.median(dim=1).values))


#: Columns per float32 block of ``float32_sq_distances``: its error bound grows with the block
#: width (``gamma_b``), its speed drops below about a thousand columns per product.
FAST_GRAM_CHUNK = 1 << 10

_UNIT_ROUNDOFF_32 = 2.0**-24
_UNIT_ROUNDOFF_64 = 2.0**-53


def _unset_or_ieee(backend: object) -> bool:
    return getattr(backend, "fp32_precision", "none") in ("none", "ieee")


def ieee_float32_matmul(device: torch.device | str) -> bool:
    """Whether float32 matrix products on ``device`` are IEEE single precision right now.

    A user may let torch trade precision for speed (TF32 on CUDA, bfloat16 through oneDNN
    on CPU, ``torch.set_float32_matmul_precision``); the error bound of
    ``float32_sq_distances`` holds only for IEEE products, so it declines otherwise.
    Devices other than CPU and CUDA are not vouched for.
    """
    kind = torch.device(device).type
    if torch.get_float32_matmul_precision() != "highest" or not _unset_or_ieee(torch.backends):
        return False
    if kind == "cpu":
        return _unset_or_ieee(getattr(torch.backends.mkldnn, "matmul", None))
    if kind == "cuda":
        return not torch.backends.cuda.matmul.allow_tf32 and _unset_or_ieee(torch.backends.cuda.matmul)
    return False


def float32_sq_distances(
    x: torch.Tensor, *, chunk: int = FAST_GRAM_CHUNK
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Squared pairwise distances of float32 rows from float32 products, with a rigorous error bound.

    Returns ``(sq, err)``, both ``[n, n]`` float64: ``|sq_ij - ||x_i - x_j||^2| <= err_ij``
    for the exact (real-number) distances; or ``None`` when the bound cannot be given (x is
    not float32, the products are not IEEE float32 (``ieee_float32_matmul``), or a square
    overflowed).  Callers decide from ``sq`` only when ``err`` cannot change the decision,
    and otherwise fall back on the float64 ``stable_gram`` (issue 15: a float32 product
    costs a third of a float64 one and needs no float64 copy of the updates).

    How: each block of ``b <= chunk`` columns is shifted by its float32 column mean
    (``xc = fl(x - m)``, rounding error at most ``u |xc|`` per entry, ``u = 2**-24``), its
    ``[n, n]`` Gram is one float32 product, and the blocks are summed in float64.  Any
    summation order of a length-``b`` dot product is within ``gamma_b = b u / (1 - b u)``
    of ``sum |a_k c_k|`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd
    ed., section 3.1), and ``sum |a_k c_k| <= ||a|| ||c||`` over each block and over all
    blocks (Cauchy-Schwarz), so with ``s_ij = ||xc_i|| + ||xc_j||`` the product error of
    ``sq_ij = g_ii + g_jj - 2 g_ij`` is at most ``gamma_b s_ij^2`` plus the float64 sums;
    the shift's rounding moves ``||xc_i - xc_j||`` by at most ``delta_ij = u s_ij``, hence
    ``sq_ij`` by at most ``2 delta_ij sqrt(sq_ij + e) + delta_ij^2``.  Every term is
    inflated by 1 % to cover the norms being themselves computed.
    """
    n, d = x.shape
    if x.dtype != torch.float32 or not ieee_float32_matmul(x.device) or d == 0:
        return None
    width = min(int(chunk), d)

    def block(s: slice) -> torch.Tensor:
        xb = x[:, s]
        xc = xb - xb.mean(dim=0)
        return (xc @ xc.T).to(torch.float64)

    g = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    parts = map_blocks(d, block, chunk=width, device=x.device)
    for part in parts:
        g += part
    if not bool(torch.isfinite(g).all()):
        return None
    return sq_distances_with_bound(g, width=width, blocks=len(parts), unit_roundoff=_UNIT_ROUNDOFF_32)


def sq_distances_with_bound(
    g: torch.Tensor, *, width: int, blocks: int, unit_roundoff: float = _UNIT_ROUNDOFF_64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances from a shifted Gram and an entrywise bound on their error.

    ``g`` holds the inner products of the rows after one shift (any vector, rounded once
    per entry, ``unit_roundoff`` ``u``), computed as dot products of length ``<= width``
    in precision ``u`` and summed over ``blocks`` blocks in float64: the bound of
    ``float32_sq_distances`` (which calls this with ``u = 2**-24``); ``stable_gram`` and
    ``gram_matrix`` blocks are float64 (``u = 2**-53``, the default).
    """
    gamma = width * unit_roundoff / (1 - width * unit_roundoff)
    norms = (torch.diagonal(g).clamp_min(0) * (1 + 2 * gamma)).sqrt()
    s2 = (norms[:, None] + norms[None, :]).square()
    sq = sq_distances_from_gram(g)
    err = 1.01 * (gamma + (blocks + 4) * _UNIT_ROUNDOFF_64) * s2
    delta_sq = (1.01 * unit_roundoff) ** 2 * s2
    err = err + 2 * (delta_sq * (sq + err)).sqrt() + delta_sq
    err.fill_diagonal_(0)
    return sq, err


def duplicate_representatives(sq: torch.Tensor, x: torch.Tensor, slack: torch.Tensor) -> torch.Tensor | None:
    """For each row the first row identical to it (itself if none); None when no two rows are equal.

    Candidates are the pairs whose ``sq`` is within ``slack`` (``[n, n]``: what rounding can
    leave of a zero distance); each is confirmed entrywise, a short prefix first so that a
    candidate that differs costs almost nothing, and only while its second row is not yet
    known to be a copy.
    """
    n = sq.shape[0]
    if n < 2:
        return None
    pairs = (sq <= slack).triu(diagonal=1).nonzero().tolist()
    rep = list(range(n))
    for i, j in pairs:  # i < j in row-major order: the first copy becomes the representative
        if rep[j] != j:
            continue
        r = rep[i]
        if torch.equal(x[r, :64], x[j, :64]) and torch.equal(x[r], x[j]):
            rep[j] = r
    if all(r == k for k, r in enumerate(rep)):
        return None
    return torch.tensor(rep, dtype=torch.long, device=sq.device)


def tie_duplicates(sq: torch.Tensor, x: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """``sq`` with identical updates given bitwise identical distance rows (a new matrix).

    Colluding clients often send one vector many times (ALIE, IPM).  Their exact distances
    to everyone are equal, so a rule that ranks them must see exact ties (then broken by
    client id), but a Gram-derived ``sq`` rounds each copy's row differently.  Each copy
    takes the row and column of the first copy (``duplicate_representatives``); copies are
    at distance 0 from each other.  A bound matrix that goes with ``sq`` must be remapped
    the same way (``remap_rows``).
    """
    idx = duplicate_representatives(sq, x, slack)
    return sq if idx is None else remap_rows(sq, idx)


def remap_rows(m: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``m[idx][:, idx]`` with a zero diagonal (a new matrix)."""
    out = m[idx][:, idx].clone()
    out.fill_diagonal_(0)
    return out


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

    def block(s: slice) -> None:
        out[:, s] = m64 @ x[:, s].to(torch.float64)

    map_blocks(x.shape[1], block, chunk=chunk, device=x.device)
    return out


def row_norms(x: torch.Tensor, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Euclidean norm of each row, accumulated in float64 (no overflow for float32 rows)."""
    acc = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)

    def block(s: slice) -> torch.Tensor:
        return torch.linalg.vector_norm(x[:, s].to(torch.float64), dim=1).square()

    for part in map_blocks(x.shape[1], block, chunk=chunk, device=x.device):
        acc += part
    return acc.sqrt()


def map_blocks(
    d: int, fn: Callable[[slice], T], *, chunk: int = DEFAULT_CHUNK, device: torch.device | str = "cpu",
    workers: int | None = None,
) -> list[T]:
    """``[fn(s) for s in column_blocks(d, chunk)]``, on CPU shared among ``workers`` threads.

    ``workers`` defaults to ``torch.get_num_threads()`` (the cores torch itself may use).  The
    per-block work (dtype copies, sorts, small matmuls) releases the GIL, and running it in
    pool threads also avoids an intra-op thread barrier per small operation, which costs
    most on a loaded machine.  Results come back in block order, so whatever combines them
    sums in the same order for any number of workers: sorts and elementwise work give
    bitwise identical results; a BLAS product inside a block may round differently with
    the thread it runs on (last-bit differences only).
    """
    blocks = list(column_blocks(d, chunk))
    n_workers = torch.get_num_threads() if workers is None else max(int(workers), 1)
    if torch.device(device).type != "cpu" or n_workers == 1 or len(blocks) < 2:
        return [fn(s) for s in blocks]
    with ThreadPoolExecutor(max_workers=min(n_workers, len(blocks))) as pool:
        return list(pool.map(fn, blocks))


def coordinatewise(
    x: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk: int = DEFAULT_CHUNK,
    workers: int | None = None,
) -> torch.Tensor:
    """Apply a column-wise reduction ``fn([n, c]) -> [c]`` block by block; result in x's dtype."""
    out = torch.empty(x.shape[1], dtype=x.dtype, device=x.device)

    def run(s: slice) -> None:
        out[s] = fn(x[:, s]).to(x.dtype)

    map_blocks(x.shape[1], run, chunk=chunk, device=x.device, workers=workers)
    return out


def sorted_columns(xb: torch.Tensor) -> torch.Tensor:
    """``[c, n]``: column ``j`` of the ``[n, c]`` block ``xb``, sorted ascending, as row ``j``.

    On CPU (float16/32/64) the transposed block is sorted in place by numpy, whose
    vectorised sort of short contiguous rows is the fastest sort available there; elsewhere
    ``torch.sort``.  Only values are returned, so the choice cannot change a result.
    """
    if xb.device.type == "cpu" and xb.dtype in _NUMPY_SORTABLE and not xb.requires_grad:
        rows = xb.T.contiguous()
        rows.numpy().sort(axis=1)
        return rows
    return torch.sort(xb.T, dim=1).values
