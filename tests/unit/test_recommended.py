"""The recommended default: one rule per protocol, the same decisions under CKKS as in plaintext."""

from __future__ import annotations

import pytest
import torch

from securefml.defenses import BYZANTINE_KEY, BucketReputation, Reputation, make_defense, recommended
from securefml.errors import ConfigError
from securefml.protocols.base import ClientUpdate, Reveals
from securefml.protocols.ckks import CKKS
from securefml.protocols.ckks_stats import sum_error_bound
from securefml.protocols.plaintext import Plaintext
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("a.weight", (8, 16)), ("a.bias", (8,)), ("b.weight", (3, 8))])


def test_one_rule_per_protocol_and_plain_secagg_refused():
    assert isinstance(recommended("plaintext"), Reputation)
    assert Reveals.GRAM in recommended("ckks").runs_on
    assert isinstance(recommended("secagg-buckets"), BucketReputation)
    with pytest.raises(ConfigError, match="bucketed"):
        recommended("secagg")
    with pytest.raises(ConfigError, match="choose one of"):
        recommended("carrier-pigeon")
    assert repr(make_defense("recommended:ckks")) == repr(recommended("ckks"))


def test_recommended_under_ckks_makes_the_plaintext_decisions_over_rounds():
    g = torch.Generator().manual_seed(0)
    enc_rule, plain_rule = recommended("ckks"), recommended("plaintext")
    proto = CKKS(preset="stats")
    ctx = {BYZANTINE_KEY: 2}
    common = torch.randn(LAYOUT.numel, generator=g)
    for rnd in range(3):
        x = 0.5 * common + torch.randn(8, LAYOUT.numel, generator=g)
        x[:2] *= -3.0  # two scaled sign flippers
        ups = [ClientUpdate(i, x[i], LAYOUT.layer_names, 1.0) for i in range(8)]
        enc = proto.run_round(rnd, ups, LAYOUT, defense=enc_rule, context=ctx)
        plain = Plaintext().run_round(rnd, ups, LAYOUT, defense=plain_rule, context=ctx)
        assert enc.flagged == plain.flagged
        bound = 10 * sum_error_bound(8, float(x.abs().max()))
        assert torch.allclose(enc.aggregate, plain.aggregate, atol=bound)
    assert enc_rule.flagged_ids() == plain_rule.flagged_ids() == (0, 1)


def test_median_clipping_has_a_spec_and_needs_no_budget():
    from securefml.defenses import MedianClipping

    rule = make_defense("reputation>>medclip>>mean")
    assert isinstance(rule, Reputation) and isinstance(rule.rule.pre, MedianClipping)
    x = torch.randn(7, 5, dtype=torch.float64)
    x[0] *= 1e6
    out = make_defense("medclip>>mean")(x)  # no f, no federation context: nothing to derive
    norms = x.norm(dim=1).sort().values
    assert float(out.aggregate.norm()) <= float(norms[3]) * (1 + 1e-12)
