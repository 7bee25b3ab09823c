"""Coordinate-wise rules under bucketed SecAgg+: the rule runs on the revealed bucket means.

Real SecAgg+ (X25519, AES-CTR masks, Shamir shares) securely sums each random bucket; the
server sees only bucket sums.  TrimmedMean on them must equal TrimmedMean of the plaintext
bucket means of the same buckets, within the protocol's quantization error bound.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securefml.defenses import CoordinateMedian, Krum, TrimmedMean
from securefml.defenses.coordinate import coordinate_median, trimmed_mean
from securefml.protocols.base import ClientUpdate
from securefml.protocols.secagg import SecAggPlus
from securefml.testing.defense_checks import client_updates
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("head.weight", (3, 5)), ("head.bias", (3,))])
D = LAYOUT.numel


def _round(x: torch.Tensor, weights: list[float], rule, size: int, seed: int):
    layers = LAYOUT.canonical(LAYOUT.layer_names)
    ups = [ClientUpdate(100 + i, x[i], layers, weights[i]) for i in range(x.shape[0])]
    proto = SecAggPlus(buckets=size, clip_range=4.0, public_seed=seed.to_bytes(4, "big"))
    return proto.run_round(seed, ups, LAYOUT, defense=rule)


def _plain_bucket_means(x, weights, out):
    members = [out.extras["buckets"][i] for i in out.extras["bucket_index"]]
    rows = []
    for mem in members:
        idx = [c - 100 for c in mem]
        w = torch.tensor([weights[i] for i in idx], dtype=torch.float64)
        rows.append((w[:, None] * x[idx].to(torch.float64)).sum(0) / w.sum())
    return torch.stack(rows), members


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    client_updates(st.integers(8, 12), D, byzantine=2, kinds=("adversarial", "far"), max_offset=0.5, scale=0.5),
    st.integers(0, 2**16),
    st.data(),
)
def test_trimmed_mean_on_secagg_buckets_equals_trimmed_mean_of_bucket_means(batch, seed, data):
    x = batch.updates.clamp(-4.0, 4.0).to(torch.float32)  # the protocol clips to its range
    n = x.shape[0]
    weights = data.draw(st.lists(st.sampled_from([1.0, 2.0, 3.0]), min_size=n, max_size=n))
    out = _round(x, weights, TrimmedMean(1), 2, seed)
    means, members = _plain_bucket_means(x, weights, out)
    assert sorted(c for mem in members for c in mem) == list(range(100, 100 + n))
    agg = LAYOUT.gather(out.aggregate, LAYOUT.layer_names).to(torch.float64)
    bound = out.extras["error_bound"]
    expect = trimmed_mean(means, 1)
    # a per-bucket sum error of `bound` moves a bucket mean by at most bound / (its weight >= 1)
    assert float((agg - expect).abs().max()) <= bound + 1e-6
    assert out.flagged == ()


def test_median_and_geometry_rules_on_secagg_buckets():
    g = torch.Generator().manual_seed(2)
    x = (0.2 * torch.randn(12, D, generator=g)).clamp(-4, 4)
    x[:2] = 3.5  # two Byzantine clients at the clip boundary
    w = [1.0] * 12
    out = _round(x, w, CoordinateMedian(), 3, 7)
    means, _ = _plain_bucket_means(x, w, out)
    agg = LAYOUT.gather(out.aggregate, LAYOUT.layer_names).to(torch.float64)
    assert float((agg - coordinate_median(means)).abs().max()) <= out.extras["error_bound"] + 1e-6
    # a distance rule also runs on bucket means; its flags name buckets, never clients
    out_k = _round(x, w, Krum(0), 3, 7)
    assert out_k.flagged == () and "flagged_buckets" in out_k.extras
