"""The lazily relinearized Gram (``ckks_lazy``) against TenSEAL's per-product path and the exact Gram.

Real TenSEAL ciphertexts under the ``stats`` preset; hypothesis draws the number of clients, the
chunks and the magnitudes (up to 2**12 per entry, i.e. inner products far beyond 2**19, which
would wrap at a lower level: the lazy path must keep the level and headroom of the TenSEAL one).
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securefml.errors import ConfigError
from securefml.protocols.ckks_keys import PRESETS
from securefml.protocols.ckks_lazy import lazy_available, lazy_inner_products
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
