"""The recommended default: one rule per protocol, the same decisions under CKKS as in plaintext."""

from __future__ import annotations

import pytest
import torch

from securefml.defenses import (
    BYZANTINE_KEY,
    PREVIOUS_RECOMMENDED_SPEC,
    RECOMMENDED_SPEC,
    BucketReputation,
    Mean,
    MedianClipping,
    Reputation,
    make_defense,
    recommended,
)
from securefml.defenses.base import Composed
from securefml.errors import ConfigError
from securefml.protocols.base import ClientUpdate, Reveals
from securefml.protocols.ckks import CKKS
from securefml.protocols.ckks_stats import sum_error_bound
from securefml.protocols.plaintext import Plaintext
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("a.weight", (8, 16)), ("a.bias", (8,)), ("b.weight", (3, 8))])


def test_one_rule_per_protocol_and_plain_secagg_refused():
    rule = recommended("plaintext")
    assert isinstance(rule, Composed) and isinstance(rule.pre, MedianClipping) and isinstance(rule.rule, Reputation)
    assert rule.pre.history == 10  # the whole cohort is clipped first, then the reputation decides
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
        assert enc.suspected == plain.suspected  # the detector's verdict, not only the capped action
        bound = 10 * sum_error_bound(8, float(x.abs().max()))
        assert torch.allclose(enc.aggregate, plain.aggregate, atol=bound)
    assert enc_rule.rule.flagged_ids() == plain_rule.rule.flagged_ids() == (0, 1)  # the reputation after the clip


def test_median_clipping_has_a_spec_and_needs_no_budget():
    from securefml.defenses import MedianClipping

    rule = make_defense("reputation>>medclip>>mean")
    assert isinstance(rule, Reputation) and isinstance(rule.rule.pre, MedianClipping)
    x = torch.randn(7, 5, dtype=torch.float64)
    x[0] *= 1e6
    out = make_defense("medclip>>mean")(x)  # no f, no federation context: nothing to derive
    norms = x.norm(dim=1).sort().values
    assert float(out.aggregate.norm()) <= float(norms[3]) * (1 + 1e-12)


def _rounds(seed: int, n_rounds: int = 6) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """A small federation: 16 clients, 8 per round, clients 0-3 send 5x sign-flipped updates."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(40, generator=g, dtype=torch.float64)
    out = []
    for _ in range(n_rounds):
        ids = tuple(sorted(torch.randperm(16, generator=g)[:8].tolist()))
        x = 0.3 * common + torch.randn(8, 40, generator=g, dtype=torch.float64)
        for i, c in enumerate(ids):
            if c < 4:
                x[i] = -5.0 * x[i]
        out.append((x, ids))
    return out


def _same_decisions(a, b, seed: int) -> None:
    for x, ids in _rounds(seed):
        ra, rb = a(x, client_ids=ids), b(x, client_ids=ids)
        assert ra.flagged == rb.flagged
        assert torch.equal(ra.aggregate, rb.aggregate)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_relabelled_specs_build_the_measured_compositions(seed):
    """The benchmark cache was relabelled (issue 18): cells measured as ``recommended`` before the
    switch carry ``PREVIOUS_RECOMMENDED_SPEC``, the candidate's cells are the new ``recommended``'s.
    Both relabellings are exact: each spec builds the same composition, bit for bit over rounds."""
    assert repr(make_defense(RECOMMENDED_SPEC)) == repr(recommended("plaintext")) == repr(recommended("ckks"))
    _same_decisions(make_defense(RECOMMENDED_SPEC), recommended("plaintext"), seed)
    _same_decisions(make_defense("recommended"), recommended("ckks"), seed)
    previous = Reputation(MedianClipping() >> Mean())  # the default before the switch, written out
    assert repr(make_defense(PREVIOUS_RECOMMENDED_SPEC)) == repr(previous)
    _same_decisions(make_defense(PREVIOUS_RECOMMENDED_SPEC), Reputation(MedianClipping() >> Mean()), seed)
    # and the two are different rules: the relabelling is not a renaming of one rule
    new, old = recommended("plaintext"), Reputation(MedianClipping() >> Mean())
    assert any(not torch.equal(new(x, client_ids=i).aggregate, old(x, client_ids=i).aggregate)
               for x, i in _rounds(seed))
