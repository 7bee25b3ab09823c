"""Geometric rules: GeometricMedian (smoothed Weiszfeld, RFA) and CenteredClipping.

The geometric median is computed entirely in the span of the updates: the estimate is
``z = sum_i alpha_i u_i`` and every distance ``||z - u_i||`` follows from the Gram matrix,
so it also runs on a CKKS Gram (the key holder never sees an update) and returns the
coefficients ``alpha``.  Centered clipping keeps a center across rounds, which is not in the
span of the round's updates: it needs coordinates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from securefml.defenses.base import AggregationResult, Defense
from securefml.defenses.distance import combine
from securefml.defenses.linalg import DEFAULT_CHUNK, column_blocks, map_blocks, stable_gram
from securefml.defenses.registry import DEFENSES
from securefml.errors import ConfigError
from securefml.gram import Gram
from securefml.reveals import Reveals
from securefml.updates import LayerLayout

__all__ = [
    "geometric_median_coefficients",
    "CCLIP_CHUNK",
    "center_distances",
    "centered_clipping_step",
    "GeometricMedian",
    "CenteredClipping",
]


def geometric_median_coefficients(
    gram: torch.Tensor,
    weights: torch.Tensor,
    *,
    nu: float = 1e-6,
    tol: float = 1e-8,
    max_iter: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Smoothed Weiszfeld iterations on a Gram matrix (Pillutla et al., Algorithm 2).

    Minimises ``sum_i w_i * max(nu, ||z - u_i||)`` over ``z = sum_i alpha_i u_i``.  Each step
    sets ``alpha_i`` proportional to ``w_i / max(nu, ||z - u_i||)``; the loop stops when a
    step moves ``z`` by less than ``tol`` times the median distance from ``z`` to the updates
    (a scale set by the majority, unlike the objective, which far outliers dominate), or
    after ``max_iter`` steps.

    Returns
    -------
    alpha, distances, iterations, converged
        ``alpha`` sums to 1; ``distances`` are ``||z - u_i||`` at the returned ``z``.
    """
    g = gram.to(torch.float64)
    w = weights.to(device=g.device, dtype=torch.float64)
    w = w / w.sum()
    diag = torch.diagonal(g)

    def dists(a: torch.Tensor) -> torch.Tensor:
        ga = g @ a
        return (a @ ga - 2 * ga + diag).clamp_min(0).sqrt()

    alpha = w.clone()
    d = dists(alpha)
    for it in range(1, max_iter + 1):
        beta = w / d.clamp_min(nu)
        new = beta / beta.sum()
        delta = new - alpha
        step = float((delta @ g @ delta).clamp_min(0).sqrt())
        alpha = new
        d = dists(alpha)
        # stop on the step length relative to the median distance (robust to far outliers,
        # which would dominate a relative change of the objective); never on the first step,
        # whose length from the plain mean can be lost to cancellation when outliers are huge
        if it > 1 and step <= tol * max(float(d.median()), nu):
            return alpha, d, it, True
    return alpha, d, max_iter, False


#: Columns per block of the centered-clipping passes: 100 float32 rows of 8,192 columns
#: (3.2 MB) stay in cache between forming ``u_i - v`` and reducing it.
CCLIP_CHUNK = 1 << 13

_LOW_DTYPES = (torch.float32, torch.float64)


