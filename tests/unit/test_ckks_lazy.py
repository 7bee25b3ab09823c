"""The lazily relinearized Gram (``ckks_lazy``) against TenSEAL's per-product path and the exact Gram.

Real TenSEAL ciphertexts under the ``stats`` preset; hypothesis draws the number of clients, the
chunks and the magnitudes (up to 2**12 per entry, i.e. inner products far beyond 2**19, which
would wrap at a lower level: the lazy path must keep the level and headroom of the TenSEAL one).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tenseal as ts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securefml.errors import ConfigError
from securefml.protocols.ckks_keys import PRESETS
from securefml.protocols.ckks_lazy import lazy_available, lazy_inner_products, low_level_factor
from securefml.protocols.ckks_stats import encrypted_inner_products, inner_product_error_bound

pytestmark = pytest.mark.skipif(not lazy_available(), reason="tenseal.sealapi is not importable")

_P = PRESETS["stats"]


def _context(galois: bool = True) -> ts.Context:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=_P.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(_P.coeff_mod_bit_sizes))
    ctx.global_scale = _P.scale
    if galois:
        ctx.generate_galois_keys()
    return ctx


_SECRET = _context()
_PUBLIC = _SECRET.copy()
_PUBLIC.make_context_public()
_SLOTS = _P.poly_modulus_degree // 2


def _decrypt(v: ts.CKKSVector) -> float:
    v.link_context(_SECRET)
    return float(v.decrypt()[0])


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3),
    chunks=st.integers(1, 3),
    log_mag=st.integers(-6, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_lazy_gram_equals_the_per_product_gram_and_the_exact_one(n, chunks, log_mag, seed):
    rng = np.random.default_rng(seed)
    mag = 2.0**log_mag
    xs = rng.uniform(-mag, mag, size=(n, chunks, _SLOTS))
    xs[:, :, rng.integers(0, _SLOTS, size=64)] = 0.0  # some exact zeros, as padding gives
    cts = [[ts.ckks_vector(_PUBLIC, xs[i, k].tolist()) for k in range(chunks)] for i in range(n)]
    lazy = lazy_inner_products(cts)
    eager = encrypted_inner_products(cts, lazy=False)
    assert set(lazy) == set(eager) == {(i, j) for i in range(n) for j in range(i, n)}
    d = chunks * _SLOTS
    bound = inner_product_error_bound(d, mag)
    for (i, j), ct in lazy.items():
        assert ct.size() == 1
        exact = float(np.dot(xs[i].ravel(), xs[j].ravel()))
        got = _decrypt(ct)
        assert got == pytest.approx(exact, abs=bound)
        assert got == pytest.approx(_decrypt(eager[(i, j)]), abs=bound)


def test_the_default_takes_the_lazy_path_from_two_chunks():
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(2, 2, _SLOTS))
    cts = [[ts.ckks_vector(_PUBLIC, xs[i, k].tolist()) for k in range(2)] for i in range(2)]
    out = encrypted_inner_products(cts)
    # the lazy path keeps SEAL's exact scale after the rescale; TenSEAL resets it to 2**40,
    # which costs it a relative error near 1e-7: the default's error is the lazy one's
    exact = float(np.dot(xs[0].ravel(), xs[1].ravel()))
    assert abs(_decrypt(out[(0, 1)]) - exact) < 1e-3


def test_refuses_unequal_or_empty_chunks_and_contexts_without_keys():
    a = ts.ckks_vector(_PUBLIC, [1.0] * _SLOTS)
    with pytest.raises(ConfigError, match="same chunks"):
        lazy_inner_products([[a], [a, a]])
    with pytest.raises(ConfigError, match="empty"):
        lazy_inner_products([[], []])
    assert lazy_inner_products([]) == {}
    bare = _context(galois=False)
    b = ts.ckks_vector(bare, [1.0] * _SLOTS)
    with pytest.raises(ConfigError, match="Galois"):
        lazy_inner_products([[b, b], [b, b]])


# -- the lower level, with the factor from the decrypted norms (a context with the secret key) ----
def _decrypt_private(v: ts.CKKSVector) -> float:
    return float(v.decrypt()[0])


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    log_mags=st.lists(st.integers(-8, 12), min_size=2, max_size=3),
    chunks=st.integers(1, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_the_lower_level_gram_equals_the_exact_one_for_any_mix_of_norms(log_mags, chunks, seed):
    # norms from 2**-8 to 2**12 per entry in one Gram: factors at both clamps and pairs that
    # stay one level up (sqrt(|u_i|^2 |u_j|^2) above 2**26)
    rng = np.random.default_rng(seed)
    n = len(log_mags)
    xs = np.stack([rng.uniform(-1, 1, size=(chunks, _SLOTS)) * 2.0**m for m in log_mags])
    cts = [[ts.ckks_vector(_SECRET, xs[i, k].tolist()) for k in range(chunks)] for i in range(n)]
    low = lazy_inner_products(cts)
    d = chunks * _SLOTS
    for (i, j), ct in low.items():
        exact = float(np.dot(xs[i].ravel(), xs[j].ravel()))
        bound = inner_product_error_bound(d, 2.0 ** max(log_mags[i], log_mags[j]))
        assert _decrypt_private(ct) == pytest.approx(exact, abs=bound)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    log_mag=st.integers(10, 44),
    spike=st.booleans(),
    sign=st.sampled_from([-1.0, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_client_beyond_the_range_garbles_only_its_own_row(log_mag, spike, sign, seed):
    # The adversary sends entries up to 2**44 (far beyond MAX_ABS: its squared norm wraps the
    # level-1 modulus, so its decrypted norm, and the factor of its pairs, can be anything).
    # The honest pairs' factors come from the honest norms alone: their entries stay exact.
    rng = np.random.default_rng(seed)
    honest = rng.normal(size=(2, 1, _SLOTS)) * 0.05
    if spike:
        bad = np.zeros((1, 1, _SLOTS))
        bad[0, 0, rng.integers(0, _SLOTS)] = sign * 2.0**log_mag
    else:
        bad = sign * rng.uniform(0, 1, size=(1, 1, _SLOTS)) * 2.0**log_mag
    xs = np.concatenate([honest, bad])
    cts = [[ts.ckks_vector(_SECRET, xs[i, 0].tolist())] for i in range(3)]
    low = lazy_inner_products(cts)
    bound = inner_product_error_bound(_SLOTS, 1.0)
    for p in [(0, 0), (0, 1), (1, 1)]:
        exact = float(np.dot(xs[p[0]].ravel(), xs[p[1]].ravel()))
        assert _decrypt_private(low[p]) == pytest.approx(exact, abs=bound)


@given(a=st.floats(allow_nan=True, allow_infinity=True), b=st.floats(allow_nan=True, allow_infinity=True))
def test_the_factor_keeps_every_partial_sum_inside_the_lowest_level(a, b):
    c = low_level_factor(a, b)
    if c is None:
        return
    assert 2.0**-10 <= c <= 2.0**10 and math.log2(c).is_integer()
    # Cauchy-Schwarz: |any partial sum of <u_i, u_j>| <= sqrt(|u_i|^2 |u_j|^2)
    assert c * math.sqrt(abs(a)) * math.sqrt(abs(b)) <= 2.0**16


def test_reading_the_loaded_bytes_gives_the_gram_of_the_re_serialized_vectors() -> None:
    """The key holder passes the bytes it loaded each chunk from: the same SEAL ciphertexts, so the
    same Gram bit for bit as re-serializing every loaded vector (issue 15)."""
    rng = np.random.default_rng(11)
    blobs = [[ts.ckks_vector(_PUBLIC, rng.normal(0, 0.1, _SLOTS).tolist()).serialize() for _ in range(2)]
             for _ in range(3)]
    loaded = [[ts.ckks_vector_from(_SECRET, b) for b in row] for row in blobs]
    plain = lazy_inner_products(loaded)
    fast = lazy_inner_products(loaded, blobs=blobs)
    assert plain.keys() == fast.keys()
    for key in plain:
        assert plain[key].serialize() == fast[key].serialize()
    with pytest.raises(ConfigError):
        lazy_inner_products(loaded, blobs=blobs[:2])
    with pytest.raises(ConfigError):
        lazy_inner_products(loaded, blobs=[row[:1] for row in blobs])
