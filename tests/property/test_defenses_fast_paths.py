"""Every optimised defense kernel equals a straightforward implementation (issue 15).

The references below are written for clarity, column by column or row by row in float64,
with no blocking, no threads and no sort tricks; hypothesis drives shapes, magnitudes and
heavy duplication (ties) in the inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securefml.defenses import Bulyan, CenteredClipping, CoordinateMedian, Meamed, Mean, TrimmedMean, linalg
from securefml.defenses.coordinate import coordinate_median, meamed, mean_around_median, trimmed_mean
from securefml.defenses.geometric import center_distances, centered_clipping_step
from securefml.defenses.linalg import gram_matrix, row_norms, sorted_columns, sq_distances_from_gram, stable_gram
from securefml.defenses.mean import MEAN_ERROR_FACTOR, weighted_mean

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ref_median(col: list[float]) -> float:
    v = sorted(col)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def ref_around_median(col: list[float], keep: int) -> float:
    """The ``keep`` values nearest the median; values tied at the boundary share the places left."""
    med = ref_median(col)
    dev = [abs(v - med) for v in col]
    r = sorted(dev)[keep - 1]
    nearer = [v for v, e in zip(col, dev) if e < r]
    tied = [v for v, e in zip(col, dev) if e == r]
    return (sum(nearer) + (keep - len(nearer)) * sum(tied) / len(tied)) / keep


def ref_trimmed(col: list[float], f: int) -> float:
    v = sorted(col)
    mid = v[f : len(v) - f]
    return sum(mid) / len(mid)


def columns(x: torch.Tensor) -> list[list[float]]:
    return x.double().T.tolist()


@st.composite
def matrices(draw: st.DrawFn, *, min_rows: int = 1, max_rows: int = 12, max_cols: int = 40) -> torch.Tensor:
    """Small-integer-and-half grids (exact in float32 arithmetic, heavy ties) or wide floats."""
    n = draw(st.integers(min_rows, max_rows))
    d = draw(st.integers(1, max_cols))
    if draw(st.booleans()):
        vals = st.sampled_from([-3.0, -1.5, -1.0, 0.0, 0.5, 1.0, 2.0, 5.0])
    else:
        vals = st.floats(-1e6, 1e6, allow_nan=False, width=32)
    data = draw(st.lists(vals, min_size=n * d, max_size=n * d))
    return torch.tensor(data, dtype=torch.float32).reshape(n, d)


def test_meamed_issue_18_column():
    col = torch.tensor([[-3.0], [-3.0], [-3.0], [0.0], [1.0], [2.0], [5.0]])
    assert float(Meamed(f=2)(col).aggregate[0]) == pytest.approx(-0.6)
    assert float(meamed(col, 2)[0]) == pytest.approx(-0.6)


@SETTINGS
@given(x=matrices(min_rows=3), data=st.data())
def test_mean_around_median_equals_reference_and_ignores_row_order(x, data):
    n = x.shape[0]
    keep = data.draw(st.integers(1, n))
    got = mean_around_median(x, keep, chunk=7).double()
    want = torch.tensor([ref_around_median(c, keep) for c in columns(x)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * (1 + float(x.abs().max())))
    perm = torch.tensor(data.draw(st.permutations(range(n))))
    assert torch.equal(mean_around_median(x[perm], keep, chunk=7), mean_around_median(x, keep, chunk=7))


@SETTINGS
@given(base=st.lists(st.sampled_from([-2.0, 0.0, 1.0, 3.0]), min_size=2, max_size=5),
       copies=st.lists(st.integers(1, 4), min_size=5, max_size=5), data=st.data())
def test_meamed_on_duplicated_values_is_the_mean_of_a_nearest_selection(base, copies, data):
    # duplicated values tie only with copies of themselves (one-sided ties): then every
    # choice of the n - f values nearest the median has the same mean, and Meamed returns it
    col = [v for v, c in zip(base, copies) for _ in range(c)]
    n = len(col)
    med = ref_median(col)
    if any(abs(a - med) == abs(b - med) and a != b for a in col for b in col):
        return  # a two-sided tie: covered by the reference test above
    f = data.draw(st.integers(0, (n - 1) // 2))
    nearest = sorted(col, key=lambda v: abs(v - med))[: n - f]
    x = torch.tensor(col, dtype=torch.float32)[:, None]
    assert float(meamed(x, f)[0]) == pytest.approx(sum(nearest) / (n - f), rel=1e-6, abs=1e-6)


@SETTINGS
@given(x=matrices(min_rows=1), data=st.data())
def test_median_and_trimmed_mean_equal_reference(x, data):
    n = x.shape[0]
    got = coordinate_median(x, chunk=5).double()
    torch.testing.assert_close(got, torch.tensor([ref_median(c) for c in columns(x)], dtype=torch.float64))
    f = data.draw(st.integers(0, (n - 1) // 2))
    want = torch.tensor([ref_trimmed(c, f) for c in columns(x)], dtype=torch.float64)
    scale = 1 + float(x.abs().max())
    torch.testing.assert_close(trimmed_mean(x, f, chunk=5).double(), want, rtol=1e-6, atol=1e-6 * scale)


@SETTINGS
@given(x=matrices(min_rows=3))
def test_torch_sort_path_equals_numpy_sort_path(x):
    # the non-CPU path (torch.sort) is exercised on CPU by disabling the numpy sort
    fast = (coordinate_median(x), trimmed_mean(x, 1), meamed(x, 1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linalg, "_NUMPY_SORTABLE", ())
        slow = (coordinate_median(x), trimmed_mean(x, 1), meamed(x, 1))
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_results_do_not_depend_on_the_number_of_workers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(21, 3000, generator=g)
    x[::4] = torch.round(x[::4])  # ties
    fns = {
        "median": lambda: coordinate_median(x, chunk=256),
        "meamed": lambda: meamed(x, 5, chunk=256),
        "gram": lambda: stable_gram(x, chunk=256),
        "norms": lambda: row_norms(x, chunk=256),
    }
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = {k: fn() for k, fn in fns.items()}
        torch.set_num_threads(3)
        three = {k: fn() for k, fn in fns.items()}
    finally:
        torch.set_num_threads(threads)
    for k in ("median", "meamed"):  # sorts and elementwise arithmetic: bitwise identical
        assert torch.equal(one[k], three[k]), k
    for k in ("gram", "norms"):  # a BLAS may split a product differently per thread: rounding only
        torch.testing.assert_close(one[k], three[k], rtol=1e-12, atol=1e-9)


@SETTINGS
@given(x=matrices(min_rows=2, max_rows=9), center=st.booleans())
def test_gram_kernels_equal_pairwise_reference(x, center):
    x64 = x.double()
    xc = x64 - x64.mean(0) if center else x64
    want = xc @ xc.T
    scale = 1 + float((x64 * x64).sum(1).max())
    torch.testing.assert_close(gram_matrix(x, center=center, chunk=6), want, rtol=1e-9, atol=1e-9 * scale)
    ref_sq = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
    got_sq = sq_distances_from_gram(stable_gram(x, chunk=6))
    torch.testing.assert_close(got_sq, ref_sq, rtol=1e-9, atol=1e-9 * scale)
    torch.testing.assert_close(row_norms(x, chunk=6), x64.norm(dim=1), rtol=1e-12, atol=0.0)


def _cclip_reference(x: torch.Tensor, center: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The step in float64, row by row as the paper writes it; and sum_i c_i |u_i - v| per coordinate."""
    diff = x.double() - center
    c = torch.clamp(tau / diff.norm(dim=1).clamp_min(1e-300), max=1.0) / x.shape[0]
    return center + (c[:, None] * diff).sum(0), (c[:, None] * diff.abs()).sum(0)


