"""``RoundPlan`` bytes form: round trips, and any other bytes are refused with a typed error.

The adversary is whoever sits between the server and a remote client: hypothesis drives it to
flip, cut, extend or replace the plan's bytes; decoding must either return a *valid* plan (every
check of an in-process plan passes) or raise ``MalformedMessageError`` / ``ReplayError``.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.errors import MalformedMessageError, ProtocolError, ReplayError
from securefml.protocols import RoundPlan, SecAggPlus


def _plan(n: int = 5, signatures: bool = False, round_idx: int = 7) -> RoundPlan:
    return SecAggPlus(signatures=signatures, public_seed=b"beacon").plan(
        round_idx, list(range(10, 10 + 3 * n, 3)), 123, max_weight=4.0, layers=("fc1", "fc2"))


@pytest.mark.parametrize("signatures", [False, True])
def test_round_trip_keeps_every_field_and_the_graph(signatures: bool) -> None:
    plan = _plan(signatures=signatures)
    back = RoundPlan.from_bytes(plan.to_bytes(), round_idx=7)
    assert back == plan
    assert all(back.neighbours(c) == plan.neighbours(c) for c in plan.cohort)


def test_a_plan_for_another_round_is_refused() -> None:
    with pytest.raises(ReplayError):
        RoundPlan.from_bytes(_plan(round_idx=7).to_bytes(), round_idx=8)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_tampered_plans_are_refused_or_still_valid(data: st.DataObject) -> None:
    raw = bytearray(_plan(signatures=data.draw(st.booleans())).to_bytes())
    how = data.draw(st.sampled_from(["flip", "cut", "extend", "replace"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    elif how == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "extend":
        raw += data.draw(st.binary(min_size=1, max_size=16))
    else:
        raw = bytearray(data.draw(st.binary(max_size=400)))
    try:
        plan = RoundPlan.from_bytes(bytes(raw))
    except (MalformedMessageError, ReplayError) as exc:
        assert isinstance(exc, ProtocolError)
        return
    assert plan.params.t <= plan.params.k <= plan.n - 1 or plan.params.k <= plan.n - 1
    assert all(len(plan.neighbours(c)) >= 0 for c in plan.cohort)
