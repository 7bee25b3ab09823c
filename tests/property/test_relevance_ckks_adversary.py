"""A curious server against the CKKS key holder that holds a ``RelevancePolicy``.

The server bypasses the relevance step's own pre-check and asks the key holder directly, with
hypothesis choosing the coefficients: arbitrary non-negative rows, rows concentrated on one or
two clients, and honest tempered rows.  Real TenSEAL ciphertexts, real Ed25519 signatures.

Claims:

* every combination the key holder decrypts leaves at least ``m_min`` effective contributors
  after leaving out *any* one client (brute force here, independent of the library's formula),
  and is the requested combination within CKKS precision;
* every request below the bound raises ``PolicyViolation`` and decrypts nothing: the same key
  round still serves an allowed request afterwards (its chunks were not spent);
* a row that lets its recipient read one other client (most of the others' mass on it) is
  always refused, whoever the recipient is.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from securefml.errors import PolicyViolation
from securefml.protocols.ckks_policy import SKIP_BELOW, AggregateRequest
from securefml.relevance import EncryptedRelevance, RelevanceAggregation, RelevanceConfig, RelevancePolicy

M_MIN = 2.0
N = 5
DIM = 6
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def parties():
    enc = EncryptedRelevance.generate(min_effective=M_MIN)
    ids = tuple(range(100, 100 + N))
    vectors = torch.randn(N, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    frame = enc.frame(DIM)
    base = [enc._encrypt(enc.key_round(0, 1), c, v, frame) for c, v in zip(ids, vectors)]
    return {"enc": enc, "ids": ids, "vectors": vectors, "frame": frame, "base": base, "next": itertools.count(1)}


def _brute_force_worst(weights: list[float]) -> float:
    w = [x for x in weights if x > SKIP_BELOW]
    out = []
    for drop in [None, *range(len(w))]:
        rest = [x for k, x in enumerate(w) if k != drop]
        sq = sum(x * x for x in rest)
        out.append(sum(rest) ** 2 / sq if sq > 0 else 0.0)
    return min(out)


def _ask(parties, coeffs: dict[int, float]) -> tuple[int, np.ndarray]:
    """The curious server: signed uploads of a fresh key round, its own coefficients, straight to the key holder."""
    enc = parties["enc"]
    kr = enc.key_round(1 + next(parties["next"]), 1)
    uploads = tuple(enc._resign(u, kr) for u in parties["base"] if u.sender in coeffs)
    dec = enc.key_holder.decrypt_aggregate(AggregateRequest(kr, parties["frame"], uploads, coeffs))
    frame = parties["frame"]
    return kr, np.concatenate([dec[k][: frame.chunk_len(k)] for k in range(frame.n_chunks)])


rows = st.one_of(
    st.lists(st.floats(0.0, 1.0), min_size=N, max_size=N),  # anything non-negative
    st.tuples(st.integers(0, N - 1), st.floats(0.5, 1.0), st.floats(0.0, 0.5)).map(  # one client dominates
        lambda t: [t[1] if k == t[0] else t[2] / (N - 1) for k in range(N)]),
    st.tuples(st.integers(0, N - 1), st.integers(0, N - 1), st.floats(0.0, 0.3)).map(  # two clients share it
        lambda t: [0.5 if k in (t[0], t[1]) else t[2] / N for k in range(N)]),
)


@SETTINGS
@given(raw=rows)
@example(raw=[0.2] * N)  # allowed: uniform
@example(raw=[0.9, 0.025, 0.025, 0.025, 0.025])  # refused: client 101..104 would read client 100
def test_key_holder_decrypts_only_rows_with_enough_effective_contributors(parties, raw):
    ids, vectors = parties["ids"], parties["vectors"]
    if sum(raw) <= 0:
        raw = [1.0] * N
    coeffs = {c: float(w) for c, w in zip(ids, raw) if w > 0}
    worst = _brute_force_worst(list(coeffs.values()))
    try:
        kr, got = _ask(parties, coeffs)
    except PolicyViolation:
        # refused: either the relevance bound or the base policy (too few clients); nothing spent
        reason = RelevancePolicy(min_effective=M_MIN).violation(coeffs)
        assert reason is not None
        return
    assert worst >= M_MIN - 1e-6
    want = sum(coeffs[c] * vectors[k].numpy() for k, c in enumerate(ids) if c in coeffs)
    assert np.allclose(got, want, atol=1e-4 * max(1.0, sum(coeffs.values())))


@SETTINGS
@given(recipient=st.integers(0, N - 1), target=st.integers(0, N - 1), self_w=st.floats(0.0, 0.6),
       concentration=st.floats(0.72, 1.0))
def test_a_row_that_lets_its_recipient_read_one_other_client_is_refused(parties, recipient, target, self_w,
                                                                       concentration):
    if target == recipient:
        target = (recipient + 1) % N
    ids = parties["ids"]
    rest = 1.0 - self_w
    row = [0.0] * N
    row[recipient] = self_w
    row[target] = rest * concentration
    others = [k for k in range(N) if k not in (recipient, target)]
    for k in others:
        row[k] = rest * (1 - concentration) / len(others)
    # >= 72 % of the others' mass on one client: n_eff of the others < 2 whatever the split of the rest
    coeffs = {c: w for c, w in zip(ids, row) if w > 0}
    with pytest.raises(PolicyViolation):
        _ask(parties, coeffs)
    # the refusal spent nothing: the same key round still decrypts an allowed (uniform) row
    enc = parties["enc"]
    kr = enc.key_round(1 + next(parties["next"]), 1)
    uploads = tuple(enc._resign(u, kr) for u in parties["base"])
    with pytest.raises(PolicyViolation):
        enc.key_holder.decrypt_aggregate(AggregateRequest(kr, parties["frame"], uploads,
                                                          {c: w for c, w in zip(ids, row)}))
    dec = enc.key_holder.decrypt_aggregate(AggregateRequest(kr, parties["frame"], uploads, {c: 0.2 for c in ids}))
    assert np.allclose(dec[0][:DIM], parties["vectors"].mean(0).numpy(), atol=1e-4)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), t=st.floats(0.05, 1.0), include_self=st.booleans())
def test_honest_tempered_rows_are_never_refused(parties, seed, t, include_self):
    # the relevance step tempers to the recipient-blind bound, so the key holder accepts its rows
    n = 8
    tv = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    step = RelevanceAggregation(RelevanceConfig(temperature=t, include_self=include_self, min_effective=M_MIN,
                                                blind=True))
    out = step.aggregate(0, tuple(range(n)), torch.zeros(n, 2), [1.0] * n, tv.float())
    policy = parties["enc"].policy
    for i in range(n):
        row = out.weights[i]
        row = torch.where(row > SKIP_BELOW, row, torch.zeros_like(row))
        assert policy.violation({k: float(w) for k, w in enumerate(row.tolist()) if w > 0}) is None
