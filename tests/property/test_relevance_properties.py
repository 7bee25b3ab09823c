"""Claims of relevance-aware aggregation, as hypothesis properties.

* relevance weights are a probability distribution per client (self excluded or included);
* per-client aggregates are permutation equivariant: relabelling clients permutes the rows;
* the effective-contributors policy: every row a step applies satisfies ``n_eff >= m_min``,
  and ``check_effective`` (the key holder's check) refuses *any* row an adversarial server
  proposes below ``m_min``;
* relevance groups (SecAgg+) partition the cohort into groups of at least the minimum size.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.errors import ProtocolError
from securefml.protocols import Plaintext
from securefml.relevance import (
    RelevanceAggregation,
    RelevanceConfig,
    check_effective,
    effective_contributors,
    relevance_groups,
    relevance_weights,
    temper,
    worst_case_effective,
)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def task_vectors(draw: st.DrawFn, min_n: int = 2, max_n: int = 9) -> torch.Tensor:
    n = draw(st.integers(min_n, max_n))
    k = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@SETTINGS
@given(tv=task_vectors(), t=st.floats(0.01, 10.0), include_self=st.booleans(), standardize=st.booleans())
def test_weights_are_a_distribution_per_client(tv, t, include_self, standardize):
    sim = tv @ tv.T / (tv.norm(dim=1)[:, None] * tv.norm(dim=1)[None, :])
    w = relevance_weights(sim, temperature=t, include_self=include_self, standardize=standardize)
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert torch.allclose(w.sum(1), torch.ones(w.shape[0], dtype=w.dtype), atol=1e-9)
    if not include_self:
        assert torch.all(torch.diagonal(w) == 0)


@SETTINGS
@given(tv=task_vectors(min_n=3), t=st.floats(0.05, 2.0), include_self=st.booleans(), m_min=st.floats(1.0, 2.0),
       perm_seed=st.integers(0, 2**31 - 1))
def test_per_client_aggregates_are_permutation_equivariant(tv, t, include_self, m_min, perm_seed):
    n = tv.shape[0]
    models = torch.randn(n, 5, generator=torch.Generator().manual_seed(perm_seed + 1))
    weights = [float(i + 1) for i in range(n)]
    step = RelevanceAggregation(RelevanceConfig(temperature=t, include_self=include_self, min_effective=m_min),
                                protocol=Plaintext())
    ids = tuple(range(100, 100 + n))
    base = step.aggregate(0, ids, models, weights, tv.float())
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed)).tolist()
    permuted = step.aggregate(0, tuple(ids[i] for i in perm), models[perm], [weights[i] for i in perm],
                              tv.float()[perm])
    for pos, i in enumerate(perm):
        assert torch.allclose(permuted.per_client[pos], base.per_client[i], atol=1e-5)
    assert torch.allclose(permuted.weights, base.weights[perm][:, perm], atol=1e-9)
    assert torch.allclose(permuted.global_aggregate, base.global_aggregate, atol=1e-5)


@SETTINGS
@given(tv=task_vectors(min_n=4), t=st.floats(0.01, 1.0), include_self=st.booleans(), m_min=st.floats(1.0, 3.0),
       blind=st.booleans())
def test_every_applied_row_meets_the_minimum_effective_contributors(tv, t, include_self, m_min, blind):
    n = tv.shape[0]
    step = RelevanceAggregation(RelevanceConfig(temperature=t, include_self=include_self, min_effective=m_min,
                                                blind=blind), protocol=Plaintext())
    out = step.aggregate(0, tuple(range(n)), torch.zeros(n, 3), [1.0] * n, tv.float())
    for i in range(n):
        if blind:
            reachable = (n - 1 if include_self else n - 2) >= m_min  # uniform over the candidates, minus one
            if reachable:
                assert worst_case_effective(out.weights[i]) >= m_min - 1e-6
            continue
        assert effective_contributors(out.weights[i], exclude=i) >= m_min - 1e-6
        check_effective(out.weights[i], i, m_min)  # the key holder would accept it


@SETTINGS
@given(n=st.integers(2, 10), data=st.data(), m_min=st.floats(1.5, 4.0))
def test_key_holder_check_refuses_every_row_below_the_minimum(n, data, m_min):
    # an adversarial server proposes an arbitrary coefficient row for client `pos`
    entry = st.one_of(st.floats(-1.0, 1.0), st.floats(0.0, 1.0), st.sampled_from([0.0, float("nan"), float("inf")]))
    raw = data.draw(st.lists(entry, min_size=n, max_size=n))
    pos = data.draw(st.integers(0, n - 1))
    row = torch.tensor(raw, dtype=torch.float64)
    if data.draw(st.booleans()) and torch.isfinite(row).all() and (row >= 0).all() and row.sum() > 0:
        row = row / row.sum()  # a well-formed distribution, possibly concentrated
    valid = bool(torch.isfinite(row).all()) and bool((row >= -1e-6).all()) and abs(float(row.sum()) - 1) <= 1e-6
    n_eff = effective_contributors(row.clamp_min(0), exclude=pos) if valid else 0.0
    if valid and n_eff >= m_min - 1e-6:
        assert check_effective(row, pos, m_min) == pytest.approx(n_eff)
    else:
        with pytest.raises(ProtocolError):
            check_effective(row, pos, m_min)


@SETTINGS
@given(n=st.integers(2, 10), pos=st.integers(0, 9), other=st.integers(0, 9), m_min=st.floats(1.01, 4.0))
def test_a_row_concentrated_on_one_other_client_is_refused(n, pos, other, m_min):
    pos, other = pos % n, other % n
    if pos == other:
        other = (pos + 1) % n
    row = torch.zeros(n, dtype=torch.float64)
    row[other] = 1.0
    with pytest.raises(ProtocolError):
        check_effective(row, pos, m_min)


@SETTINGS
@given(tv=task_vectors(min_n=2, max_n=14), min_size=st.integers(2, 5))
def test_relevance_groups_partition_with_minimum_size(tv, min_size):
    n = tv.shape[0]
    sim = tv @ tv.T / (tv.norm(dim=1)[:, None] * tv.norm(dim=1)[None, :])
    groups = relevance_groups(sim, min_size)
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(n))
    if n >= min_size:
        assert all(len(g) >= min_size for g in groups)


@SETTINGS
@given(tv=task_vectors(min_n=1, max_n=14), min_size=st.integers(2, 5), min_link=st.floats(-0.5, 0.9))
def test_threshold_groups_are_a_partition_no_two_of_which_are_linked_enough_to_merge(tv, min_size, min_link):
    n = tv.shape[0]
    sim = tv @ tv.T / (tv.norm(dim=1)[:, None] * tv.norm(dim=1)[None, :])
    groups = relevance_groups(sim, min_size, min_link=min_link)
    assert sorted(i for g in groups for i in g) == list(range(n))
    for a in range(len(groups)):
        for b in range(a + 1, len(groups)):
            link = float(sim[list(groups[a])][:, list(groups[b])].double().mean())
            assert link < min_link  # clustering stopped: every remaining pair is below the threshold


@SETTINGS
@given(raw=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=9))
def test_worst_case_effective_is_the_minimum_over_every_left_out_client(raw):
    w = torch.tensor(raw, dtype=torch.float64)
    brute = []
    for drop in [None, *range(len(raw))]:
        if drop is not None and raw[drop] <= 0:
            continue
        rest = [x for k, x in enumerate(raw) if k != drop]
        sq = sum(x * x for x in rest)
        brute.append(sum(rest) ** 2 / sq if sq > 0 else 0.0)
    assert worst_case_effective(w) == pytest.approx(min(brute), rel=1e-9, abs=1e-12)


@SETTINGS
@given(tv=task_vectors(min_n=5), t=st.floats(0.01, 0.5), m_min=st.floats(1.1, 3.0), include_self=st.booleans())
def test_tempering_raises_the_temperature_and_keeps_the_order_of_relevance(tv, t, m_min, include_self):
    # the tempered row is softmax at a higher temperature: the same ranking of clients, zeros stay zero
    n = tv.shape[0]
    sim = tv @ tv.T / (tv.norm(dim=1)[:, None] * tv.norm(dim=1)[None, :])
    w = relevance_weights(sim, temperature=t, include_self=include_self)
    out = temper(w, m_min, include_self=include_self) if n - 1 >= m_min else w
    for i in range(n):
        assert torch.isfinite(out[i]).all() and abs(float(out[i].sum()) - 1) < 1e-9
        a, b = w[i], out[i]
        pairs = [(j, k) for j in range(n) for k in range(n) if a[j] > a[k] * (1 + 1e-6) and a[k] > 1e-12]
        assert all(b[j] >= b[k] - 1e-12 for j, k in pairs)
        if not include_self:
            assert b[i] == 0
