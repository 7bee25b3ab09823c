"""Shamir, mask PRG, fixed-point code and graph derivation behind SecAgg+."""

from __future__ import annotations

import os

import numpy as np
import pytest

from securefml.errors import ConfigError, InvalidUpdateError
from securefml.protocols import prg, shamir
from securefml.protocols.quantize import FixedPoint
from securefml.protocols.secagg_graph import (
    GraphParams,
    bucket_partition,
    derive_parameters,
    hypergeom_tail,
    neighbour_graph,
    round_seed,
)
from securefml.protocols.wire import Envelope, decode, encode, pack_array, unpack_array


def test_p256_is_the_smallest_prime_above_2_256_and_fits_a_32_byte_secret() -> None:
    assert shamir.P256 == 2**256 + 297
    assert pow(3, shamir.P256 - 1, shamir.P256) == 1  # Fermat witness
    secret = b"\xff" * 32
    shares = shamir.split_bytes(secret, 3, [1, 2, 3, 4])
    assert all(len(s) == shamir.SHARE_BYTES == 33 for s in shares)
    assert shamir.reconstruct_bytes(list(zip([2, 3, 4], shares[1:])), 3) == secret


def test_shamir_rejects_bad_parameters() -> None:
    with pytest.raises(ConfigError):
        shamir.split(5, 0, [1, 2])
    with pytest.raises(ConfigError):
        shamir.split(5, 3, [1, 2])
    with pytest.raises(ConfigError):
        shamir.split(5, 2, [1, 1])
    with pytest.raises(ConfigError):
        shamir.split_bytes(b"short", 2, [1, 2])


def test_interpolate_at_recovers_every_share() -> None:
    ys = shamir.split(1234, 3, [1, 2, 3, 4, 5])
    pts = list(zip([1, 2, 3], ys[:3]))
    assert [shamir.interpolate_at(pts, x) for x in [4, 5]] == ys[3:]


def test_keystream_is_deterministic_and_masks_cancel() -> None:
    s1, s2 = os.urandom(32), os.urandom(32)
    assert np.array_equal(prg.keystream(s1, 1000), prg.keystream(s1, 1000))
    assert not np.array_equal(prg.keystream(s1, 1000), prg.keystream(s2, 1000))
    x = np.arange(100_003, dtype=np.uint32)
    y = prg.apply_masks(x.copy(), [s1, s2])
    assert not np.array_equal(x, y)
    prg.apply_masks(y, minus=[s1, s2])
    assert np.array_equal(x, y)


def test_mask_streams_do_not_depend_on_chunking() -> None:
    seed = os.urandom(32)
    a = prg.apply_masks(np.zeros(70_001, np.uint32), [seed], chunk_bytes=1 << 10)
    b = prg.apply_masks(np.zeros(70_001, np.uint32), [seed], chunk_bytes=1 << 20)
    assert np.array_equal(a, b)
    assert np.array_equal(a, prg.keystream(seed, 70_001))
    streams = prg.MaskStreams([seed])
    c = np.zeros(70_001, np.uint32)
    streams.apply(c[:123])
    streams.apply(c[123:])
    assert np.array_equal(a, c)


def test_uniform01_is_in_unit_interval() -> None:
    u = prg.uniform01(os.urandom(32), 10_000)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.02


def test_prg_rejects_short_seeds_and_signed_arrays() -> None:
    with pytest.raises(ConfigError):
        prg.keystream(b"x" * 16, 4)
    with pytest.raises(ConfigError):
        prg.apply_masks(np.zeros(4, np.int32), [os.urandom(32)])


def test_fixed_point_never_overflows_at_the_extremes() -> None:
    fp = FixedPoint(clip=2.0, n=50, bits=32, max_weight=8.0)
    ext = np.full(17, 1e9, np.float32)  # clipped to +clip
    total = np.zeros(18, np.uint32)
    for _ in range(50):
        total += fp.encode(ext, 8.0)
    s, w = fp.decode_sum(total)
    assert w == pytest.approx(400.0, rel=1e-6)
    assert np.allclose(s / w, 2.0, atol=fp.error_bound(50, w))
    total[:] = 0
    for _ in range(50):
        total += fp.encode(-ext, 8.0)
    s, w = fp.decode_sum(total)
    assert np.allclose(s / w, -2.0, atol=fp.error_bound(50, w))