def _split_center(center: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``center`` rounded to ``dtype`` and the float64 remainder (exact), or None if it overflows."""
    low = center.to(dtype)
    if not bool(torch.isfinite(low).all()):
        return None
    return low, center.to(torch.float64) - low.to(torch.float64)


def center_distances(x: torch.Tensor, center: torch.Tensor, *, chunk: int = CCLIP_CHUNK) -> torch.Tensor:
    """``||u_i - center||`` as float64, from differences formed in x's dtype block by block.

    Each cache-sized block of ``u_i - v`` is formed once in x's dtype (float32 rows never
    get a float64 copy), squared in place and summed along its rows in x's dtype; the block
    sums are added in float64.  A sum of ``b`` non-negative terms is within
    ``gamma_b`` of itself (Higham, 2nd ed., section 3.1), so each squared distance is within
    a relative ``gamma_b + u`` (``b = chunk``), each distance within half that.  Rows whose
    squares overflow or underflow x's dtype (where that relative bound fails), and rows of
    other dtypes, are measured in float64.
    """
    n, d = x.shape
    split = _split_center(center, x.dtype) if x.dtype in _LOW_DTYPES else None
    if split is None:
        return _float64_distances(x, center, chunk)
    low, _ = split

    def block(s: slice) -> torch.Tensor:
        diff = x[:, s] - low[s]  # our own copy: squared in place
        return diff.square_().sum(dim=1).to(torch.float64)

    sq = torch.zeros(n, dtype=torch.float64, device=x.device)
    for part in map_blocks(d, block, chunk=chunk, device=x.device):
        sq += part
    info = torch.finfo(x.dtype)
    # below d * tiny / eps the squares lost to underflow may exceed one rounding error
    bad = ~torch.isfinite(sq) | (sq < d * info.tiny / info.eps)
    dist = sq.sqrt()
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        dist[rows] = _float64_distances(x[rows], center, chunk)
    return dist


def _float64_distances(x: torch.Tensor, center: torch.Tensor, chunk: int) -> torch.Tensor:
    sq = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    c64 = center.to(device=x.device, dtype=torch.float64)
    for s in column_blocks(x.shape[1], chunk):
        sq += (x[:, s].to(torch.float64) - c64[s]).square().sum(dim=1)
    return sq.sqrt()


def centered_clipping_step(
    x: torch.Tensor,
    center: torch.Tensor,
    tau: float,
    *,
    chunk: int = CCLIP_CHUNK,
    distances: torch.Tensor | None = None,
) -> torch.Tensor:
    """One centered-clipping iteration: ``v + (1/n) sum_i clip_tau(u_i - v)``, as a float64 center.

    ``distances`` (``center_distances(x, center)``) may be passed when the caller already
    has them; the step then reads the updates once.

    Speed and accuracy (issue 15): with ``c_i = min(1, tau / ||u_i - v||) / n`` the step is
    ``v + sum_i c_i (u_i - v)``.  The differences are formed block by block in x's dtype
    against ``v`` rounded to that dtype (``v_low``), and ``sum_i c_i (u_i - v_low)`` is one
    ``gemv`` per cache-sized block; the rounding of ``v`` is put back exactly, in float64
    (``- (v - v_low) sum_i c_i``).  Each output coordinate is then within
    ``((n + 3) u + 1.01 gamma_b) sum_i c_i |u_ij - v_j|`` of the exact step, ``u`` the
    unit roundoff of x's dtype and ``b = chunk`` (one rounding of each difference, of each
    coefficient, ``gamma_n`` for the product; Higham, 2nd ed., section 3.1; ``gamma_b``:
    the distances of ``center_distances``, hence the clip factors, and a data-driven
    ``tau`` taken from them, are relatively that close), plus ``n`` times the smallest
    subnormal where products underflow: an error relative to the clipped move, not to the
    size of the updates.  The test suite checks that bound.  A difference that overflows x's dtype, a
    coefficient below its smallest normal number, and other dtypes take the float64 path.
    """
    n, d = x.shape
    split = _split_center(center, x.dtype) if x.dtype in _LOW_DTYPES else None
    dist = center_distances(x, center, chunk=chunk) if distances is None else distances
    scale = torch.where(dist > tau, tau / dist.clamp_min(1e-300), torch.ones_like(dist))
    c = scale / n
    if split is None or bool(((c > 0) & (c < torch.finfo(x.dtype).tiny)).any()):
        return _float64_step(x, center, c, chunk)  # other dtypes; a coefficient x's dtype cannot hold
    low, rest = split
    coeff = c.to(device=x.device, dtype=x.dtype)
    out = torch.empty(d, dtype=torch.float64, device=x.device)

    def block(s: slice) -> None:
        out[s] = (coeff @ (x[:, s] - low[s])).to(torch.float64)

    map_blocks(d, block, chunk=chunk, device=x.device)
    if not bool(torch.isfinite(out).all()):  # a difference overflowed x's dtype
        return _float64_step(x, center, c, chunk)
    return out.add_(center.to(torch.float64)).sub_(rest * c.sum())


def _float64_step(x: torch.Tensor, center: torch.Tensor, c: torch.Tensor, chunk: int) -> torch.Tensor:
    """The step with every difference in float64 (the reference; other dtypes, overflow)."""
    c64 = center.to(device=x.device, dtype=torch.float64)
    return c64 * (1 - c.sum()) + combine(c, x, dtype=torch.float64)


@DEFENSES.register("geomed")
class GeometricMedian(Defense):
    """Geometric median by the smoothed Weiszfeld algorithm (RFA, Pillutla et al. 2022).

    Minimises the weighted sum of (smoothed) Euclidean distances to the updates.  Unlike
    implementations that stop after a fixed 3 iterations (ByzFL's default), it runs until
    a step moves the estimate by less than ``tol`` times the median distance to the updates
    (at most ``max_iter`` steps);
    ``info`` reports the iterations and whether it converged.

    Threat model: a Byzantine minority (breakdown point 1/2 of the total weight): with
    less than half the weight, the output stays within a bounded distance of the honest
    updates whatever the Byzantine vectors are.  Client weights are honoured as in RFA; a
    deployment that cannot trust claimed weights should pass equal weights.  Only geometry
    is needed, so it also runs on a CKKS Gram matrix and returns the coefficients.

    References
    ----------
    K. Pillutla, S. M. Kakade, Z. Harchaoui. Robust Aggregation for Federated Learning.
    IEEE Transactions on Signal Processing, 2022.
    """

    name = "geomed"
    runs_on = frozenset({Reveals.UPDATES, Reveals.GRAM, Reveals.BUCKETS})

    def __init__(
        self, *, nu: float = 1e-6, tol: float = 1e-8, max_iter: int = 1000, chunk: int = DEFAULT_CHUNK
    ) -> None:
        if not nu > 0 or not tol > 0 or int(max_iter) < 1:
            raise ConfigError(f"GeometricMedian needs nu > 0, tol > 0, max_iter >= 1; got {nu}, {tol}, {max_iter}")
        self.nu = float(nu)
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.chunk = int(chunk)

    def _run(self, g: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        alpha, d, it, ok = geometric_median_coefficients(
            g, weights, nu=self.nu, tol=self.tol, max_iter=self.max_iter
        )
        return alpha, d, {"iterations": it, "converged": ok}

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        alpha, d, info = self._run(stable_gram(updates, chunk=self.chunk), weights)
        return AggregationResult(combine(alpha, updates), client_ids, weights=alpha, scores=d, info=info)

    def decide_gram(self, gram: Gram, weights: torch.Tensor, *, context: Mapping[str, Any]) -> AggregationResult:
        alpha, d, info = self._run(gram.inner, weights)
        return AggregationResult(None, gram.client_ids, weights=alpha, scores=d, info=info)


@DEFENSES.register("cclip", positional="tau")
class CenteredClipping(Defense):
    """Centered clipping (Karimireddy et al., ICML 2021), with its center kept across rounds.

    Starting from the previous round's output ``v`` (zeros in the first round), it iterates
    ``v <- v + (1/n) sum_i clip_tau(u_i - v)`` ``iterations`` times, where ``clip_tau``
    scales a vector down to norm ``tau``.  The center is explicit state: ``state_dict()`` /
    ``load_state_dict()`` save and restore it, and nothing else is hidden between calls.

    ``tau=None`` (the default) is data-driven: each round it is the median distance of the
    round's updates to the center, so about half of them are clipped whatever the scale of
    the updates (a fixed constant either clips everything or, far more often, nothing: then
    the rule *is* the mean, and it warns once when a round clipped nothing).

    Partial-layer uploads: when the context names the uploaded ``layers`` and the full
    ``layout`` (the server does this), the center is kept per layer over the whole model and
    only the uploaded layers' part of it is used and moved; a layer not uploaded this round
    keeps its center.  Without that context, a change of dimension between rounds is refused
    with a ``ConfigError``.

    Speed: two passes over cache-sized blocks of ``u_i - v`` per iteration (blocks of
    ``min(chunk, CCLIP_CHUNK)`` columns; see ``centered_clipping_step`` for the error bound).

    Threat model: a Byzantine fraction below about 10-15 % with worker momentum (paper,
    Thm. III); each Byzantine client moves the center by at most ``tau / n`` per iteration.
    Needs coordinates (the center is not in the span of the round's updates).  Uniform
    client weights, as in the paper.

    References
    ----------
    S. P. Karimireddy, L. He, M. Jaggi. Learning from History for Byzantine Robust
    Optimization. ICML 2021.
    """

    name = "cclip"
    runs_on = frozenset({Reveals.UPDATES, Reveals.BUCKETS})

    def __init__(self, *, tau: float | None = None, iterations: int = 1, chunk: int = DEFAULT_CHUNK) -> None:
        if tau is not None and not (isinstance(tau, (int, float)) and 0 < tau < float("inf")):
            raise ConfigError(f"tau (the clipping radius) must be positive and finite or None, got {tau!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(f"iterations must be a positive integer, got {iterations!r}")
        self.tau = None if tau is None else float(tau)
        self.iterations = iterations
        self.chunk = int(chunk)
        self._center: torch.Tensor | None = None

    def _start(self, updates: torch.Tensor, context: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The center for the uploaded coordinates, and the full-model mask they occupy (or None)."""
        d = updates.shape[1]
        layout, layers = context.get("layout"), context.get("layers")
        if isinstance(layout, LayerLayout) and layers is not None and layout.numel_of(layers) == d:
            if self._center is None or self._center.numel() != layout.numel:
                if self._center is not None and self._center.numel() != d:
                    raise ConfigError(
                        f"CenteredClipping center has {self._center.numel()} entries, neither the model's "
                        f"{layout.numel} nor the upload's {d}"
                    )
                full = torch.zeros(layout.numel, dtype=torch.float64)
                if self._center is not None:  # a center kept for exactly these layers
                    full[layout.mask(layers)] = self._center.cpu()
                self._center = full
            mask = layout.mask(layers)
            return self._center[mask].to(updates.device), mask
        if self._center is None:
            return torch.zeros(d, dtype=torch.float64, device=updates.device), None
        if self._center.numel() != d:
            raise ConfigError(
                f"CenteredClipping center has {self._center.numel()} entries, updates have {d}: the uploaded "
                "layers changed between rounds; pass context['layout'] and context['layers'] (the server does) "
                "for a per-layer center, or keep a fixed layer set"
            )
        return self._center.to(updates.device), None

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        v, mask = self._start(updates, context)
        block = min(self.chunk, CCLIP_CHUNK)  # cache-sized blocks; ``chunk`` may ask for smaller ones
        taus, clipped = [], 0
        for _ in range(self.iterations):
            dist = center_distances(updates, v, chunk=block)
            tau = float(dist.median()) if self.tau is None else self.tau
            tau = max(tau, 1e-300)
            clipped += int((dist > tau).sum())
            taus.append(tau)
            v = centered_clipping_step(updates, v, tau, chunk=block, distances=dist)
        if clipped == 0 and updates.shape[0] > 1:
            self.warn_if_mean(updates.shape[0], context, reason=f"tau={taus[0]:.4g} clipped no update this round")
        if mask is None:
            self._center = v
        else:
            assert self._center is not None
            self._center[mask] = v.cpu()
        return AggregationResult(v.to(updates.dtype), client_ids, info={"tau": taus[-1], "clipped": clipped})

    def state_dict(self) -> dict[str, Any]:
        return {"center": None if self._center is None else self._center.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        center = state.get("center")
        if center is not None and (not isinstance(center, torch.Tensor) or center.dim() != 1):
            raise ConfigError("CenteredClipping state 'center' must be a 1-D tensor or None")
        self._center = None if center is None else center.to(torch.float64).clone()
