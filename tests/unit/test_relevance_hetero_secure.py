"""Relevance-weighted Co-LoRA under CKKS (``securefml.relevance.hetero_secure``): rows, policy, real ciphertexts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.errors import ConfigError
from securefml.protocols.ckks_policy import SKIP_BELOW
from securefml.relevance import (
    CoLoRAMLP,
    EncryptedRelevance,
    HeteroConfig,
    HeteroUpload,
    RelevancePolicy,
    SecureHeteroRelevance,
    architecture_state,
    combination_families,
    combine_plain,
    relevance_aggregate_heterogeneous,
    relevance_weights,
    shared_state,
)

SHAPES = {"32": (32,), "64": (64,), "64x64": (64, 64)}
M_MIN = 2.0


def _uploads(archs: list[str], seed: int, *, frozen: bool = False) -> list[HeteroUpload]:
    """Random adapters; with ``frozen`` only A, B, P, Q move (the base stays the family's seeded one)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, a in enumerate(archs):
        m = CoLoRAMLP(8, SHAPES[a], 3, rank=2, family_seed=0)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if not (frozen and ".base." in n):
                    p.add_(torch.randn(p.shape, generator=gen))
        out.append(HeteroUpload(a, shared_state(m), architecture_state(m), client_id=10 + i))
    return out


def _lora(name: str) -> bool:
    return ".base." not in name


def _worst(row: list[float]) -> float:
    """Brute force: the fewest effective contributors left after dropping any one (or none)."""
    w = [x for x in row if x > SKIP_BELOW]
    out = []
    for drop in [None, *range(len(w))]:
        rest = [x for k, x in enumerate(w) if k != drop]
        sq = sum(x * x for x in rest)
        out.append(sum(rest) ** 2 / sq if sq > 0 else 0.0)
    return min(out)


archs_strategy = st.lists(st.sampled_from(sorted(SHAPES)), min_size=1, max_size=7)


@settings(max_examples=15, deadline=None)
@given(archs=archs_strategy, seed=st.integers(0, 10_000), share=st.booleans(),
       m=st.one_of(st.none(), st.floats(1.01, 5.0)))
def test_families_reproduce_the_plaintext_rule(archs, seed, share, m):
    uploads = _uploads(archs, seed)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(len(archs), 4, generator=gen, dtype=torch.float64)
    w = relevance_weights(torch.nn.functional.normalize(v, dim=1) @ torch.nn.functional.normalize(v, dim=1).T,
                          temperature=0.3, include_self=True)
    got = combine_plain(uploads, combination_families(uploads, w, share=share, own_evidence=m))
    want = relevance_aggregate_heterogeneous(uploads, w, share=share, own_evidence=m)
    for i, (sh, ar) in enumerate(want):
        for mine, theirs in ((got[i][0], sh), (got[i][1], ar)):
            assert mine.keys() == theirs.keys()
            for k in theirs:
                assert torch.allclose(mine[k], theirs[k], atol=1e-5), k
    for fam in combination_families(uploads, w, share=share, own_evidence=m):
        assert torch.allclose(fam.rows.sum(1), torch.ones(len(fam.recipients), dtype=torch.float64))


@settings(max_examples=20, deadline=None)
@given(archs=st.lists(st.sampled_from(sorted(SHAPES)), min_size=2, max_size=8), seed=st.integers(0, 10_000),
       copies=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), max_size=3),
       scale=st.floats(0.01, 100.0), m=st.one_of(st.none(), st.floats(1.01, 5.0)))
def test_no_combination_below_the_policy_whatever_the_task_vectors(archs, seed, copies, scale, m):
    """Clients choose their task vectors (copies of others', any scale): every decrypted row keeps >= m_min."""
    n = len(archs)
    uploads = _uploads(archs, seed, frozen=True)
    v = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for dst, src in copies:  # a client that copies another's task vector attracts its weight
        v[dst % n] = v[src % n] * scale
    sec = SecureHeteroRelevance(RelevancePolicy(min_effective=M_MIN), mode="policy", own_evidence=m, trainable=_lora)
    res = sec.aggregate(0, uploads, v)
    assert set(res.states) == set(range(n))
    labels = {f.label: f for f in combination_families(uploads, torch.ones(n, n, dtype=torch.float64),
                                                       own_evidence=m, trainable=_lora)}
    for (i, label), row in res.applied.items():
        assert _worst(row.tolist()) >= M_MIN - 1e-6, (label, row)
        assert (i, label) not in res.refused
    for (i, label) in res.refused:  # a refused row: the client keeps its own tensors of that family
        fam = labels[label]
        own = uploads[i].shared if fam.part == "shared" else uploads[i].arch
        mine = res.states[i][0 if fam.part == "shared" else 1]
        assert all(torch.equal(mine[k], own[k]) for k in fam.keys)
    # the frozen base is never combined, and stays the seeded one
    for i, u in enumerate(uploads):
        assert all(torch.equal(res.states[i][1][k], u.arch[k]) for k in u.arch if not _lora(k))