def test_fixed_point_validates_and_names_the_sender() -> None:
    with pytest.raises(ConfigError, match="bits"):
        FixedPoint(clip=1.0, n=2**10, bits=8)
    with pytest.raises(ConfigError):
        FixedPoint(clip=0.0, n=3)
    fp = FixedPoint(clip=1.0, n=3)
    with pytest.raises(InvalidUpdateError, match="client 7"):
        fp.encode(np.array([np.nan], np.float32), 1.0, sender=7)
    with pytest.raises(InvalidUpdateError, match="client 7"):
        fp.encode(np.zeros(3, np.float32), -1.0, sender=7)


def test_sixteen_bit_code_uses_uint16() -> None:
    fp = FixedPoint(clip=1.0, n=10, bits=16, max_weight=1.0)
    q = fp.encode(np.linspace(-1, 1, 9, dtype=np.float32), 1.0)
    assert q.dtype == np.uint16
    s, w = fp.decode_sum(q)
    assert np.allclose(s / w, np.linspace(-1, 1, 9), atol=fp.error_bound(1, w))


def test_derived_parameters_match_the_documented_figures() -> None:
    assert derive_parameters(100, dropout_fraction=0.1) == GraphParams(15, 8)
    assert derive_parameters(100, dropout_fraction=0.1, corrupt_fraction=0.05) == GraphParams(28, 17)
    assert derive_parameters(3, dropout_fraction=0.0) == GraphParams(2, 2)
    with pytest.raises(ConfigError, match="cannot tolerate"):
        derive_parameters(4, dropout_fraction=0.9)
    with pytest.raises(ConfigError):
        GraphParams(4, 2)  # t must exceed k/2


def test_hypergeometric_tail_sums_to_one() -> None:
    assert hypergeom_tail(20, 5, 6, -1) == pytest.approx(1.0)
    assert hypergeom_tail(20, 5, 6, 5) == 0.0


@pytest.mark.parametrize(("n", "k"), [(10, 4), (11, 5), (12, 5), (9, 8), (30, 6)])
def test_graph_is_symmetric_and_regular(n: int, k: int) -> None:
    cohort = list(range(100, 100 + n))
    g = neighbour_graph(cohort, k, round_seed(3, cohort))
    degree = k + 1 if (k % 2 and n % 2 and k < n - 1) else min(k, n - 1)
    for c, nb in g.items():
        assert c not in nb and len(nb) == degree
        assert all(c in g[v] for v in nb)
    assert g == neighbour_graph(cohort, k, round_seed(3, cohort))
    assert g != neighbour_graph(cohort, k, round_seed(4, cohort)) or k >= n - 1


def test_bucket_partition_is_public_and_balanced() -> None:
    cohort = list(range(23))
    seed = round_seed(1, cohort, purpose="buckets")
    parts = bucket_partition(cohort, 5, seed)
    assert sorted(c for p in parts for c in p) == cohort
    assert {len(p) for p in parts} <= {4, 5}
    assert parts == bucket_partition(list(reversed(cohort)), 5, seed)
    with pytest.raises(ConfigError):
        bucket_partition(cohort, 0, seed)


def test_wire_views_and_uint16_arrays() -> None:
    arr = np.arange(10, dtype=np.uint16)
    msg = encode(Envelope("k", 1, 2, {"v": memoryview(np.frombuffer(pack_array(arr), np.uint8))}))
    env = decode(msg, views=("v",))
    assert isinstance(env.field("v"), memoryview)
    assert np.array_equal(unpack_array(env.field("v"), expected_len=10), arr)
    assert isinstance(decode(msg).field("v"), bytes)
