"""Krum and Multi-Krum on float32 distances decide exactly as the straightforward float64 rule (issue 15).

The fast path decides from a float32 blocked Gram only when its proven error bound cannot
move any row across the decision; hypothesis plays the adversary that picks the updates
(clusters, near-ties, exact duplicates, huge rows, every ``f`` from 0 to the largest the
rule allows) to make the two disagree.  The reference below computes every distance
directly in float64 and ranks by score, ties by client id, with no Gram and no bound.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securefml.defenses import Bulyan, Krum, MultiKrum, linalg
from securefml.defenses.distance import certified_order, krum_neighbours, krum_scores, nearest_sums
from securefml.defenses.linalg import float32_sq_distances, ieee_float32_matmul
from securefml.defenses.mean import MEAN_ERROR_FACTOR
from securefml.errors import ConfigError

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ref_sq(x: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    return ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)


def ref_scores(x: torch.Tensor, f: int) -> list[float]:
    sq = ref_sq(x).tolist()
    n = len(sq)
    k = min(max(n - f - 2, 1), n - 1)
    return [sum(sorted(sq[i][j] for j in range(n) if j != i)[:k]) for i in range(n)]


def ref_rank(scores: list[float], ids: list[int]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (scores[i], ids[i]))


def assert_a_valid_cut(picked: list[int], scores: list[float], *, largest: bool = False) -> None:
    """``picked`` are rows with the smallest (``largest``: the biggest) scores, up to exact ties.

    Different rows can tie exactly in real arithmetic (two pairs of duplicates at the same
    distance: each row's score is its copy's 0 plus the same two distances), and then float
    rounding, in the rule and in this reference alike, decides which side of the cut each
    falls: any row whose score equals the cut's to float64 rounding is a correct pick.
    """
    rest = [i for i in range(len(scores)) if i not in picked]
    if not picked or not rest:
        return
    sign = -1.0 if largest else 1.0
    worst_picked = max(sign * scores[i] for i in picked)
    best_rest = min(sign * scores[i] for i in rest)
    tol = 1e-9 * max(abs(v) for v in scores) + 1e-300
    assert worst_picked <= best_rest + tol, (picked, scores)


@st.composite
def krum_inputs(draw: st.DrawFn) -> tuple[torch.Tensor, int, list[int], str]:
    """An adversary's round: honest cluster, Byzantine rows, duplicates, any legal f."""
    f = draw(st.integers(0, 3))
    n = draw(st.integers(2 * f + 3, 2 * f + 9))
    d = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e4]))
    common = draw(st.sampled_from([0.0, 1.0, 1e3]))  # a large shared component: cancellation
    x = common + scale * torch.randn(n, d, generator=g)
    kind = draw(st.sampled_from(["gauss", "duplicates", "grid", "byzantine", "near-tie"]))
    if kind == "duplicates":  # exact ties between rows
        for i in range(1, n, 2):
            x[i] = x[draw(st.integers(0, i - 1))]
    elif kind == "grid":  # small integers: many equal distances
        x = torch.randint(-2, 3, (n, d), generator=g).float()
    elif kind == "byzantine":
        x[n - f :] = draw(st.sampled_from([-5.0, 100.0, 1e8])) * x[n - f :] + draw(st.sampled_from([0.0, 1e6]))
    elif kind == "near-tie":  # two rows a rounding error apart
        x[1] = x[0] + x[0].abs().max() * 2.0**-23 * torch.sign(torch.randn(d, generator=g))
    ids = draw(st.permutations(list(range(100, 100 + n))))
    return x.float(), f, list(ids), kind