@pytest.fixture(scope="module")
def encrypted():
    return EncryptedRelevance.generate(min_effective=M_MIN)


def test_ckks_rows_match_the_plaintext_twin_with_real_ciphertexts(encrypted):
    archs = ["64x64", "64x64", "64x64", "64", "64", "32", "64x64", "64"]
    uploads = _uploads(archs, 5, frozen=True)
    v = torch.randn(len(archs), 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v[1] = v[0] + 0.05  # two near-identical tasks and a third close by: concentrated rows exist
    v[2] = v[0] - 0.05
    kw = dict(temperature=0.2, own_evidence=2.5, trainable=_lora)
    twin = SecureHeteroRelevance(RelevancePolicy(min_effective=M_MIN), mode="policy", **kw)
    ckks = SecureHeteroRelevance(RelevancePolicy(min_effective=M_MIN), mode="ckks", encrypted=encrypted, **kw)
    a, b = twin.aggregate(3, uploads, v), ckks.aggregate(3, uploads, v)
    assert b.bytes_uploaded > 0 and a.bytes_uploaded == 0
    assert a.refused.keys() == b.refused.keys() and a.applied.keys() == b.applied.keys()
    assert a.refused, "the example is built to have a concentrated row"
    for i in a.states:
        for half in (0, 1):
            for k, t in a.states[i][half].items():
                assert torch.allclose(b.states[i][half][k], t, atol=1e-3), (i, k)
    # held-out: tempered rows over the training clients, decrypted; same starts as the twin
    initial = {u.architecture: (dict(u.shared), dict(u.arch)) for u in _uploads(archs, 99, frozen=True)}
    new = [(90, "32"), (91, "64x64")]
    nv = torch.stack([v[5] + 0.01, v[0] + 0.01])
    ha = twin.heldout(4, uploads, v, new, nv, initial)
    hb = ckks.heldout(4, uploads, v, new, nv, initial)
    assert ha.keys() == hb.keys() == {90, 91}
    for c in ha:
        for half in (0, 1):
            for k, t in ha[c][half].items():
                assert torch.allclose(hb[c][half][k], t, atol=1e-3), (c, k)


def test_bad_configuration_is_refused():
    with pytest.raises(ConfigError, match="mode"):
        SecureHeteroRelevance(RelevancePolicy(), mode="secagg")
    with pytest.raises(ConfigError, match="relevance"):
        HeteroConfig(protocol="ckks")
    with pytest.raises(ConfigError, match="protocol"):
        HeteroConfig(relevance=True, protocol="tls")
    uploads = _uploads(["64", "64"], 0)  # the base differs across the group but is not combined
    with pytest.raises(ConfigError, match="frozen"):
        combination_families(uploads, torch.ones(2, 2) / 2, trainable=_lora)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_federation_under_ckks_matches_its_plaintext_twin():
    from securefml.data import make_digits_clusters
    from securefml.relevance import run_heterogeneous_budgets

    data = make_digits_clusters(groups=2, architectures_per_group=True, seed=1, n_train=12, n_heldout=6, k_shot=2,
                                query=3, architectures="32,64", heldout_architecture_shares=[1, 1])
    base = dict(rounds=3, clients_per_round=8, local_steps=5, rank=4, seed=1, relevance=True, own_evidence=3.0)
    twin = run_heterogeneous_budgets(data, HeteroConfig(**base, protocol="policy"), [(0, 0.01)])[(0, 0.01)]
    ckks = run_heterogeneous_budgets(data, HeteroConfig(**base, protocol="ckks"), [(0, 0.01)])[(0, 0.01)]
    assert ckks.bytes_uploaded > 0 and ckks.refused_rows == twin.refused_rows
    assert abs(ckks.mean - twin.mean) <= 0.05
