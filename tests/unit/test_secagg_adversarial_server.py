"""The adversarial-server property (issue 11): a malicious server, its messages drawn by
hypothesis (``securefml.testing.adversarial_secagg``), run against real honest clients, can
unmask no honest client's input and only sums over large groups of honest clients."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from securefml.errors import ConfigError
from securefml.protocols.secagg import SecAggPlus
from securefml.testing.adversarial_secagg import (
    assert_server_learns_only_large_sums,
    exposed_sets,
    finding1_moves,
    run_malicious_round,
    server_moves,
    unmask_group,
)

LENGTH = 4
# complete graph (classic SecAgg, n=7) and a Harary graph (n=9, k=6), both with t=4: sized for
# one corrupt client (2t > k + c) and two lost neighbours per client
PROTO = SecAggPlus(signatures=True, neighbours=6, threshold=4)
PLANS = {"complete": (PROTO, PROTO.plan(0, range(7), LENGTH, max_weight=1.0)),
         "sparse": (PROTO, PROTO.plan(0, range(9), LENGTH, max_weight=1.0))}
CI = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))


def _check(name: str, moves) -> None:  # noqa: ANN001
    proto, plan = PLANS[name]
    view = run_malicious_round(proto, plan, moves)
    assert_server_learns_only_large_sums(view, min_size=plan.t)


@CI
@given(server_moves(PLANS["complete"][1]))
def test_malicious_server_complete_graph(moves) -> None:  # noqa: ANN001
    _check("complete", moves)


@CI
@given(server_moves(PLANS["sparse"][1]))
def test_malicious_server_sparse_graph(moves) -> None:  # noqa: ANN001
    _check("sparse", moves)


@pytest.mark.slow
@SLOW
@given(server_moves(PLANS["complete"][1]))
def test_malicious_server_complete_graph_long(moves) -> None:  # noqa: ANN001
    _check("complete", moves)


@pytest.mark.slow
@SLOW
@given(server_moves(PLANS["sparse"][1]))
def test_malicious_server_sparse_graph_long(moves) -> None:  # noqa: ANN001
    _check("sparse", moves)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_finding1_is_among_the_strategies_and_fails(name: str) -> None:
    proto, plan = PLANS[name]
    victim = plan.cohort[0]
    view = run_malicious_round(proto, plan, finding1_moves(plan, victim))
    assert victim not in view.masked and "ProtocolAbort" in view.refusals[victim]
    groups = assert_server_learns_only_large_sums(view, min_size=plan.t)
    assert all(victim not in g for g in groups)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_an_honest_server_exposes_exactly_the_whole_sum(name: str) -> None:
    """The harness is not vacuous: with no deviation the server unmasks the full sum, really."""
    from securefml.testing.adversarial_secagg import ServerMoves

    proto, plan = PLANS[name]
    xs = {c: np.full(LENGTH, 0.01 * c, np.float32) for c in plan.cohort}
    view = run_malicious_round(proto, plan, ServerMoves(), xs)
    assert view.refusals == {}
    assert exposed_sets(view) == [frozenset(plan.cohort)]
    assert np.allclose(unmask_group(view, plan.cohort), sum(xs.values()), atol=1e-6)


def test_the_harness_refuses_unsigned_mode() -> None:
    proto = SecAggPlus(neighbours=4, threshold=3)
    with pytest.raises(ConfigError, match="signatures"):
        run_malicious_round(proto, proto.plan(0, range(5), LENGTH, max_weight=1.0), finding1_moves(
            proto.plan(0, range(5), LENGTH, max_weight=1.0), 0))
