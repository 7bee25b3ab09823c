"""Security claims of SecAgg+ as hypothesis properties (real X25519, AES, Shamir, masks)."""

from __future__ import annotations

import itertools
from unittest import mock

import numpy as np
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from securefml.defenses.mean import Mean
from securefml.errors import ProtocolAbort
from securefml.protocols import shamir
from securefml.protocols.base import Transport
from securefml.protocols.quantize import FixedPoint
from securefml.protocols.secagg import SecAggPlus
from securefml.protocols.secagg_crypto import SEALED_BYTES
from securefml.testing.secagg_strategies import (
    DropAt,
    Replay,
    Tamper,
    neighbour_graphs,
    recoverable,
    secagg_scenarios,
    update_vectors,
)

FAST = settings(max_examples=20, deadline=None)


def _run(scn, transport, round_idx=0, proto=None):  # noqa: ANN001, ANN202
    layout, ups = scn.round_inputs()
    proto = proto or SecAggPlus(neighbours=scn.k, threshold=scn.t)
    return proto, layout, proto.run_round(round_idx, ups, layout, defense=Mean(), transport=transport)


def _plain(scn, ids):  # noqa: ANN001, ANN202
    idx = [i for i, c in enumerate(scn.cohort) if c in ids]
    w = np.asarray(scn.weights, np.float64)[idx]
    x = np.clip(scn.vectors[idx].astype(np.float64), -1.0, 1.0)
    return (w[:, None] * x).sum(0) / w.sum()


SCENARIOS = st.one_of(
    secagg_scenarios(max_clients=9),  # often below threshold
    secagg_scenarios(min_clients=5, max_clients=10, max_drop_fraction=0.3, slack=2),  # mostly recoverable
)


@settings(max_examples=30, deadline=None)
@given(SCENARIOS)
def test_sum_is_exact_within_the_bound_or_the_round_aborts_revealing_nothing(scn) -> None:  # noqa: ANN001
    proto = SecAggPlus(neighbours=scn.k, threshold=scn.t)
    plan = proto.plan(0, scn.cohort, scn.vectors.shape[1], max_weight=64.0)
    expect_ok = recoverable(plan, scn.drops)
    with mock.patch.object(shamir, "reconstruct", wraps=shamir.reconstruct) as spy:
        try:
            _, _, out = _run(scn, DropAt(scn.drops), proto=proto)
        except ProtocolAbort:
            assert not expect_ok
            assert spy.call_count == 0  # aborted before reconstructing any secret
            return
    assert expect_ok
    # nobody is rejected; an honest client left with fewer than t neighbours stops itself, which the
    # generic driver records as "client stopped: ProtocolAbort ..." (the old driver kept it apart)
    assert {c: why for c, why in out.rejected.items() if not why.startswith("client stopped: ProtocolAbort")} == {}
    survivors = {c for c in scn.cohort if scn.drops.get(c) in (None, "unmask")}
    assert set(out.accepted) <= survivors
    bound = out.extras["error_bound"]
    assert np.abs(out.aggregate.double().numpy() - _plain(scn, set(out.accepted))).max() <= bound + 1e-6


@FAST
@given(secagg_scenarios(max_clients=8).filter(lambda s: s.t < s.k), st.data())
def test_a_tampered_sealed_share_is_an_integrity_error_naming_its_sender(scn, data) -> None:  # noqa: ANN001
    victim = data.draw(st.sampled_from(scn.cohort))
    record = data.draw(st.integers(0, 1))  # tag byte of the last or second-to-last sealed share
    _, _, out = _run(scn, Tamper(victim, "share", offset=1 + record * (4 + SEALED_BYTES)))
    assert set(out.rejected) == {victim}
    assert out.rejected[victim].startswith("DecryptionError") and f"sender {victim}" in out.rejected[victim]
    assert victim not in out.accepted
    kept = set(scn.cohort) - {victim}
    assert np.abs(out.aggregate.double().numpy() - _plain(scn, kept)).max() <= out.extras["error_bound"] + 1e-6


class _TamperShares(Transport):
    """Flip the tag byte of one sealed share (``records[c]``-th from the end) of each tamperer ``c``."""

    def __init__(self, records: dict[int, int]) -> None:
        self.records = records

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        if stage != "share" or sender not in self.records:
            return data
        buf = bytearray(data)
        buf[len(buf) - 1 - self.records[sender] * (4 + SEALED_BYTES)] ^= 0x01
        return bytes(buf)


