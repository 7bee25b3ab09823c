"""Security and correctness claims of the CKKS protocol, as hypothesis properties.

* the decrypted weighted aggregate equals the plaintext per-layer weighted mean within the
  documented CKKS bound (``sum_error_bound``), for any layer shapes, weights and subsets;
* the decrypted Gram equals the plaintext Gram within ``inner_product_error_bound``;
* every truncation or byte flip of a message is either rejected with a typed error naming
  the sender or accepted, and never stops the round for the other clients.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from securefml.defenses.mean import Mean
from securefml.gram import Gram
from securefml.protocols.base import ClientUpdate, Transport, weighted_layer_mean
from securefml.protocols.ckks_stats import PackingFrame, inner_product_error_bound, sum_error_bound
from securefml.testing.defense_checks import GramWeightedMean
from securefml.testing.layered import layer_layouts, layered_updates
from securefml.updates import LayerLayout

ROUNDS = itertools.count(1)
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])





def announced_survivors(updates, policy):
    """The clients the server keeps at the announcement stage: while more than ``min_contributors``
    announced, the largest announcement is rejected as long as it carries more than ``max_share`` of
    the round's weight or leaves fewer than ``min_contributors`` shares above ``negligible_share``
    (docs/ckks.md, "One announced weight cannot deny the round"); ties go to the first announced."""
    kept = list(updates)
    while len(kept) > policy.min_contributors:
        total = sum(u.weight for u in kept)
        counted = sum(u.weight / total >= policy.negligible_share for u in kept)
        top = max(kept, key=lambda u: u.weight)
        if counted >= policy.min_contributors and top.weight / total <= policy.max_share_bound + 1e-12:
            break
        kept.remove(top)
    return kept


def plaintext_mean(layout, updates, policy):
    """The per-layer weighted mean of the clients kept at the announcement stage, with the layers the
    key holder's policy refuses withheld (a layer shares a CKKS chunk with its neighbours, so a refused
    layer also withholds those it shares one with)."""
    updates = announced_survivors(updates, policy)
    agg, totals = weighted_layer_mean(
        layout, [u.vector for u in updates], [u.layers for u in updates], [u.weight for u in updates]
    )
    counts = {n: sum(n in u.layers for u in updates) for n in layout.layer_names}
    norm = sum(u.weight for u in updates)
    frame = PackingFrame(layout, [n for n in layout.layer_names if counts[n] >= policy.min_contributors], 4096)
    refused = {n for n in frame.layers
               if policy.violation({u.client_id: u.weight / norm for u in updates if n in u.layers}) is not None}
    withheld = {k for k in range(frame.n_chunks) if set(frame.layers_in_chunk(k)) & refused}
    for name, s in layout.slices().items():
        a, b = frame.spans.get(name, (0, 0))
        chunks = set(range(a // 4096, (b - 1) // 4096 + 1)) if b > a else set()
        if counts[name] < policy.min_contributors or chunks & withheld:
            agg[s] = 0
            totals[name] = 0.0
    return agg.to(torch.float64), totals


@SETTINGS
@given(layer_layouts(max_layers=4, max_layer_size=2500), st.data())
def test_weighted_aggregate_within_ckks_bound(add_proto, layout, data):
    updates = data.draw(layered_updates(layout, st.integers(1, 5), scale=data.draw(st.sampled_from([0.01, 1.0, 30.0]))))
    out = add_proto.run_round(next(ROUNDS), updates, layout, defense=Mean())
    expected, totals = plaintext_mean(layout, updates, add_proto.policy)
    assert out.layer_weight == pytest.approx(totals)
    kept = announced_survivors(updates, add_proto.policy)
    norm = sum(u.weight for u in kept)
    max_abs = max(float(u.vector.abs().max()) for u in kept)
    got = out.aggregate.to(torch.float64)
    for name, s in layout.slices().items():
        if totals[name] == 0:
            assert torch.all(got[s] == 0)
            continue
        m = sum(name in u.layers for u in kept)
        bound = sum_error_bound(m, max_abs) * norm / totals[name] + 1e-6 * max(1.0, max_abs)  # + float32 rounding
        assert float((got[s] - expected[s]).abs().max()) <= bound


@SETTINGS
@given(layer_layouts(max_layers=3, max_layer_size=2000), st.data())
def test_decrypted_gram_and_weighted_sum_within_bound(stats_proto, layout, data):
    updates = data.draw(layered_updates(layout, st.integers(2, 4), same_layers=True))
    layers = updates[0].layers
    reference = torch.randn(layout.numel, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    out = stats_proto.run_round(next(ROUNDS), updates, layout, defense=GramWeightedMean(), reference=reference)
    x = torch.stack([u.vector for u in updates]).to(torch.float64)
    exact = Gram.from_updates(x, reference=layout.gather(reference, layers))
    gram = out.extras["gram"]
    max_abs = max(float(x.abs().max()), float(reference.abs().max()))
    bound = inner_product_error_bound(x.shape[1], max_abs)
    assert float((gram.inner - exact.inner).abs().max()) <= bound
    assert float((gram.reference - exact.reference).abs().max()) <= bound
    w = torch.tensor([u.weight for u in updates], dtype=torch.float64)
    refusal = stats_proto.policy.violation({u.client_id: float(wi) for u, wi in zip(updates, w / w.sum())})
    assert out.extras.get("policy_refused") == refusal  # asked for only when the key holder would agree
    if refusal is not None:
        assert torch.all(out.aggregate == 0) and all(v == 0 for v in out.layer_weight.values())
        return
    expected = layout.scatter(((w / w.sum())[:, None] * x).sum(0), layers)
    tol = sum_error_bound(len(updates), max_abs) + 1e-6 * max(1.0, max_abs)
    assert float((out.aggregate.to(torch.float64) - expected).abs().max()) <= tol


class Mutate(Transport):
    def __init__(self, target, fn):
        self.target, self.fn = target, fn

    def deliver(self, sender, stage, data):
        return self.fn(data) if sender == self.target else data


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(["truncate", "flip", "extend"]),
    st.floats(0, 1, exclude_max=True),
    st.integers(1, 255),
)
@example(how="flip", where=0.875, xor=65)  # the announced weight becomes ~1e303 (found by hypothesis)
def test_tampered_message_is_rejected_by_name_or_harmless(add_proto, how, where, xor):
    layout = LayerLayout([("l0.w", (40, 50)), ("l1.w", (30,))])
    g = torch.Generator().manual_seed(0)
    ups = [ClientUpdate(i, torch.randn(layout.numel, generator=g), layout.layer_names, 1.0) for i in range(3)]

    def fn(data: bytes) -> bytes:
        pos = int(where * len(data))
        if how == "truncate":
            return data[:pos]
        if how == "extend":
            return data + bytes([xor]) * (pos % 64 + 1)
        return data[:pos] + bytes([data[pos] ^ xor]) + data[pos + 1 :]

    out = add_proto.run_round(next(ROUNDS), ups, layout, defense=Mean(), transport=Mutate(1, fn))
    assert {0, 2} <= set(out.accepted)
    if how in ("truncate", "extend"):
        assert set(out.rejected) == {1}
    for sender, reason in out.rejected.items():
        assert sender == 1 and f"sender {sender}" in reason
    honest = weighted_layer_mean(layout, [ups[0].vector, ups[2].vector], [layout.layer_names] * 2, [1.0, 1.0])[0]
    if 1 in out.rejected:
        assert torch.allclose(out.aggregate, honest, atol=1e-4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.floats(1e-300, 1e300), st.booleans())
@example(weight=2.7e303 / 10, drops_at_update=True)
@example(weight=600.0, drops_at_update=False)  # share 0.997: above max_share, every other share non-negligible
@example(weight=1.9, drops_at_update=True)  # accepted at announce (share 0.49), then silent
def test_a_client_announcing_any_weight_cannot_withhold_the_honest_round(add_proto, weight, drops_at_update):
    """Client 1 announces any weight, then uploads or goes silent: clients 0 and 2 still get their mean.

    A weight that dwarfs the others would leave every honest share below the key holder's
    ``negligible_share`` or put client 1 above ``max_share``, and the key holder would refuse the
    round: the server rejects such an announcement by name before anyone encrypts.  A client
    accepted at the announcement that then drops leaves the honest prescales smaller than they
    would be without it; the round's declared error bound grows by that factor.
    """
    layout = LayerLayout([("l0.w", (40, 50)), ("l1.w", (30,))])
    g = torch.Generator().manual_seed(1)
    ups = [ClientUpdate(i, torch.randn(layout.numel, generator=g), layout.layer_names, w)
           for i, w in enumerate([1.0, weight, 1.0])]
    out = add_proto.run_round(next(ROUNDS), ups, layout, defense=Mean(),
                              transport=SilentAt(1, "update") if drops_at_update else Transport())
    assert {0, 2} <= set(out.accepted)
    assert out.extras["withheld_layers"] == ()
    kept = [u for u in ups if u.client_id in out.accepted]
    expected = weighted_layer_mean(layout, [u.vector for u in kept], [layout.layer_names] * len(kept),
                                   [u.weight for u in kept])[0]
    max_abs = float(torch.stack([u.vector for u in ups]).abs().max())
    assert float((out.aggregate - expected).abs().max()) <= out.extras["error_bound"] * (1 + max_abs) + 1e-5
    for sender, reason in out.rejected.items():
        assert sender == 1 and f"sender {sender}" in reason


class SilentAt(Transport):
    """One client's message of one stage never arrives."""

    def __init__(self, sender, stage):
        self.sender, self.stage = sender, stage

    def deliver(self, sender, stage, data):
        return None if (sender, stage) == (self.sender, self.stage) else data
