"""Relevance-weighted Co-LoRA aggregation (``securefml.relevance.hetero_relevance``) and its federation."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.data import make_digits_clusters
from securefml.errors import ConfigError, InvalidUpdateError
from securefml.relevance import (
    CoLoRAMLP,
    HeteroConfig,
    HeteroUpload,
    architecture_state,
    cross_share,
    relevance_aggregate_heterogeneous,
    relevance_weights,
    restricted_rows,
    run_heterogeneous,
    shared_state,
)

SHAPES = {"32": (32,), "64": (64,), "64x64": (64, 64)}


def _uploads(archs: list[str], seed: int) -> list[HeteroUpload]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, a in enumerate(archs):
        m = CoLoRAMLP(8, SHAPES[a], 3, rank=2, family_seed=0)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        out.append(HeteroUpload(a, shared_state(m), architecture_state(m), client_id=i))
    return out


def _weights(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    v = v / v.norm(dim=1, keepdim=True)
    return relevance_weights(v @ v.T, temperature=0.3, include_self=True)


def _effective(uploads: list[HeteroUpload], w: torch.Tensor, share: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows the rule applies: shared part over the candidates, architecture part within the shape."""
    archs = [u.architecture for u in uploads]
    same = torch.tensor([[a == b for b in archs] for a in archs])
    shared_cand = torch.ones_like(same) if share else same
    return restricted_rows(w, shared_cand), restricted_rows(w, same)


archs_strategy = st.lists(st.sampled_from(sorted(SHAPES)), min_size=1, max_size=7)