@settings(max_examples=25, deadline=None)
@given(secagg_scenarios(min_clients=4, max_clients=9), st.data())
def test_tampering_senders_cost_only_themselves_or_the_round_aborts_revealing_nothing(scn, data) -> None:  # noqa: ANN001
    """Any set of senders whose sealed shares fail authentication: if every live client keeps at
    least ``t`` live neighbours, exactly the tamperers are rejected (by name) and the sum is the
    plain sum of the others; otherwise the round aborts before any secret is reconstructed."""
    proto = SecAggPlus(neighbours=scn.k, threshold=scn.t)
    plan = proto.plan(0, scn.cohort, scn.vectors.shape[1], max_weight=64.0)
    nb = {c: set(plan.neighbours(c)) for c in scn.cohort}
    bad = set(data.draw(st.lists(st.sampled_from(scn.cohort), unique=True, min_size=1, max_size=len(scn.cohort))))
    records = {c: data.draw(st.integers(0, len(nb[c]) - 1)) for c in sorted(bad)}
    live = set(scn.cohort) - bad
    expect_ok = len(live) >= scn.t and all(len(nb[c] & live) >= scn.t for c in live)
    event("recovers" if expect_ok else "aborts")
    with mock.patch.object(shamir, "reconstruct", wraps=shamir.reconstruct) as spy:
        try:
            _, _, out = _run(scn, _TamperShares(records), proto=proto)
        except ProtocolAbort:
            assert not expect_ok
            assert spy.call_count == 0
            return
    assert expect_ok
    assert set(out.rejected) == bad
    for c, reason in out.rejected.items():
        assert reason.startswith("DecryptionError") and f"sender {c}" in reason
    assert set(out.accepted) == live
    assert np.abs(out.aggregate.double().numpy() - _plain(scn, live)).max() <= out.extras["error_bound"] + 1e-6


@FAST
@given(secagg_scenarios(max_clients=8).filter(lambda s: s.t < s.k), st.data())
def test_a_message_replayed_from_another_round_names_its_sender(scn, data) -> None:  # noqa: ANN001
    victim = data.draw(st.sampled_from(scn.cohort))
    stage = data.draw(st.sampled_from(["advertise", "share", "complaints", "masked", "unmask"]))
    transport = Replay()
    proto, _, _ = _run(scn, transport, round_idx=5)
    transport.arm(victim, stage)
    _, _, out = _run(scn, transport, round_idx=6, proto=proto)
    assert set(out.rejected) == {victim}
    assert out.rejected[victim].startswith("ReplayError") and f"sender {victim}" in out.rejected[victim]


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([5, 7, 11]), st.integers(2, 3), st.data())
def test_any_t_minus_1_shares_are_consistent_with_every_secret(p: int, t: int, data) -> None:  # noqa: ANN001
    """Information-theoretic check on a small field: for the shares an adversary holds, every
    candidate secret is explained by exactly the same number of polynomials."""
    secret = data.draw(st.integers(0, p - 1))
    all_xs = data.draw(st.lists(st.integers(1, p - 1), min_size=t, max_size=p - 1, unique=True))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))

    class _R:
        def randrange(self, stop: int) -> int:
            return int(rng.integers(stop))

    shares = shamir.split(secret, t, all_xs, prime=p, rng=_R())
    xs, held = all_xs[: t - 1], shares[: t - 1]  # what t-1 colluders hold
    counts = []
    for cand in range(p):
        n = 0
        for coeffs in itertools.product(range(p), repeat=t - 1):
            if all((cand + sum(c * x ** (i + 1) for i, c in enumerate(coeffs))) % p == y for x, y in zip(xs, held)):
                n += 1
        counts.append(n)
    assert len(set(counts)) == 1 and counts[0] == p ** (t - 1 - len(xs))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(0, 6), st.binary(min_size=32, max_size=32), st.data())
def test_any_t_shares_reconstruct(t: int, extra: int, secret: bytes, data) -> None:  # noqa: ANN001
    xs = list(range(1, t + extra + 1))
    shares = shamir.split_bytes(secret, t, xs)
    chosen = data.draw(st.lists(st.sampled_from(list(zip(xs, shares))), min_size=t, max_size=t, unique=True))
    assert shamir.reconstruct_bytes(chosen, t) == secret


@FAST
@given(st.integers(1, 40), st.integers(1, 6), st.sampled_from([16, 32]), st.data())
def test_fixed_point_error_bound_holds(n: int, m: int, bits: int, data) -> None:  # noqa: ANN001
    assume(bits == 32 or n <= 20)
    x = data.draw(update_vectors(n, m, scale=1.5))
    w = np.asarray(data.draw(st.lists(st.floats(0.5, 16.0), min_size=n, max_size=n)))
    fp = FixedPoint(clip=1.0, n=n, bits=bits, max_weight=16.0)
    total = np.zeros(m + 1, fp.dtype)
    for i in range(n):
        total += fp.encode(x[i], float(w[i]))
    s, tw = fp.decode_sum(total)
    ref = (w[:, None] * np.clip(x.astype(np.float64), -1, 1)).sum(0) / w.sum()
    assert np.abs(s / tw - ref).max() <= fp.error_bound(n, tw)


@FAST
@given(neighbour_graphs())
def test_neighbour_graphs_are_symmetric_without_self_loops(g) -> None:  # noqa: ANN001
    cohort, k, graph = g
    degrees = {len(v) for v in graph.values()}
    assert len(degrees) == 1 and degrees.pop() in (min(k, len(cohort) - 1), k + 1)
    for c, nb in graph.items():
        assert c not in nb and all(c in graph[v] for v in nb)


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
