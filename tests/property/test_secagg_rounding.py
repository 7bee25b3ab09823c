"""The stochastic rounding's numpy passes equal the formula computed with Python integers.

Issue 15 moved ``FixedPoint.encode`` (and the threaded masked input, which must equal it word
for word: ``tests/unit/test_secagg_masking.py``) from ``floor(v + r / 2**32)`` in float64 to
``floor((trunc(2**32 v) + r) / 2**32)`` in int64, fewer passes per chunk.  The reference here
takes every step in exact Python arithmetic from the same AES-CTR words: the scaled entry
``v`` (one float64 product, clipped), its truncation, the floor division.  Hypothesis draws the
entries (in and beyond the clip, tiny to huge, negative zero), the weight, the ring size and the
code's size; it also checks the rounding's two guarantees on every entry: ``|q - v| < 1`` and
``q`` is one of the two integers around ``v``.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.protocols.prg import keystream
from securefml.protocols.quantize import FixedPoint


def _reference(fp: FixedPoint, x: np.ndarray, weight: float, seed: bytes) -> list[int]:
    w = min(float(weight), fp.max_weight)
    factor, hi = fp.rounding_factors(w)
    words = keystream(seed, x.size, np.uint32)
    out = []
    for xi, r in zip(x.tolist(), words.tolist(), strict=True):
        v = float(np.float64(xi) * np.float64(factor))  # the one float64 product
        v = min(max(v, -hi), hi)
        q = (math.trunc(v) + r) // 2**32  # exact integers
        out.append(q & fp.mask)
    out.append(int(round(w * fp.weight_scale)) & fp.mask)
    return out


entries = st.one_of(st.floats(-1.5, 1.5, width=32), st.floats(-2.0**-20, 2.0**-20, width=32),
                    st.floats(-2.0**100, 2.0**100, width=32),
                    st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0**-126, 3.4e38, -3.4e38]))


@settings(max_examples=60, deadline=None)
@given(st.lists(entries, min_size=1, max_size=70), st.floats(0.01, 20.0), st.sampled_from([16, 24, 32]),
       st.integers(1, 50), st.binary(min_size=32, max_size=32))
def test_encode_equals_the_integer_formula(xs, weight, bits, n, seed) -> None:  # noqa: ANN001
    fp = FixedPoint(1.0, n, bits, max_weight=8.0)
    x = np.asarray(xs, dtype=np.float32)
    got = fp.encode(x, weight, seed=seed).tolist()
    assert got == _reference(fp, x, weight, seed)
    # the guarantees, entry by entry, on the signed value of each code word
    w = min(weight, fp.max_weight)
    for xi, q in zip(x.tolist(), got[:-1], strict=False):
        v = min(max(float(xi), -fp.clip), fp.clip) * w * fp.scale
        signed = q - (1 << bits) if q >= 1 << (bits - 1) else q
        assert math.floor(v) - 1 <= signed <= math.floor(v) + 1
        assert abs(signed - v) < 1 + 1e-9 * max(1.0, abs(v))
