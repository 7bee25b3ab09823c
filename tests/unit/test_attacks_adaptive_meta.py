"""The adaptive (defense-aware) attack and the meta-learning specific attacks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.attacks import (
    IPM,
    Adaptive,
    AttackContext,
    MetaBackdoor,
    MetaSGDLearningRate,
    attack_success_rate,
    defense_deviation,
)
from securefml.data.base import Task
from securefml.defenses import AggregationResult, Defense, Mean
from securefml.errors import ConfigError

SETTINGS = settings(max_examples=15, deadline=None)


class _Median(Defense):
    """Coordinate-wise median (Yin et al. 2018), the robust rule the adaptive attack is tested against."""

    name = "median"

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        return AggregationResult(updates.median(0).values, client_ids)


def _round(seed: int, h: int = 12, m: int = 4, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    honest = 1.0 + torch.randn(h, d, generator=g, dtype=torch.float64)
    own = 1.0 + torch.randn(m, d, generator=g, dtype=torch.float64)
    return honest, own


@SETTINGS
@given(st.integers(0, 10_000), st.sampled_from(["unit", "std", "sign", "ipm"]))
def test_adaptive_beats_every_grid_strength_against_the_defense(seed: int, direction: str) -> None:
    honest, own = _round(seed)
    defense = _Median()
    ctx = AttackContext(round=0, n_clients=16, n_malicious=4, honest_updates=honest, defense=defense)
    attack = Adaptive(direction, grid=10, refine=6)
    out = attack.poison_updates(own, ctx)
    info = ctx.attack_info["adaptive"]
    achieved = defense_deviation(defense, honest, out)
    assert achieved == pytest.approx(info["deviation"])
    for g in torch.logspace(-2, 3, 10, dtype=torch.float64):
        assert achieved >= defense_deviation(defense, honest, attack.rows(honest, float(g), 4)) - 1e-12
    # Against the median it does at least as well as fixed-strength IPM at the paper's two strengths.
    for eps in (0.1, 100.0):
        if direction == "ipm":
            fixed = IPM(eps).poison_updates(own, AttackContext(0, 16, 4, honest_updates=honest))
            assert achieved >= defense_deviation(defense, honest, fixed) - 1e-12


def test_adaptive_against_the_mean_pushes_to_the_largest_strength() -> None:
    honest, own = _round(1)
    ctx = AttackContext(round=0, n_clients=16, n_malicious=4, honest_updates=honest, defense=Mean())
    Adaptive("unit", gamma_max=50.0).poison_updates(own, ctx)
    assert ctx.attack_info["adaptive"]["gamma"] == pytest.approx(50.0, rel=1e-6)


def test_adaptive_needs_a_defense() -> None:
    honest, own = _round(2)
    with pytest.raises(ConfigError, match="defense"):
        Adaptive().poison_updates(own, AttackContext(0, 16, 4, honest_updates=honest))
    with pytest.raises(ConfigError):
        Adaptive(gamma_min=2.0, gamma_max=1.0)


# -- Meta-learning attacks ------------------------------------------------------------------


def _task() -> Task:
    g = torch.Generator().manual_seed(0)
    return Task(1, torch.rand(20, 64, generator=g), torch.randint(0, 10, (20,), generator=g),
                torch.rand(10, 64, generator=g), torch.randint(0, 10, (10,), generator=g), n_classes=10)


def test_meta_backdoor_poisons_both_splits() -> None:
    task = _task()
    attack = MetaBackdoor(target=4, fraction=0.5, value=1.0)
    out = attack.poison_task(task, generator=torch.Generator().manual_seed(0))
    mask = attack.backdoor.mask((64,))
    for split, n in (("support", 20), ("query", 10)):
        x, y = getattr(out, f"{split}_x"), getattr(out, f"{split}_y")
        hit = (x != getattr(task, f"{split}_x")).any(1)
        assert int(hit.sum()) == n // 2
        assert bool((x[hit][:, mask] == 1.0).all()) and bool((y[hit] == 4).all())
    # Its trigger is measured like a plain backdoor's.
    fires = attack_success_rate(lambda b: torch.where((b[:, mask] == 1.0).all(1), 4, 0), task, attack)
    assert fires == 1.0


@SETTINGS
@given(st.integers(0, 10_000), st.floats(1.0, 20.0))
def test_meta_backdoor_boosts_only_the_backdoor_part(seed: int, boost: float) -> None:
    honest, own = _round(seed)
    ctx = AttackContext(round=0, n_clients=16, n_malicious=4, honest_updates=honest)
    out = MetaBackdoor(boost=boost, omniscient=True).poison_updates(own, ctx)
    mu = honest.mean(0)
    assert torch.allclose(out - mu, boost * (own - mu), atol=1e-9)
    plain = MetaBackdoor(boost=boost).poison_updates(own, ctx)
    assert torch.allclose(plain, boost * own)
    clipped = MetaBackdoor(boost=boost, max_norm=0.5).poison_updates(own, ctx)
    assert bool((clipped.norm(dim=1) <= 0.5 + 1e-9).all())


@pytest.mark.parametrize("mode", ["inflate", "deflate", "flip"])
def test_metasgd_lr_poisoning_touches_only_the_learning_rates(mode: str) -> None:
    honest, own = _round(3, d=10)
    lr_mask = torch.zeros(10, dtype=torch.bool)
    lr_mask[5:] = True  # the second half of the vector are the learned inner learning rates
    ctx = AttackContext(round=0, n_clients=16, n_malicious=4, lr_mask=lr_mask)
    out = MetaSGDLearningRate(mode, scale=2.0).poison_updates(own, ctx)
    assert torch.equal(out[:, ~lr_mask], own[:, ~lr_mask])
    expected = {"inflate": torch.full_like(own[:, lr_mask], 2.0), "deflate": torch.full_like(own[:, lr_mask], -2.0),
                "flip": -2.0 * own[:, lr_mask]}[mode]
    assert torch.equal(out[:, lr_mask], expected)
    # Under mean aggregation the learned learning rates move in the attack's direction.
    if mode != "flip":
        agg = torch.cat([honest, out]).mean(0)
        sign = 1 if mode == "inflate" else -1
        assert bool((sign * (agg[lr_mask] - honest.mean(0)[lr_mask]) > 0).all())


def test_metasgd_lr_needs_a_valid_mask() -> None:
    own = torch.zeros(2, 4)
    attack = MetaSGDLearningRate()
    with pytest.raises(ConfigError, match="lr_mask"):
        attack.poison_updates(own, AttackContext(0, 5, 2))
    with pytest.raises(ConfigError):
        attack.poison_updates(own, AttackContext(0, 5, 2, lr_mask=torch.ones(3, dtype=torch.bool)))
    with pytest.raises(ConfigError):
        attack.poison_updates(own, AttackContext(0, 5, 2, lr_mask=torch.zeros(4, dtype=torch.bool)))
    with pytest.raises(ConfigError):
        MetaSGDLearningRate("explode")