@SETTINGS
@given(krum_inputs())
def test_krum_equals_the_straightforward_rule(case):
    x, f, ids, kind = case
    res = Krum(f)(x, client_ids=ids)
    slow = Krum(f)(x.double(), client_ids=ids)  # float64 rows: the float64 path, always
    assert (res.info, res.flagged) == (slow.info, slow.flagged)
    assert torch.equal(res.aggregate.double(), slow.aggregate)
    if kind == "grid":
        return  # exact ties between *different* updates: float64 rounding decides, as before
    scores = ref_scores(x, f)
    (sel,) = res.info["selected"]
    row = ids.index(sel)
    assert_a_valid_cut([row], scores)
    flagged_rows = [ids.index(c) for c in res.flagged]
    assert len(flagged_rows) == f and flagged_rows == sorted(flagged_rows)  # in row order
    assert_a_valid_cut(flagged_rows, scores, largest=True)
    assert torch.equal(res.aggregate, x[row])  # the selected update itself, bit for bit
    torch.testing.assert_close(res.scores.double(), torch.tensor(scores, dtype=torch.float64),
                               rtol=1e-3, atol=1e-6 * max(scores))


@SETTINGS
@given(krum_inputs(), st.data())
def test_multikrum_equals_the_straightforward_rule(case, data):
    x, f, ids, kind = case
    n = x.shape[0]
    m = data.draw(st.one_of(st.none(), st.integers(1, n)))
    res = MultiKrum(f, m=m)(x, client_ids=ids)
    assert res.info == MultiKrum(f, m=m)(x.double(), client_ids=ids).info
    if kind == "grid":
        return
    keep = n - f if m is None else m
    chosen = [ids.index(c) for c in res.info["selected"]]
    assert len(chosen) == keep and chosen == sorted(chosen)  # in row order
    assert_a_valid_cut(chosen, ref_scores(x, f))
    exact = x.double()[chosen].mean(0)
    bound = (keep + MEAN_ERROR_FACTOR) * 2.0**-24 * x.double()[chosen].abs().mean(0)
    assert bool(((res.aggregate.double() - exact).abs() <= bound + 1e-45).all())


@SETTINGS
@given(krum_inputs(), st.sampled_from([1, 7, 64, 1024]))
def test_float32_distances_are_within_their_bound(case, chunk):
    x, _, _, _ = case
    out = float32_sq_distances(x, chunk=chunk)
    assert out is not None
    sq, err = out
    exact = ref_sq(x)
    # the float64 reference itself errs by ~1e-16 relative: far inside the slack below
    assert bool(((sq - exact).abs() <= err + 1e-12 * exact.max() + 1e-300).all())


@SETTINGS
@given(krum_inputs(), st.data())
def test_a_certified_order_puts_the_exact_rows_before_every_cut(case, data):
    x, f, _, _ = case
    n = x.shape[0]
    out = float32_sq_distances(x, chunk=data.draw(st.sampled_from([3, 1024])))
    assert out is not None
    cuts = tuple(data.draw(st.lists(st.integers(1, n - 1), max_size=3)))
    got = certified_order(out[0], out[1], f, cuts)
    if got is None:
        return  # undecided: the rule takes the float64 path (the tests above cover it)
    exact = torch.tensor(ref_scores(x, f), dtype=torch.float64)
    for r in cuts:
        assert float(exact[got[1][:r]].max()) < float(exact[got[1][r:]].min())


def test_the_fast_path_decides_a_typical_round_and_declines_a_tie():
    g = torch.Generator().manual_seed(0)
    x = 1.0 + torch.randn(30, 5000, generator=g)
    x[25:] *= -5
    sq, err = float32_sq_distances(x)
    assert certified_order(sq, err, 5, (1, 25)) is not None  # decided in float32
    x[3] = x[7]  # an exact tie between two rows: a cut between them is never proven
    sq, err = float32_sq_distances(x)
    order = torch.sort(krum_scores(sq, 5), stable=True).indices.tolist()
    assert certified_order(sq, err, 5, (min(order.index(3), order.index(7)) + 1,)) is None
    res = Krum(5)(x, client_ids=list(range(30)))
    assert res.info["selected"] == (ref_rank(ref_scores(x, 5), list(range(30)))[0],)


def test_reduced_precision_float32_products_take_the_float64_path():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 400, generator=g)
    want = Krum(2)(x).info["selected"]
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert not ieee_float32_matmul("cpu")
        assert float32_sq_distances(x) is None
        assert Krum(2)(x).info["selected"] == want
    finally:
        torch.set_float32_matmul_precision(before)
    assert ieee_float32_matmul("cpu")


