"""The CKKS decode's resolution floor (``zero_floor``) on real TenSEAL ciphertexts.

Claims (``protocols/ckks_stats.py``, *Resolution floor*): entries that are 0 in every upload
decode to exactly 0 on the mean path and on the Gram path's combination; entries decoded at
``|x| >= tau`` are unchanged (the same decryption read with the floor off); the reported error
bound includes tau; a bad floor is a ``ConfigError`` before any key is made; SecAgg's stochastic
rounding already maps 0 to 0 (why plaintext and SecAgg need no floor).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from securefml.defenses.mean import Mean
from securefml.errors import ConfigError
from securefml.protocols.base import ClientUpdate
from securefml.protocols.ckks import CKKS
from securefml.protocols.ckks_stats import apply_zero_floor, check_zero_floor, default_zero_floor, sum_error_bound
from securefml.protocols.quantize import FixedPoint
from securefml.testing.defense_checks import GramWeightedMean
from securefml.updates import LayerLayout

ROUNDS = itertools.count(1)  # the key holder decrypts each round once
LAYOUT = LayerLayout([("a.weight", (30, 100)), ("a.bias", (30,)), ("b.weight", (4, 30))])
TAU = 2.0**-23





def shared_zero_updates(n: int, seed: int = 0) -> tuple[list[ClientUpdate], torch.Tensor]:
    """n clients whose updates are 0 on the same entries (a third of them), random elsewhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, LAYOUT.numel, generator=g) * 0.01
    zero = torch.zeros(LAYOUT.numel, dtype=torch.bool)
    zero[torch.randperm(LAYOUT.numel, generator=g)[: LAYOUT.numel // 3]] = True
    x[:, zero] = 0.0
    return [ClientUpdate(i, x[i], LAYOUT.layer_names, 1.0) for i in range(n)], zero


def collect(proto: CKKS, updates, defense):
    setup = proto.halves_setup(defense)
    revealed, _, halves = proto.collect(next(ROUNDS), updates, LAYOUT, setup=setup)
    return revealed, halves.server


def test_default_floor_is_derived_from_the_scale_and_validated():
    assert default_zero_floor(40) == TAU
    for bad in (-1e-9, float("nan"), float("inf"), "x", None):
        with pytest.raises(ConfigError, match="zero_floor"):
            check_zero_floor(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="zero_floor"):
        CKKS(preset="add-only", zero_floor=-1.0)


def test_apply_zero_floor_keeps_entries_at_or_above_tau_bit_for_bit():
    v = np.array([0.0, TAU / 2, -TAU / 2, np.nextafter(TAU, 0), TAU, -TAU, 3 * TAU, -1.5, 1e-9])
    out = apply_zero_floor(v, TAU)
    assert out.tolist() == [0.0, 0.0, 0.0, 0.0, TAU, -TAU, 3 * TAU, -1.5, 0.0]
    assert apply_zero_floor(v, 0.0).tolist() == v.tolist()
    assert v[1] == TAU / 2  # a copy: the input is untouched


def test_mean_path_shared_zeros_decode_to_exact_zero(add_proto):
    updates, zero = shared_zero_updates(8)
    out = add_proto.run_round(next(ROUNDS), updates, LAYOUT, defense=Mean())
    assert bool(torch.all(out.aggregate[zero] == 0))
    plain = torch.stack([u.vector for u in updates]).to(torch.float64).mean(0)
    bound = out.extras["error_bound"]
    assert bound == pytest.approx(sum_error_bound(8, 1.0) + TAU)  # the floor is in the reported bound
    assert float((out.aggregate.to(torch.float64) - plain).abs().max()) <= bound


def test_without_the_floor_shared_zeros_are_ckks_noise(add_proto):
    """Why the floor exists: the same round with ``zero_floor=0`` leaves noise far below tau on the zeros."""
    updates, zero = shared_zero_updates(8, seed=1)
    revealed, server = collect(add_proto, updates, Mean())
    assert server.zero_floor == TAU  # the default, resolved from the preset's scale
    floored = revealed.mean.to(torch.float64)
    server.zero_floor = 0.0
    raw = server.revealed().mean.to(torch.float64)  # the same decryption, read without the floor
    noise = raw[zero]
    assert int((noise != 0).sum()) > 0.9 * int(zero.sum())
    sigma = float(noise.std())
    assert 1e-10 < sigma < TAU / 8  # the floor sits many noise standard deviations out
    assert float(noise.abs().max()) < TAU / 2  # and above the largest noise (measured: tau / 3.8 at 8 uploads)
    assert bool(torch.all(floored[zero] == 0))
    keep = raw.abs() >= TAU
    assert torch.equal(floored[keep], raw[keep])  # entries at or above tau are unchanged
    assert bool(torch.all(floored[~keep] == 0))


def test_gram_path_combination_shared_zeros_decode_to_exact_zero(stats_proto):
    updates, zero = shared_zero_updates(6, seed=2)
    revealed, server = collect(stats_proto, updates, GramWeightedMean())
    assert revealed.combination is not None
    floored = revealed.combination.clone()
    assert bool(torch.all(floored[zero] == 0))
    server.zero_floor = 0.0
    raw = server.revealed().combination
    assert raw is not None and int((raw[zero] != 0).sum()) > 0  # noise, without the floor
    keep = raw.abs() >= TAU
    assert torch.equal(floored[keep], raw[keep])
    assert bool(torch.all(floored[~keep] == 0))
    plain = torch.stack([u.vector for u in updates]).to(torch.float64).mean(0)
    assert float((floored - plain).abs().max()) <= sum_error_bound(6, 1.0) + TAU


def test_zero_floor_zero_disables_the_floor():
    proto = CKKS(preset="add-only", zero_floor=0)
    updates, zero = shared_zero_updates(4, seed=3)
    out = proto.run_round(next(ROUNDS), updates, LAYOUT, defense=Mean())
    assert int((out.aggregate[zero] != 0).sum()) > 0
    assert out.extras["error_bound"] == pytest.approx(sum_error_bound(4, 1.0))


def test_secagg_stochastic_rounding_maps_zero_to_zero():
    """Plaintext is exact, and SecAgg's fixed-point encoding of 0 is 0 whatever its rounding key."""
    fp = FixedPoint(clip=1.0, n=8)
    x = np.zeros(5000)
    for seed in (bytes(32), bytes(range(32)), None):
        enc = fp.encode(x, 1.0, seed=seed)
        assert not np.any(enc[:-1])