@SETTINGS
@given(x=matrices(min_rows=1, max_rows=9), tau=st.floats(0.1, 1e3), chunk=st.sampled_from([5, 4096]),
       scale=st.sampled_from([1.0, 1e-20, 1e30]), data=st.data())
def test_centered_clipping_step_is_within_its_bound(x, tau, chunk, scale, data):
    """``|fast - exact| <= ((n + 3) u + 1.01 gamma_b) sum_i c_i |u_ij - v_j|`` (+ underflow)."""
    n, d = x.shape
    x = x * scale
    center = scale * torch.tensor(data.draw(st.lists(st.floats(-10, 10), min_size=d, max_size=d)),
                                  dtype=torch.float64)
    tau = tau * scale
    want, moved = _cclip_reference(x, center, tau)
    got = centered_clipping_step(x, center, tau, chunk=chunk)
    u = 2.0**-24
    gamma = min(chunk, d) * u / (1 - min(chunk, d) * u)
    bound = ((n + 3) * u + 1.01 * gamma) * moved + n * 2.0**-149 + 1e-12 * (center.abs() + moved)
    assert bool(((got - want).abs() <= bound).all())
    dist = center_distances(x, center, chunk=chunk)
    ref = (x.double() - center).norm(dim=1)
    assert bool(((dist - ref).abs() <= (gamma + 2 * u) * ref + 1e-300).all())
    # float64 rows: the same code in float64, within the float64 bound
    got64 = centered_clipping_step(x.double(), center, tau, chunk=chunk)
    torch.testing.assert_close(got64, want, rtol=1e-9, atol=1e-9 * float(moved.max() + center.abs().max()) + 1e-300)


