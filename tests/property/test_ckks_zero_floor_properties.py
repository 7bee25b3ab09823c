"""The CKKS decode's resolution floor as hypothesis properties, on real TenSEAL ciphertexts.

For any uploads whose entries mix exact zeros, values just below and just above the floor tau
and ordinary values: the decoded aggregate is within the reported ``error_bound`` (which
includes tau) of the plaintext mean on the mean path, within ``sum_error_bound + tau`` on the
Gram path's combination, and an entry that is 0 in every upload decodes to exactly 0 on both
(the noise is ~1.2e-9 * sqrt(m), at most ~2.4e-8 measured for m <= 8; tau = 2^-23 ~ 1.2e-7).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securefml.defenses.mean import Mean
from securefml.protocols.base import ClientUpdate
from securefml.protocols.ckks_stats import default_zero_floor, sum_error_bound
from securefml.testing.defense_checks import GramWeightedMean
from securefml.updates import LayerLayout

ROUNDS = itertools.count(1)
TAU = default_zero_floor(40)
LAYOUT = LayerLayout([("w", (12, 20)), ("b", (12,))])
NEAR = [0.0, 0.5 * TAU, 0.99 * TAU, 1.01 * TAU, 2.0 * TAU, 10.0 * TAU]
ENTRY = st.one_of(st.sampled_from(NEAR + [-v for v in NEAR]), st.floats(-1.0, 1.0, width=32))




@st.composite
def uploads(draw: st.DrawFn) -> tuple[list[ClientUpdate], torch.Tensor]:
    n = draw(st.integers(3, 5))
    d = LAYOUT.numel
    x = torch.tensor(draw(st.lists(st.lists(ENTRY, min_size=d, max_size=d), min_size=n, max_size=n)),
                     dtype=torch.float32)
    shared = torch.tensor(draw(st.lists(st.booleans(), min_size=d, max_size=d)))
    x[:, shared] = 0.0  # zero in every upload
    return [ClientUpdate(i, x[i], LAYOUT.layer_names, 1.0) for i in range(n)], (x == 0).all(0)



def plain_mean(updates: list[ClientUpdate]) -> torch.Tensor:
    return torch.stack([u.vector for u in updates]).to(torch.float64).mean(0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.data_too_large])
@given(uploads())
def test_mean_path_within_bound_plus_floor_and_exact_on_shared_zeros(add_proto, drawn):
    updates, zero = drawn
    out = add_proto.run_round(next(ROUNDS), updates, LAYOUT, defense=Mean())
    expected = plain_mean(updates)
    bound = out.extras["error_bound"]
    assert bound == pytest.approx(sum_error_bound(len(updates), 1.0) + TAU)
    got = out.aggregate.to(torch.float64)
    assert float((got - expected).abs().max()) <= bound + 2.0**-24  # + float32 rounding of |x| <= 1
    assert bool(torch.all(got[zero] == 0))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.data_too_large])
@given(uploads())
def test_gram_path_within_bound_plus_floor_and_exact_on_shared_zeros(stats_proto, drawn):
    updates, zero = drawn
    out = stats_proto.run_round(next(ROUNDS), updates, LAYOUT, defense=GramWeightedMean())
    got = out.aggregate.to(torch.float64)
    assert float((got - plain_mean(updates)).abs().max()) <= sum_error_bound(len(updates), 1.0) + TAU + 2.0**-24
    assert bool(torch.all(got[zero] == 0))