@settings(max_examples=15, deadline=None)
@given(archs=archs_strategy, seed=st.integers(0, 10_000), share=st.booleans())
def test_effective_weights_are_a_distribution_per_client(archs, seed, share):
    uploads = _uploads(archs, seed)
    w = _weights(len(archs), seed)
    for rows in _effective(uploads, w, share):
        assert bool((rows >= 0).all())
        assert torch.allclose(rows.sum(1), torch.ones(len(archs), dtype=torch.float64))
    # the aggregate is that distribution's mixture: a shape's "last" P equals the row times the stack
    out = relevance_aggregate_heterogeneous(uploads, w, share=share)
    shared_rows, arch_rows = _effective(uploads, w, share)
    stack = torch.stack([u.shared["last.P"].to(torch.float64) for u in uploads])
    for i, (shared_i, arch_i) in enumerate(out):
        expect = torch.einsum("j,jab->ab", shared_rows[i], stack)
        assert torch.allclose(shared_i["last.P"].to(torch.float64), expect, atol=1e-5)
        group = [j for j, u in enumerate(uploads) if u.architecture == uploads[i].architecture]
        b_stack = torch.stack([uploads[j].arch["blocks.last.lora_B"].to(torch.float64) for j in group])
        assert torch.allclose(arch_i["blocks.last.lora_B"].to(torch.float64),
                              torch.einsum("j,jab->ab", arch_rows[i, group], b_stack), atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(archs=archs_strategy, seed=st.integers(0, 10_000), share=st.booleans(), data=st.data())
def test_per_client_aggregates_are_permutation_equivariant(archs, seed, share, data):
    uploads = _uploads(archs, seed)
    w = _weights(len(archs), seed)
    perm = data.draw(st.permutations(range(len(archs))))
    p = torch.tensor(perm)
    out = relevance_aggregate_heterogeneous(uploads, w, share=share)
    out_p = relevance_aggregate_heterogeneous([uploads[i] for i in perm], w[p][:, p], share=share)
    for k, i in enumerate(perm):
        for mine, theirs in zip(out[i], out_p[k]):
            assert mine.keys() == theirs.keys()
            for n in mine:
                assert torch.allclose(mine[n], theirs[n], atol=1e-6), n


def test_shared_part_pools_across_shapes_only_when_sharing():
    uploads = _uploads(["32", "64", "64x64"], 1)
    w = torch.full((3, 3), 1 / 3, dtype=torch.float64)
    shared, _ = relevance_aggregate_heterogeneous(uploads, w, share=True)[0]
    alone, arch = relevance_aggregate_heterogeneous(uploads, w, share=False)[0]
    mean = sum(u.shared["last.P"] for u in uploads) / 3
    assert torch.allclose(shared["last.P"], mean, atol=1e-6)
    assert torch.equal(alone["last.P"], uploads[0].shared["last.P"])  # the only 32-wide client
    assert torch.equal(arch["blocks.first.lora_A"], uploads[0].arch["blocks.first.lora_A"])
    assert set(shared) == {"first.P", "first.Q", "last.P", "last.Q"}  # the 32-wide network's two blocks


def test_bad_weights_and_uploads_are_refused_naming_the_client():
    uploads = _uploads(["32", "64"], 2)
    with pytest.raises(ConfigError, match=r"\[2, 2\]"):
        relevance_aggregate_heterogeneous(uploads, torch.ones(3, 3), share=True)
    with pytest.raises(ConfigError, match="non-negative"):
        relevance_aggregate_heterogeneous(uploads, -torch.ones(2, 2), share=True)
    with pytest.raises(ConfigError, match="no uploads"):
        relevance_aggregate_heterogeneous([], torch.ones(0, 0), share=True)
    bad = dict(uploads[1].shared)
    bad["last.P"] = bad["last.P"].clone().fill_(float("nan"))
    with pytest.raises(InvalidUpdateError) as err:
        relevance_aggregate_heterogeneous([uploads[0], HeteroUpload("64", bad, uploads[1].arch, client_id=7)],
                                          torch.ones(2, 2) / 2, share=True)
    assert err.value.sender == 7
    with pytest.raises(ConfigError, match="temperature"):
        HeteroConfig(relevance=True, temperature=0.0)


def test_architectures_per_group_puts_every_shape_in_every_group():
    data = make_digits_clusters(seed=0, groups=4, n_train=32, n_heldout=24, k_shot=1, query=1,
                                architectures="32,64,64x64", architecture_shares=[0.125, 0.3125, 0.5625],
                                heldout_architecture_shares=[1, 1, 1], architectures_per_group=True)
    train = Counter(zip(data.groups, data.architectures))
    assert all(train[(g, (32,))] == 1 and train[(g, (64,))] == 3 and train[(g, (64, 64))] == 4 for g in range(4))
    held = Counter(zip(data.heldout_groups, data.heldout_architectures))
    assert all(held[(g, s)] == 2 for g in range(4) for s in ((32,), (64,), (64, 64)))


def test_relevance_federation_beats_the_plain_mean_when_tasks_conflict():
    data = make_digits_clusters(seed=3, groups=2, n_train=8, n_heldout=8, k_shot=2, query=3,
                                architectures="32,64", heldout_architecture_shares=[1, 1], architectures_per_group=True)
    base = dict(rounds=6, clients_per_round=8, local_steps=5, finetune_steps=0, rank=4, seed=3)
    plain = run_heterogeneous(data, HeteroConfig(**base))
    rela = run_heterogeneous(data, HeteroConfig(**base, relevance=True, temperature=0.2))
    assert rela.mean > plain.mean + 0.1


# -- evidence-gated sharing (own_evidence) -------------------------------------------------------------


def _gated(uploads: list[HeteroUpload], w: torch.Tensor, m: float) -> torch.Tensor:
    """The rows evidence-gated sharing applies to the shared part, from the definition in the docstring."""
    archs = [u.architecture for u in uploads]
    same = torch.tensor([[a == b for b in archs] for a in archs])
    own = restricted_rows(w, same)
    n_own = 1.0 / (own * own).sum(1)
    lam = ((m - n_own) / (m - 1)).clamp(0, 1)
    return lam[:, None] * restricted_rows(w, torch.ones_like(same)) + (1 - lam[:, None]) * own


@settings(max_examples=15, deadline=None)
@given(archs=archs_strategy, seed=st.integers(0, 10_000), m=st.floats(1.01, 6.0))
def test_evidence_gated_rows_are_distributions_and_the_aggregate_their_mixture(archs, seed, m):
    uploads = _uploads(archs, seed)
    w = _weights(len(archs), seed)
    rows = _gated(uploads, w, m)
    assert bool((rows >= 0).all())
    assert torch.allclose(rows.sum(1), torch.ones(len(archs), dtype=torch.float64))
    out = relevance_aggregate_heterogeneous(uploads, w, share=True, own_evidence=m)
    stack = torch.stack([u.shared["last.P"].to(torch.float64) for u in uploads])
    for i, (shared_i, _) in enumerate(out):
        assert torch.allclose(shared_i["last.P"].to(torch.float64), torch.einsum("j,jab->ab", rows[i], stack),
                              atol=1e-5)
    # the architecture part does not depend on the gate
    for (_, a_gated), (_, a_plain) in zip(out, relevance_aggregate_heterogeneous(uploads, w, share=True)):
        assert all(torch.equal(a_gated[k], a_plain[k]) for k in a_plain)


@settings(max_examples=10, deadline=None)
@given(archs=archs_strategy, seed=st.integers(0, 10_000), m=st.floats(1.01, 6.0), data=st.data())
def test_evidence_gated_aggregates_are_permutation_equivariant(archs, seed, m, data):
    uploads = _uploads(archs, seed)
    w = _weights(len(archs), seed)
    perm = data.draw(st.permutations(range(len(archs))))
    p = torch.tensor(perm)
    out = relevance_aggregate_heterogeneous(uploads, w, share=True, own_evidence=m)
    out_p = relevance_aggregate_heterogeneous([uploads[i] for i in perm], w[p][:, p], share=True, own_evidence=m)
    for k, i in enumerate(perm):
        for n in out[i][0]:
            assert torch.allclose(out[i][0][n], out_p[k][0][n], atol=1e-6), n


def test_evidence_gate_keeps_own_part_with_evidence_and_takes_the_cross_part_alone():
    # clients 0, 1, 2 are 64x64 and equally relevant to each other; client 3 is the only 32-wide one
    uploads = _uploads(["64x64", "64x64", "64x64", "32"], 4)
    w = torch.full((4, 4), 0.25, dtype=torch.float64)
    gated = relevance_aggregate_heterogeneous(uploads, w, share=True, own_evidence=3.0)
    alone = relevance_aggregate_heterogeneous(uploads, w, share=False)
    cross = relevance_aggregate_heterogeneous(uploads, w, share=True)
    for k in gated[0][0]:  # n_own = 3 >= m: the largest group keeps what it would have alone
        assert torch.allclose(gated[0][0][k], alone[0][0][k], atol=1e-6)
    for k in gated[3][0]:  # n_own = 1: the lone 32-wide client takes the whole cross-architecture part
        assert torch.allclose(gated[3][0][k], cross[3][0][k], atol=1e-6)
    assert not torch.allclose(gated[0][0]["last.P"], cross[0][0]["last.P"])
    # halfway: n_own = 3 with m = 5 gives lam = 1/2
    half = relevance_aggregate_heterogeneous(uploads, w, share=True, own_evidence=5.0)
    assert torch.allclose(half[0][0]["last.P"], (cross[0][0]["last.P"] + alone[0][0]["last.P"]) / 2, atol=1e-6)
    assert torch.allclose(cross_share(w, torch.tensor([[True] * 3 + [False]] * 3 + [[False] * 3 + [True]]), 5.0),
                          torch.tensor([0.5, 0.5, 0.5, 1.0], dtype=torch.float64))


def test_own_evidence_must_exceed_one():
    with pytest.raises(ConfigError, match="own_evidence"):
        HeteroConfig(relevance=True, own_evidence=1.0)
    with pytest.raises(ConfigError, match="own_evidence"):
        cross_share(torch.ones(2, 2) / 2, torch.ones(2, 2, dtype=torch.bool), 0.5)