def test_centered_clipping_overflow_and_tiny_coefficients_take_the_float64_path():
    big = torch.tensor([[3e38, -3e38, 1.0], [1.0, 2.0, 3.0], [-3e38, 3e38, 0.0]])
    center = torch.tensor([-3e38, 3e38, 0.0], dtype=torch.float64)  # differences overflow float32
    want, _ = _cclip_reference(big, center, 1.0)
    got = centered_clipping_step(big, center, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)
    tiny = torch.tensor([[1e-30, 0.0], [0.0, 1e-30], [1e30, 1e30]])  # c_3 below float32's normal range
    zero = torch.zeros(2, dtype=torch.float64)
    want, _ = _cclip_reference(tiny, zero, 1e-35)
    torch.testing.assert_close(centered_clipping_step(tiny, zero, 1e-35), want, rtol=1e-12, atol=0.0)
    outside = torch.full((2,), 1e39, dtype=torch.float64)  # a center float32 cannot hold
    want, _ = _cclip_reference(tiny, outside, 1.0)
    torch.testing.assert_close(centered_clipping_step(tiny, outside, 1.0), want, rtol=1e-12, atol=0.0)


@SETTINGS
@given(x=matrices(min_rows=1, max_rows=40, max_cols=30),
       w=st.lists(st.floats(1e-3, 1e3), min_size=40, max_size=40),
       scale=st.sampled_from([1.0, 1e-30, 1e30]))
def test_mean_is_within_its_float32_error_bound(x, w, scale):
    """``|fast - exact| <= (n + 2) * 2**-24 * sum_i |w_i x_ij|`` coordinate by coordinate."""
    x = x * scale
    n = x.shape[0]
    weights = torch.tensor(w[:n], dtype=torch.float64)
    got = Mean()(x, weights).aggregate
    wn = weights / weights.sum()
    exact = (wn[:, None] * x.double()).sum(0)
    bound = (n + MEAN_ERROR_FACTOR) * 2.0**-24 * (wn[:, None] * x.double()).abs().sum(0)
    assert bool(((got.double() - exact).abs() <= bound + 1e-45).all())
    agg, _ = weighted_mean(x, weights)
    assert torch.equal(agg, got)


def test_mean_fast_path_still_excludes_nonfinite_rows():
    x = torch.ones(5, 4)
    x[2, 1] = float("nan")
    x[4, 0] = float("inf")
    res = Mean()(x, client_ids=[10, 11, 12, 13, 14])
    assert res.flagged == (12, 14)
    torch.testing.assert_close(res.aggregate, torch.ones(4))
    zero_weight = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    res = Mean()(x, zero_weight)  # a zero-weight NaN row: the generic path still finds it
    assert 2 in res.flagged and 4 in res.flagged


def test_rules_on_the_issue_size_agree_with_the_simple_formulas():
    # one larger case through the public classes: blocks of SORT_CHUNK, several workers
    g = torch.Generator().manual_seed(3)
    x = torch.randn(15, 9000, generator=g)
    x[:3] *= -20
    srt = np.sort(x.double().numpy(), axis=0)
    torch.testing.assert_close(CoordinateMedian()(x).aggregate.double(), torch.from_numpy(srt[7]), rtol=0, atol=1e-7)
    torch.testing.assert_close(TrimmedMean(2)(x).aggregate.double(), torch.from_numpy(srt[2:13].mean(0)),
                               rtol=1e-6, atol=1e-6)
    bu = Bulyan(3)(x)
    sel = torch.tensor([x_id for x_id in bu.info["selected"]])
    torch.testing.assert_close(bu.aggregate, mean_around_median(x[sel], len(sel) - 6))
    sc = sorted_columns(x[:, :10])
    assert torch.equal(sc, x[:, :10].T.sort(dim=1).values)
    v = CenteredClipping(tau=5.0)(x).aggregate
    assert v.shape == (9000,) and bool(torch.isfinite(v).all())