def test_overflowing_squares_take_the_float64_path():
    x = torch.tensor([[3e19, 0.0], [1.0, 2.0], [1.5, 2.5], [0.5, 1.0], [1.2, 2.2]])
    assert float32_sq_distances(x) is None
    assert Krum(1)(x).info["selected"][0] in (1, 2, 4)
    assert float32_sq_distances(x.double()) is None  # float64 rows: the float64 path already


def test_an_undecided_round_costs_the_float64_path_only(monkeypatch):
    # equal honest rows tie: a cut among them is never proven in float32; stable_gram decides
    # and the lower client ids win the tie
    calls = []
    real = linalg.stable_gram
    monkeypatch.setattr("securefml.defenses.distance.stable_gram", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.ones(7, 50)
    x[6] = 40.0
    res = MultiKrum(1, m=3)(x, client_ids=[5, 4, 3, 2, 1, 0, 9])
    assert calls and res.info["selected"] == (2, 1, 0)  # clients 0, 1, 2, in row order
    calls.clear()
    assert MultiKrum(1)(x, client_ids=[5, 4, 3, 2, 1, 0, 9]).flagged == (9,)
    assert not calls  # the outlier is proven apart in float32


# -- the one Krum score: edge cases, tested once ------------------------------------------


def test_krum_neighbours_edge_cases():
    assert krum_neighbours(10, 0) == 8  # f = 0: n - 2 nearest
    assert krum_neighbours(10, 3) == 5
    assert krum_neighbours(5, 3) == 1  # n - f - 2 <= 0 (Krum refuses; a simulation still ranks)
    assert krum_neighbours(2, 0) == 1
    assert krum_neighbours(1, 0) == 0  # a single row scores 0
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="non-negative integer"):
            krum_neighbours(5, bad)  # type: ignore[arg-type]


def test_krum_scores_edge_cases_and_ties():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0], [30.0]], dtype=torch.float64)
    sq = ref_sq(x)
    torch.testing.assert_close(krum_scores(sq, 0), torch.tensor(ref_scores(x, 0), dtype=torch.float64))
    torch.testing.assert_close(krum_scores(sq, 3), sq.masked_fill(torch.eye(5, dtype=torch.bool), 1e300).min(1).values)
    assert torch.equal(krum_scores(sq[:1, :1], 0), torch.zeros(1, dtype=torch.float64))
    tied = ref_sq(torch.tensor([[0.0], [1.0], [0.0], [1.0]]))
    s = krum_scores(tied, 0)  # two neighbours each: every row sees one copy of itself and one other
    assert torch.equal(s, torch.full((4,), 1.0, dtype=torch.float64))
    assert Krum(0)(torch.tensor([[0.0], [1.0], [0.0], [1.0]]), client_ids=[7, 3, 5, 9]).info["selected"] == (3,)
    with pytest.raises(ConfigError, match="square"):
        krum_scores(torch.zeros(3, 4), 0)
    with pytest.raises(ConfigError, match="nearest"):
        nearest_sums(torch.zeros(3, 3), 3)


def test_bulyan_still_selects_by_set_not_by_order():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(11, 30, generator=g)
    perm = torch.randperm(11, generator=g)
    a = Bulyan(2)(x, client_ids=list(range(11)))
    b = Bulyan(2)(x[perm], client_ids=perm.tolist())
    assert sorted(a.info["selected"]) == sorted(b.info["selected"])


def test_a_row_that_drags_the_mean_does_not_hide_the_honest_distances():
    # found by the adversary above: honest rows 1e-3 apart around 1e3, one Byzantine row at
    # ~1e6 (a norm gap below stable_gram's 1e3 trigger); the mean-centred float64 Gram loses
    # the honest distances to cancellation, its bound says so, and the medoid-centred Gram decides
    x = torch.tensor([[1000.0015], [999.9997], [999.9978], [1000.0005], [995000.0]])
    assert Krum(1)(x).info["selected"] == (ref_rank(ref_scores(x, 1), list(range(5)))[0],) == (3,)
    assert MultiKrum(1, m=2)(x).info["selected"] == (1, 3)
