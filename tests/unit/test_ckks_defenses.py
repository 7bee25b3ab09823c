"""Geometry-only robust rules from the catalog run under CKKS and agree with their plaintext runs."""

from __future__ import annotations

import itertools

import pytest
import torch

from securefml.defenses import make_defense
from securefml.protocols.base import ClientUpdate
from securefml.protocols.ckks import CKKS
from securefml.protocols.ckks_stats import sum_error_bound
from securefml.protocols.plaintext import Plaintext
from securefml.updates import LayerLayout

ROUNDS = itertools.count()  # the key holder decrypts each round once: every run gets its own round
LAYOUT = LayerLayout([("a.weight", (20, 50)), ("a.bias", (20,)), ("b.weight", (5, 20))])


@pytest.fixture(scope="module")
def proto() -> CKKS:
    return CKKS(preset="stats")


@pytest.fixture(scope="module")
def updates() -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, LAYOUT.numel, generator=g)
    x[5] *= -8  # one outlier the rules should resist
    return [ClientUpdate(i, x[i], LAYOUT.layer_names, float(1 + i % 3)) for i in range(6)]


@pytest.mark.parametrize("spec", ["multikrum:f=1,m=3", "multikrum:f=1", "normbound", "geomed"])
def test_rule_under_ckks_matches_plaintext(proto, updates, spec):
    enc = proto.run_round(next(ROUNDS), updates, LAYOUT, defense=make_defense(spec))
    plain = Plaintext().run_round(0, updates, LAYOUT, defense=make_defense(spec))
    assert enc.extras["mode"] == "gram"
    assert enc.flagged == plain.flagged
    max_abs = max(float(u.vector.abs().max()) for u in updates)
    assert torch.allclose(enc.aggregate, plain.aggregate, atol=10 * sum_error_bound(len(updates), max_abs))


def test_flame_noise_is_added_to_the_decrypted_aggregate(proto, updates):
    from securefml.defenses import FLAME

    quiet = proto.run_round(next(ROUNDS), updates, LAYOUT, defense=FLAME(noise=0.0))
    noisy = proto.run_round(next(ROUNDS), updates, LAYOUT, defense=FLAME(noise=0.5),
                            context={"generator": torch.Generator().manual_seed(1)})
    std = noisy.defense.info["noise_std"]
    assert std > 0 and noisy.flagged == quiet.flagged
    diff = noisy.aggregate - quiet.aggregate
    assert abs(float(diff.std()) / std - 1.0) < 0.1  # 1,005 entries: the sample std is within 10%
