"""Pre-trained frozen backbones for the heterogeneous Co-LoRA federation (``securefml.relevance.pretrain``)."""

from __future__ import annotations

import pytest
import torch

from securefml.data import make_digits_clusters
from securefml.errors import ConfigError
from securefml.relevance import CoLoRAMLP, HeteroConfig, PretrainConfig, pretrain_backbones, run_heterogeneous


def _family(seed: int = 0) -> dict[str, CoLoRAMLP]:
    return {a: CoLoRAMLP(64, s, 10, rank=4, family_seed=seed) for a, s in (("32", (32,)), ("64", (64,)),
                                                                          ("64x64", (64, 64)))}


def _data(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    from securefml.data.digits import load_digits_tensors

    x, y = load_digits_tensors()
    return x[:n], y[:n]


def _accuracy(m: CoLoRAMLP, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((m(x).argmax(1) == y).float().mean())


def test_family_pretraining_keeps_the_shapes_nested_and_learns():
    torch.manual_seed(0)
    models = _family()
    x, y = _data()
    before = {a: _accuracy(m, x, y) for a, m in models.items()}
    adapters = {a: {n: p.detach().clone() for n, p in m.named_parameters() if ".base." not in n}
                for a, m in models.items()}
    losses = pretrain_backbones(models, x, y, PretrainConfig(mode="family", steps=60, lr=0.01, batch_size=64))
    assert set(losses) == set(models) and all(v < 1.0 for v in losses.values())
    for a, m in models.items():
        assert _accuracy(m, x, y) > max(0.8, before[a] + 0.3)
        # the adapters are untouched (B = 0: each block still equals its base)
        assert all(torch.equal(p, adapters[a][n]) for n, p in m.named_parameters() if ".base." not in n)
    small, wide, deep = models["32"].blocks, models["64"].blocks, models["64x64"].blocks
    # one super-network: the 32-wide network is still the first 32 units of the 64-wide one,
    # and every output block is a slice of one matrix
    assert torch.equal(small["first"].base.weight, wide["first"].base.weight[:32])
    assert torch.equal(small["first"].base.bias, wide["first"].base.bias[:32])
    assert torch.equal(wide["first"].base.weight, deep["first"].base.weight)
    assert torch.equal(small["last"].base.weight, wide["last"].base.weight[:, :32])
    assert torch.equal(wide["last"].base.weight, deep["last"].base.weight)


def test_independent_pretraining_trains_each_shape_on_its_own():
    models = _family()
    x, y = _data()
    pretrain_backbones(models, x, y, PretrainConfig(mode="independent", steps=60, lr=0.01, batch_size=64))
    assert all(_accuracy(m, x, y) > 0.8 for m in models.values())
    assert not torch.equal(models["32"].blocks["first"].base.weight, models["64"].blocks["first"].base.weight[:32])


def test_pretraining_is_deterministic_and_none_changes_nothing():
    x, y = _data()
    a, b, c = _family(), _family(), _family()
    cfg = PretrainConfig(mode="family", steps=10, batch_size=32, seed=4)
    pretrain_backbones(a, x, y, cfg)
    pretrain_backbones(b, x, y, cfg)
    assert pretrain_backbones(c, x, y, PretrainConfig(mode="none")) == {}
    fresh = _family()
    for k in a:
        for (n, p), (_, q), (_, r), (_, f) in zip(a[k].named_parameters(), b[k].named_parameters(),
                                                  c[k].named_parameters(), fresh[k].named_parameters()):
            assert torch.equal(p, q), n
            assert torch.equal(r, f), n


def test_bad_pretraining_input_is_a_config_error():
    with pytest.raises(ConfigError, match="pretrain mode"):
        PretrainConfig(mode="imagenet")
    with pytest.raises(ConfigError, match="steps"):
        PretrainConfig(mode="family", steps=-1)
    with pytest.raises(ConfigError, match="pretrain mode"):
        HeteroConfig(pretrain="bogus")
    x, y = _data(20)
    with pytest.raises(ConfigError, match="matching"):
        pretrain_backbones(_family(), x, y[:5], PretrainConfig(mode="family", steps=1))
    plain = {"32": CoLoRAMLP(64, (32,), 10, rank=4)}
    with pytest.raises(ConfigError, match="family-initialised"):
        pretrain_backbones(plain, x, y, PretrainConfig(mode="family", steps=1))
    data = make_digits_clusters(seed=0, groups=1, n_train=6, n_heldout=3, k_shot=1, query=1,
                                architectures="32,64x64")
    with pytest.raises(ConfigError, match="family=True"):
        run_heterogeneous(data, HeteroConfig(rounds=1, clients_per_round=2, local_steps=1, pretrain="family",
                                             family=False))


def test_pretrained_run_uses_only_training_clients_and_beats_the_random_backbone():
    data = make_digits_clusters(seed=1, groups=1, n_train=8, n_heldout=6, k_shot=2, query=3,
                                architectures="32,64", heldout_architecture_shares=[1.0, 1.0])
    base = dict(rounds=2, clients_per_round=4, local_steps=2, finetune_steps=0, rank=4, seed=1)
    random_backbone = run_heterogeneous(data, HeteroConfig(**base))
    pretrained = run_heterogeneous(data, HeteroConfig(**base, pretrain="family", pretrain_steps=60))
    assert pretrained.mean > random_backbone.mean + 0.1
    # shared and alone start from the same backbones: with no round the two runs are identical
    zero = dict(base, rounds=1, clients_per_round=1, local_steps=0)
    s = run_heterogeneous(data, HeteroConfig(**zero, pretrain="family", pretrain_steps=20, share=True))
    a = run_heterogeneous(data, HeteroConfig(**zero, pretrain="family", pretrain_steps=20, share=False))
    assert s.per_client == a.per_client
