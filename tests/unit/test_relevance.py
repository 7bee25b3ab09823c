"""Relevance-aware aggregation: task vectors, the three protocol paths, the server, Co-LoRA, data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from securefml.client import Client
from securefml.data import DATASETS, load_dataset, make_digits_clusters, parse_architectures
from securefml.defenses import make_defense
from securefml.errors import ConfigError, InvalidUpdateError
from securefml.meta import LEARNERS, MetaConfig
from securefml.models import make_model
from securefml.protocols import CKKS, CKKSKeyHolder, Plaintext, SecAggPlus
from securefml.relevance import (
    CoLoRALinear,
    CoLoRAMLP,
    EncryptedRelevance,
    HeteroUpload,
    RelevanceAggregation,
    RelevanceConfig,
    RelevancePolicy,
    RelevanceServer,
    TaskVectorConfig,
    TaskVectorizer,
    TaskVectorSmoother,
    aggregate_heterogeneous,
    architecture_state,
    block_keys,
    check_upload,
    cosine_similarity,
    load_shared,
    shared_state,
)


@pytest.fixture(scope="module")
def clusters():
    return make_digits_clusters(n_train=16, n_heldout=4, seed=0)


@pytest.fixture(scope="module")
def ckks_relevance():
    return EncryptedRelevance.generate(min_effective=2.0)


def _two_clusters(n: int = 8, k: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(2, k, generator=g)
    tv = torch.stack([centres[i % 2] + 0.05 * torch.randn(k, generator=g) for i in range(n)])
    models = torch.stack([torch.full((10,), 1.0 if i % 2 == 0 else -1.0) + 0.1 * torch.randn(10, generator=g)
                          for i in range(n)])
    return tv, models


# -- data -----------------------------------------------------------------------------------------
def test_digits_clusters_is_registered_and_groups_conflict(clusters):
    assert "digits-clusters" in DATASETS
    assert clusters.groups == tuple(i % 4 for i in range(16))
    perms = clusters.permutations
    assert len(perms) == 4 and all(sorted(p) == list(range(10)) for p in perms)
    assert all(sum(a != b for a, b in zip(p, q)) >= 8 for i, p in enumerate(perms) for q in perms[:i])


def test_digits_clusters_groups_see_permuted_pixels():
    d = make_digits_clusters(n_train=4, n_heldout=0, k_shot=1, query=1, seed=3)
    plain = make_digits_clusters(n_train=4, n_heldout=0, k_shot=1, query=1, seed=3, transform="none")
    assert torch.equal(d.train[0].support_x, plain.train[0].support_x)  # group 0: identity
    assert not torch.equal(d.train[1].support_x, plain.train[1].support_x)
    assert torch.equal(d.train[1].support_x.sort(1).values, plain.train[1].support_x.sort(1).values)
    with pytest.raises(ConfigError):
        make_digits_clusters(transform="rotate")


def test_digits_clusters_shift_and_architectures():
    d = load_dataset("digits-clusters", n_train=8, n_heldout=4, shift_round=3, shift_fraction=0.5,
                     architectures="32,64,64x64", architecture_shares=[0.25, 0.25, 0.5])
    assert len(d.shifted) == 4
    assert all(d.groups_at(3)[cid] == (d.groups[cid] + 1) % 4 for cid, _, _ in d.shifted)
    assert d.groups_at(2) == dict(enumerate(d.groups))
    assert d.architectures.count((64, 64)) == 4 and d.architectures.count((32,)) == 2
    assert parse_architectures("32,64x16") == ((32,), (64, 16))
    with pytest.raises(ConfigError):
        parse_architectures("32,abc")
    with pytest.raises(ConfigError):
        make_digits_clusters(groups=11)


# -- task vectors ---------------------------------------------------------------------------------
def test_gradient_task_vectors_separate_the_groups(clusters):
    model = make_model(clusters, seed=0)
    vec = TaskVectorizer(model, {n: p.detach() for n, p in model.named_parameters()})
    tv = torch.stack([vec(t) for t in clusters.train])
    assert tv.shape == (16, 650)  # last layer of the 64-64 MLP: 10 x 64 weights + 10 biases
    sim = cosine_similarity(tv)
    g = torch.tensor(clusters.groups)
    same = (g[:, None] == g[None, :]) & ~torch.eye(16, dtype=torch.bool)
    across = g[:, None] != g[None, :]
    assert float(sim[same].min()) > float(sim[across].max())


def test_projection_task_vectors_and_noise():
    model = nn.Sequential(nn.Linear(4, 3))
    params = {n: p.detach() for n, p in model.named_parameters()}
    vec = TaskVectorizer(model, params, TaskVectorConfig(method="projection", dim=8), update_numel=15)
    u = torch.randn(15)
    out = vec(None, update=u)  # type: ignore[arg-type]
    assert out.shape == (8,)
    assert torch.allclose(vec(None, update=2 * u), 2 * out)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        TaskVectorizer(model, params, TaskVectorConfig(method="projection", dim=8))
    noisy = TaskVectorizer(model, params, TaskVectorConfig(method="projection", dim=8, noise_std=0.5, clip=1.0),
                           update_numel=15)
    a = noisy(None, update=u, generator=torch.Generator().manual_seed(1))  # type: ignore[arg-type]
    b = noisy(None, update=u, generator=torch.Generator().manual_seed(1))  # type: ignore[arg-type]
    assert torch.equal(a, b) and not torch.allclose(a, out)
    with pytest.raises(ConfigError):
        TaskVectorConfig(method="nope")
    with pytest.raises(ConfigError):
        TaskVectorConfig(smoothing=1.0)


def test_smoother_is_an_exponential_moving_average():
    s = TaskVectorSmoother(0.5)
    assert torch.equal(s(1, torch.tensor([2.0])), torch.tensor([2.0]))
    assert torch.equal(s(1, torch.tensor([0.0])), torch.tensor([1.0]))
    state = s.state_dict()
    t = TaskVectorSmoother(0.5)
    t.load_state_dict(state)
    assert torch.equal(t.get(1), torch.tensor([1.0]))  # type: ignore[arg-type]


# -- the aggregation step -------------------------------------------------------------------------
def test_plaintext_step_aggregates_within_clusters():
    tv, models = _two_clusters()
    step = RelevanceAggregation(RelevanceConfig(temperature=0.2, min_effective=2.0), protocol=Plaintext())
    out = step.aggregate(0, tuple(range(8)), models, [1.0] * 8, tv)
    same = torch.tensor([[i % 2 == j % 2 for j in range(8)] for i in range(8)])
    assert float((out.weights * same).sum(1).min()) > 0.99
    assert torch.allclose(out.global_aggregate, models.mean(0), atol=1e-6)
    assert min(out.effective) >= 2.0 - 1e-6


def test_plaintext_step_names_a_client_with_a_nonfinite_model():
    tv, models = _two_clusters()
    models[3, 0] = float("nan")
    step = RelevanceAggregation(protocol=Plaintext())
    with pytest.raises(InvalidUpdateError, match="client 3"):
        step.aggregate(0, tuple(range(8)), models, [1.0] * 8, tv)


def test_allowed_mask_removes_a_client_from_every_aggregate():
    tv, models = _two_clusters()
    step = RelevanceAggregation(RelevanceConfig(min_effective=1.0), protocol=Plaintext())
    allowed = torch.ones(8, dtype=torch.bool)
    allowed[2] = False
    out = step.aggregate(0, tuple(range(8)), models, [1.0] * 8, tv, allowed=allowed)
    assert torch.all(out.weights[:, 2] == 0)
    assert torch.allclose(out.weights.sum(1), torch.ones(8, dtype=torch.float64))


def test_ckks_needs_a_key_holder_with_a_relevance_policy():
    # a plain DecryptionPolicy would let a per-client combination concentrated on one other
    # client through (no share above 0.5): the key holder itself must check the relevance bound
    with pytest.raises(ConfigError, match="RelevancePolicy"):
        RelevanceAggregation(protocol=CKKS(preset="stats"))
    with pytest.raises(ConfigError, match="statistics preset"):
        EncryptedRelevance(CKKSKeyHolder.generate("add-only", policy=RelevancePolicy()))


def test_ckks_step_matches_the_plaintext_step_with_the_same_weights(ckks_relevance):
    tv, models = _two_clusters(n=6, k=4)
    proto = CKKS(ckks_relevance.key_holder)
    cfg = RelevanceConfig(temperature=0.3, min_effective=2.0, blind=True)
    enc = RelevanceAggregation(cfg, protocol=proto)
    plain = RelevanceAggregation(cfg, protocol=Plaintext()).aggregate(0, tuple(range(6)), models, [1.0] * 6, tv)
    out = enc.aggregate(3, tuple(range(6)), models, [1.0] * 6, tv)
    assert out.client_ids == plain.client_ids and not out.rejected
    assert torch.allclose(out.weights, plain.weights, atol=1e-6)
    assert torch.allclose(out.per_client, plain.per_client, atol=1e-4)
    assert torch.allclose(out.global_aggregate, plain.global_aggregate, atol=1e-4)
    assert all(e >= 2.0 - 1e-6 for e in out.effective)  # the recipient-blind bound, per row
    # within each cluster (rows 0, 2, 4 and 1, 3, 5) the aggregates stay in the cluster
    assert float(out.weights[0, [1, 3, 5]].sum()) < 0.05
    assert out.bytes_uploaded > 0


def test_a_relevance_run_under_ckks_gets_a_key_holder_with_a_relevance_policy(clusters):
    from securefml.relevance.experiment import build_relevance_server

    model = make_model(clusters, seed=0)
    learner = LEARNERS.create("maml", model=model, config=MetaConfig(1, 0.1, 1.0, 1))
    server = build_relevance_server("relevance:min_effective=3", learner, CKKS(preset="stats"), make_defense("mean"),
                                    device="cpu")
    assert server.relevance.encrypted is not None
    policy = server.relevance.encrypted.policy
    assert isinstance(policy, RelevancePolicy) and policy.min_effective == 3
    assert server.protocol is server.relevance.protocol


def test_server_refuses_a_concentrated_row_before_asking_the_key_holder(ckks_relevance):
    enc = ckks_relevance
    ids = (10, 11, 12, 13, 14)
    vectors = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([[0.45, 0.45, 0.04, 0.03, 0.03],   # 10 or 11 would read the other one
                         [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    got = enc.combine(40, ids, vectors, rows, first_slot=1)
    assert 0 in got.refused and "before asking" in got.refused[0]
    rounds = enc.key_holder.state_dict()["rounds"]
    assert str(enc.key_round(40, 1)) not in rounds  # the key holder was never asked for row 0
    assert str(enc.key_round(40, 2)) in rounds
    assert torch.allclose(torch.from_numpy(got.vectors[1]), vectors.double().mean(0), atol=1e-4)


def test_secagg_step_groups_by_relevance_and_sums_each_group():
    _, models = _two_clusters()
    g = torch.Generator().manual_seed(0)
    tv = torch.stack([torch.eye(6)[i % 2] + 0.05 * torch.randn(6, generator=g) for i in range(8)])  # two tasks
    step = RelevanceAggregation(RelevanceConfig(min_effective=2.0), protocol=SecAggPlus(clip_range=4.0))
    out = step.aggregate(0, tuple(range(8)), models, [1.0] * 8, tv)
    assert out.groups is not None
    assert sorted(out.groups) == [(0, 2, 4, 6), (1, 3, 5, 7)]
    for g in out.groups:
        mean = models[list(g)].mean(0)
        for c in g:
            assert torch.allclose(out.row(c), mean, atol=1e-4)
    assert torch.allclose(out.global_aggregate, models.mean(0), atol=1e-4)


def _cluster_of_three_and_a_pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    centres = torch.eye(6)[:2]  # orthogonal tasks: cosine 0 across, about 1 within
    tv = torch.stack([centres[0 if i in (0, 2, 4) else 1] + 0.05 * torch.randn(6, generator=g) for i in range(5)])
    models = torch.stack([torch.full((10,), float(i)) for i in range(5)])
    return tv, models


def test_secagg_fragment_is_not_summed_and_keeps_its_own_models():
    tv, models = _cluster_of_three_and_a_pair()
    step = RelevanceAggregation(RelevanceConfig(min_effective=2.0), protocol=SecAggPlus(clip_range=8.0))
    out = step.aggregate(0, tuple(range(5)), models, [1.0] * 5, tv)
    assert out.groups is not None and sorted(out.groups) == [(0, 2, 4), (1, 3)]
    for c in (0, 2, 4):
        assert torch.allclose(out.row(c), models[[0, 2, 4]].mean(0), atol=1e-4)
    for c in (1, 3):  # the pair is below the minimum group size: not summed, its own model
        assert torch.equal(out.row(c), models[c])
        assert out.weights[out.client_ids.index(c)].tolist() == [float(j == c) for j in out.client_ids]
    assert torch.allclose(out.global_aggregate, models[[0, 2, 4]].mean(0), atol=1e-4)  # the pair is not in it


def test_secagg_without_a_link_threshold_forces_the_pair_into_the_other_task():
    tv, models = _cluster_of_three_and_a_pair()
    step = RelevanceAggregation(RelevanceConfig(min_effective=2.0, group_min_link=None),
                                protocol=SecAggPlus(clip_range=8.0))
    out = step.aggregate(0, tuple(range(5)), models, [1.0] * 5, tv)
    assert out.groups == ((0, 1, 2, 3, 4),)  # fewer than 2 * 3 clients: one group (the earlier rule)


def test_group_min_link_must_be_a_cosine():
    with pytest.raises(ConfigError, match="group_min_link"):
        RelevanceConfig(group_min_link=1.5)


def test_relevance_server_rounds_and_heldout_personalization(clusters):
    model = make_model(clusters, seed=0)
    learner = LEARNERS.create("fedavg", model=model, config=MetaConfig(2, 0.3, 1.0, 1))
    proto = Plaintext()
    server = RelevanceServer(learner, proto, make_defense("mean"),
                             relevance=RelevanceAggregation(protocol=proto),
                             vectorizer=TaskVectorizer(model, learner.init_params()))
    from securefml.attacks import make_attack

    clients = [Client(t, attack=make_attack("signflip") if i == 0 else None) for i, t in enumerate(clusters.train)]
    rec = server.run_round(0, clients[:8], generator=torch.Generator().manual_seed(0))
    assert sorted(server.models) == list(range(8))
    assert rec.extras["aggregation"] == "relevance" and 0 <= rec.extras["malicious_weight"] <= 1
    scores = server.personalize_new(clusters.heldout, steps=1)
    assert len(scores.scores) == 4 and scores.weights is not None and scores.weights.shape == (4, 8)
    assert torch.allclose(scores.weights.sum(1), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ConfigError, match="plaintext"):
        ckks = CKKS(policy=RelevancePolicy(min_effective=2.0))
        RelevanceServer(learner, ckks, make_defense("multikrum:f=1"), relevance=RelevanceAggregation(protocol=ckks),
                        vectorizer=TaskVectorizer(model, learner.init_params()))


# -- Co-LoRA --------------------------------------------------------------------------------------
def test_colora_at_identity_is_plain_lora():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    layer = CoLoRALinear(base, rank=3, alpha=6.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 7)
    assert torch.allclose(layer(x), base(x))  # B = 0: the wrapped layer is the base layer
    with torch.no_grad():
        layer.lora_B.normal_()
    lora = base(x) + (6.0 / 3) * (x @ layer.lora_A.T @ layer.lora_B.T)
    assert torch.equal(layer.P.detach(), torch.eye(3)) and torch.equal(layer.Q.detach(), torch.zeros(1, 3))
    assert torch.allclose(layer(x), lora, atol=1e-6)
    with torch.no_grad():
        layer.Q.fill_(1.0)
    assert not torch.allclose(layer(x), lora, atol=1e-3)
    with pytest.raises(ConfigError):
        CoLoRALinear(nn.Linear(2, 2), rank=0)


def test_colora_shared_part_has_the_same_shape_for_every_architecture():
    shapes = {}
    for hidden in [(32,), (64,), (64, 64), (16, 48, 8)]:
        m = CoLoRAMLP(64, hidden, 10, rank=4)
        shared = shared_state(m)
        for key, v in shared.items():
            shapes.setdefault(key, set()).add(tuple(v.shape))
        assert set(architecture_state(m)) & set(shared) == set()
    assert {k: s for k, s in shapes.items() if k.endswith(".P")} == {
        "first.P": {(4, 4)}, "mid1.P": {(4, 4)}, "mid2.P": {(4, 4)}, "last.P": {(4, 4)}}
    assert all(s == {(1, 4)} for k, s in shapes.items() if k.endswith(".Q"))
    assert block_keys(1) == ("last",) and block_keys(3) == ("first", "mid1", "last")


def test_heterogeneous_aggregation_shares_p_q_across_and_a_b_within():
    small, wide, deep = CoLoRAMLP(64, (32,), 10, rank=2), CoLoRAMLP(64, (64,), 10, rank=2), \
        CoLoRAMLP(64, (64, 64), 10, rank=2)
    for i, m in enumerate((small, wide, deep)):
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(float(i))
    ups = [HeteroUpload(a, shared_state(m), architecture_state(m)) for a, m in
           (("32", small), ("64", wide), ("64x64", deep))]
    shared, arch = aggregate_heterogeneous(ups, share=True)
    assert torch.allclose(shared["32"]["first.P"], torch.full((2, 2), 1.0))  # mean of 0, 1, 2
    assert torch.allclose(shared["64x64"]["mid1.P"], torch.full((2, 2), 2.0))  # only the deep net has mid1
    assert torch.allclose(arch["64"]["blocks.first.lora_A"], torch.full((2, 64), 1.0))
    alone, _ = aggregate_heterogeneous(ups, share=False)
    assert torch.allclose(alone["32"]["first.P"], torch.zeros(2, 2))
    load_shared(small, shared["32"])
    assert torch.allclose(small.blocks["first"].P, torch.full((2, 2), 1.0))
    with pytest.raises(ConfigError, match="ranks"):
        aggregate_heterogeneous([ups[0], HeteroUpload("r3", shared_state(CoLoRAMLP(64, (8,), 10, rank=3)),
                                                      architecture_state(CoLoRAMLP(64, (8,), 10, rank=3)))])


def test_per_architecture_sharing_counts_every_shape_the_same():
    small, wide = CoLoRAMLP(64, (32,), 10, rank=2), CoLoRAMLP(64, (64,), 10, rank=2)
    with torch.no_grad():
        for p in small.parameters():
            p.fill_(1.0)
        for p in wide.parameters():
            p.fill_(0.0)
    ups = [HeteroUpload("32", shared_state(small), architecture_state(small))] + \
        [HeteroUpload("64", shared_state(wide), architecture_state(wide)) for _ in range(3)]
    by_client, _ = aggregate_heterogeneous(ups, share=True)
    by_shape, arch = aggregate_heterogeneous(ups, share=True, per_architecture=True)
    assert torch.allclose(by_client["32"]["last.Q"], torch.full((1, 2), 0.25))  # 1 of 4 clients
    assert torch.allclose(by_shape["32"]["last.Q"], torch.full((1, 2), 0.5))  # 1 of 2 shapes
    assert torch.allclose(by_shape["64"]["first.P"], by_shape["32"]["first.P"])
    assert torch.allclose(arch["32"]["blocks.first.lora_A"], torch.ones(2, 64))  # within its group only


def test_a_non_finite_upload_is_refused_naming_its_client():
    # the 0.10 collapse: one diverged client's NaN adapter, averaged into the shared P and Q,
    # reached every architecture; now its upload is refused with its id and the others aggregate
    good = CoLoRAMLP(64, (32,), 10, rank=2)
    bad = CoLoRAMLP(64, (64,), 10, rank=2)
    with torch.no_grad():
        bad.blocks["last"].P.fill_(float("nan"))
    up_bad = HeteroUpload("64", shared_state(bad), architecture_state(bad), client_id=7)
    with pytest.raises(InvalidUpdateError, match="client 7") as err:
        check_upload(up_bad)
    assert err.value.sender == 7
    with pytest.raises(InvalidUpdateError, match="client 7"):
        aggregate_heterogeneous([HeteroUpload("32", shared_state(good), architecture_state(good), client_id=1),
                                 up_bad])
    with pytest.raises(InvalidUpdateError, match="weight"):
        check_upload(HeteroUpload("32", shared_state(good), architecture_state(good), weight=float("inf")))


def test_family_initialisation_nests_the_widths():
    small = CoLoRAMLP(64, (32,), 10, rank=4, family_seed=3)
    wide = CoLoRAMLP(64, (64,), 10, rank=4, family_seed=3)
    other = CoLoRAMLP(64, (64,), 10, rank=4, family_seed=4)
    first_s, first_w = small.blocks["first"], wide.blocks["first"]
    assert torch.equal(first_s.base.weight, first_w.base.weight[:32])  # the 32 units are the 64's first 32
    assert torch.equal(first_s.lora_A, first_w.lora_A)  # same input space, same adapter directions
    assert torch.allclose(small.blocks["last"].base.weight * 32**0.5, wide.blocks["last"].base.weight[:, :32] * 64**0.5)
    assert not torch.equal(first_w.base.weight, other.blocks["first"].base.weight)
    x = torch.randn(3, 64)
    assert torch.allclose(first_s(x), first_w(x)[:, :32], atol=1e-6)  # B = 0 at init: plain base layers
    with pytest.raises(ConfigError, match="widths up to"):
        CoLoRAMLP(64, (2048,), 10, family_seed=0)


def test_depth_rule_keys_output_blocks_by_depth_and_keeps_the_family_initialisation():
    assert block_keys(2, match="depth") == ("first", "last1") and block_keys(1, match="depth") == ("last0",)
    assert block_keys(3, match="depth") == ("first", "mid1", "last2")
    one, two = CoLoRAMLP(64, (64,), 10, rank=4, family_seed=5), CoLoRAMLP(64, (64,), 10, rank=4, family_seed=5,
                                                                         match="depth")
    assert torch.equal(one.blocks["last"].lora_A, two.blocks["last1"].lora_A)  # same family draw
    deep = CoLoRAMLP(64, (64, 64), 10, rank=4, match="depth")
    with torch.no_grad():
        deep.blocks["last2"].P.fill_(3.0)
    ups = [HeteroUpload(a, shared_state(m), architecture_state(m)) for a, m in (("64", two), ("64x64", deep))]
    shared, _ = aggregate_heterogeneous(ups, share=True)
    assert torch.equal(shared["64"]["last1.P"], torch.eye(4))  # the deeper output block is not averaged in
    assert torch.equal(shared["64x64"]["last2.P"], torch.full((4, 4), 3.0))
    assert torch.equal(shared["64"]["first.P"], shared["64x64"]["first.P"])  # input blocks still match
    with pytest.raises(ConfigError, match="match"):
        block_keys(2, match="width")


def test_hetero_optimizer_gives_a_its_own_rate():
    from securefml.relevance import HeteroConfig, run_heterogeneous
    from securefml.relevance import hetero as hetero_mod

    seen: list[list[tuple[int, float]]] = []
    real = hetero_mod.torch.optim.Adam

    def spy(groups, lr):
        seen.append([(len(g["params"]), g["lr"]) for g in groups])
        return real(groups, lr=lr)

    mp = pytest.MonkeyPatch()
    mp.setattr(hetero_mod.torch.optim, "Adam", spy)
    try:
        d = make_digits_clusters(n_train=4, n_heldout=2, groups=1, k_shot=1, query=1, architectures="32")
        run_heterogeneous(d, HeteroConfig(rounds=1, clients_per_round=2, local_steps=1, finetune_steps=1, rank=2,
                                          lr=0.01, a_lr=0.002))
    finally:
        mp.undo()
    # two blocks: B (own rate), P and Q (shared rate = lr), A (its own rate)
    assert seen and all(g == [(2, 0.01), (4, 0.01), (2, 0.002)] for g in seen)
    with pytest.raises(ConfigError, match="a_lr"):
        HeteroConfig(a_lr=-1.0)


def test_scoring_several_finetuning_budgets_equals_one_run_per_budget():
    from securefml.relevance import HeteroConfig, run_heterogeneous, run_heterogeneous_budgets

    d = make_digits_clusters(n_train=8, n_heldout=6, groups=1, k_shot=1, query=2, architectures="32,64", seed=3)
    cfg = HeteroConfig(rounds=2, clients_per_round=4, local_steps=2, finetune_steps=3, rank=2)
    scored = run_heterogeneous_budgets(d, cfg, [6, 0, 3, (3, 0.001)])
    assert sorted(scored) == [(0, 0.01), (3, 0.001), (3, 0.01), (6, 0.01)]
    for k in (0, 6):
        assert scored[(k, 0.01)].per_client == run_heterogeneous(
            d, HeteroConfig(**{**cfg.__dict__, "finetune_steps": k})).per_client
    assert scored[(3, 0.01)].per_client == run_heterogeneous(d, cfg).per_client
    slow = run_heterogeneous(d, HeteroConfig(**{**cfg.__dict__, "finetune_lr": 0.001}))
    assert scored[(3, 0.001)].per_client == slow.per_client
    with pytest.raises(ConfigError, match="finetune_steps"):
        run_heterogeneous_budgets(d, cfg, [-1])
    with pytest.raises(ConfigError, match="finetune_lr"):
        HeteroConfig(finetune_lr=0.0)


# -- command line -----------------------------------------------------------------------------------
def test_cli_relevance_aggregation_writes_per_client_and_per_group_results(tmp_path):
    import json

    from securefml.cli import main

    rc = main(["run", "--dataset", "digits-clusters", "--algorithm", "fedavg", "--rounds", "2",
               "--clients-per-round", "4", "--inner-steps", "1", "--aggregation", "relevance:temperature=0.3",
               "--dataset-option", "n_train=8", "--dataset-option", "n_heldout=4",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    m = json.loads((tmp_path / "result.json").read_text())["metrics"]
    assert set(m["relevance"]["per_client"]) == {"8", "9", "10", "11"}
    assert set(m["relevance"]["per_group"]) == {"0", "1", "2", "3"}
    assert set(m["personalized"]["per_group"]) == {"0", "1", "2", "3"}


def test_cli_architectures_reports_shared_and_alone(tmp_path):
    import json

    from securefml.cli import main

    rc = main(["run", "--dataset", "digits-clusters", "--algorithm", "fedavg", "--rounds", "1",
               "--clients-per-round", "6", "--inner-steps", "1", "--architectures", "32,64,64x64",
               "--dataset-option", "n_train=6", "--dataset-option", "n_heldout=3", "--dataset-option", "groups=1",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    het = json.loads((tmp_path / "result.json").read_text())["metrics"]["heterogeneous"]
    assert het["architectures"] == ["32", "64", "64x64"]
    assert set(het["shared"]["per_architecture"]) == {"32", "64", "64x64"}
    assert set(het["alone"]["per_architecture"]) == {"32", "64", "64x64"}


def test_bad_relevance_spec_is_a_config_error():
    from securefml.experiment import RunConfig

    with pytest.raises(ConfigError, match="unknown relevance options"):
        RunConfig(dataset="digits-clusters", aggregation="relevance:temprature=0.2")
    with pytest.raises(ConfigError, match="unknown aggregation"):
        RunConfig(dataset="digits-clusters", aggregation="fancy")


def test_heldout_architecture_shares_are_separate_from_the_training_shares():
    d = make_digits_clusters(n_train=8, n_heldout=6, architectures="32,64", architecture_shares=[0.25, 0.75],
                             heldout_architecture_shares=[1.0, 1.0])
    assert d.architectures.count((32,)) == 2 and d.heldout_architectures.count((32,)) == 3
    same = make_digits_clusters(n_train=8, n_heldout=6, architectures="32,64", architecture_shares=[0.25, 0.75])
    assert same.heldout_architectures.count((32,)) < 3  # default: the training shares


@pytest.mark.parametrize("freeze_a", [False, True])
def test_hetero_optimizer_gets_the_shared_rate_and_no_frozen_factor(monkeypatch, freeze_a):
    from securefml.relevance import HeteroConfig, run_heterogeneous
    from securefml.relevance import hetero as hetero_mod

    seen: list[list[dict]] = []
    real = torch.optim.Adam

    def spy(groups, lr):
        seen.append([{"n": len(g["params"]), "lr": g["lr"]} for g in groups])
        return real(groups, lr=lr)

    monkeypatch.setattr(hetero_mod.torch.optim, "Adam", spy)
    d = make_digits_clusters(n_train=4, n_heldout=2, groups=1, k_shot=1, query=1, architectures="32")
    cfg = HeteroConfig(rounds=1, clients_per_round=2, local_steps=1, finetune_steps=1, rank=2, lr=0.01,
                       shared_lr=0.05, freeze_A=freeze_a)
    res = run_heterogeneous(d, cfg)
    assert set(res.per_architecture) == {"32"}
    # two blocks (first, last): own = A and B per block (B only when A is frozen); shared = P and Q per block
    assert all(g == [{"n": 2 if freeze_a else 4, "lr": 0.01}, {"n": 4, "lr": 0.05}] for g in seen) and seen
    with pytest.raises(ConfigError, match="shared_lr"):
        HeteroConfig(shared_lr=0.0)
