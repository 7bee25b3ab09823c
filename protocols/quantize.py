"""Fixed-point encoding of weighted float updates into Z_{2^bits}, with a stated error bound.

Why: masks only cancel in a ring, so SecAgg sums integers modulo ``2**bits``.  A client
clips every entry of its update to ``[-clip, clip]``, multiplies by its weight ``w`` (its
sample count, at most ``max_weight``), scales by ``scale`` and rounds *stochastically*:
``q = floor((trunc(2**32 v) + r) / 2**32)`` with ``v`` the scaled entry computed in float64 and
``r`` a uniform 32-bit word from an AES-256-CTR stream, in exact int64 arithmetic.  Given ``v``,
``E[q] = trunc(2**32 v) / 2**32``: unbiased up to 2**-32 of a unit, error below one unit (the
earlier float64 form ``floor(v + r / 2**32)`` rounded the sum to float64 first; issue 15 moved
to the integer form, which is exact and takes fewer numpy passes).  One
extra coordinate carries the weight itself, rounded to nearest on its own scale, so the
server learns only the *total* weight of the clients in the sum, never a single weight.

Overflow check (the bit budget is picked from ``n``): every rounded entry satisfies
``|q| <= max_weight * clip * scale + 1``, so choosing
``scale = (2**(bits-1-h) - 1 - n) / (n * max_weight * clip)`` (``h = headroom_bits``) keeps
the sum of ``n`` entries inside the signed range ``(-2**(bits-1-h), 2**(bits-1-h))``: the
modular sum decodes exactly to the integer sum.  The weight coordinate uses ``weight_scale``,
the largest power of two at most ``(2**(bits-1-h) - 1 - n) / (n * max_weight)``, the same way
(a power of two, so integer weights such as sample counts decode exactly).

Headroom and the range check (``check_sum``).  The code reserves ``headroom_bits`` (default
1) above what ``n`` in-range inputs can reach: the scales use ``2**(bits-1-headroom_bits)``.  An
honest sum of ``m`` encodings with true total weight ``W`` decodes to a total weight in
``(0, m * max_weight]`` and entries of magnitude at most ``clip * W`` (each up to the rounding
slack below).  Masks are additive, so a client can put *any* ring element in its masked
vector; the server cannot see whose, but ``check_sum`` rejects every decoded sum outside those
bounds with ``AggregateOutOfRange`` (a wrapped entry, e.g. one with ``2**(bits-1)`` added, lands
outside them whatever the other inputs were, thanks to the headroom).  What stays possible:
a client can shift the sum *within* the bounds (up to ``clip * max_weight`` per entry and
``max_weight`` in total weight beyond an honest input); per-client range proofs are future
work, and bucketed mode with a robust rule is the defense against that.

Error bound (``error_bound``): with ``m <= n`` clients in the sum and true total weight
``W``, the decoded weighted sum is off by less than ``m / scale`` per entry and the decoded
total weight by at most ``m / (2 * weight_scale)``, so the weighted mean is off by at most
``(m / scale + clip * m / (2 * weight_scale)) / (W - m / (2 * weight_scale))`` per entry.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from securefml.errors import AggregateOutOfRange, ConfigError, InvalidUpdateError
from securefml.protocols.prg import new_seed

__all__ = ["FixedPoint", "RoundingScratch", "round_chunk"]

_CHUNK = 1 << 15


class RoundingScratch:
    """Reusable buffers of ``round_chunk`` for chunks of up to ``size`` entries (one per thread)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.words = np.empty(size + 4, dtype=np.uint32)  # the rounding words (AES-CTR output)
        self.zeros = memoryview(bytes(size * 4))
        self.tmp = np.empty(size, dtype=np.float64)
        self.acc = np.empty(size, dtype=np.int64)
        ints = self.acc.view(np.int32)
        self.high = ints[1::2] if sys.byteorder == "little" else ints[0::2]  # each int64's high word


def round_chunk(
    xs: np.ndarray,
    factor: float,
    hi: float,
    clip: float,
    keystream_into: Callable[[memoryview, memoryview], object],
    scratch: RoundingScratch,
    out: np.ndarray,
    *,
    sender: int | None = None,
) -> int:
    """Stochastically round one chunk into ``out`` (signed ints of the ring); returns the clipped count.

    ``q = floor((trunc(v) + r) / 2**32)`` with ``v = min(max(factor * x, -hi), hi)`` in float64
    (``factor, hi = FixedPoint.rounding_factors(w)``) and ``r`` the chunk's next 32-bit words
    of ``keystream_into`` (an AES-CTR ``update_into``).  Four numpy passes in the usual case:
    the range check (``min`` and ``max``; a NaN or an infinity makes them non-finite), the product
    computed in float64 and truncated straight into int64, the add of ``r``, the copy of each
    int64's high word (the arithmetic shift by 32).  Entries outside ``[-clip, clip]`` take one
    float64 pass more (clipping the product equals clipping ``x`` first: rounding is monotone).

    Raises
    ------
    InvalidUpdateError
        A NaN or infinite entry (naming ``sender``), before anything is written.
    """
    m = xs.size
    if m > scratch.size:
        raise ConfigError(f"a chunk of {m} entries does not fit scratch buffers of {scratch.size}")
    if m == 0:
        return 0
    lo, up = float(np.minimum.reduce(xs)), float(np.maximum.reduce(xs))  # a NaN propagates to both
    if not (math.isfinite(lo) and math.isfinite(up)):
        raise InvalidUpdateError("update contains NaN or Inf", sender=sender)
    a = scratch.acc[:m]
    clipped = 0
    if lo < -clip or up > clip:
        t = scratch.tmp[:m]
        np.multiply(xs, factor, out=t, dtype=np.float64)
        np.clip(t, -hi, hi, out=t)
        np.copyto(a, t, casting="unsafe")  # trunc toward zero; |t| <= hi < 2**63
        clipped = int(np.count_nonzero(np.abs(xs) > clip))
    else:  # the usual case: product in float64, truncated into int64, one pass
        np.multiply(xs, factor, out=a, dtype=np.float64, casting="unsafe")
    keystream_into(scratch.zeros[: m * 4], scratch.words.view(np.uint8))  # type: ignore[arg-type]
    np.add(a, scratch.words[:m], out=a)  # + r, r uniform on [0, 2**32): no overflow below 2**63
    # the high word is floor((trunc(v) + r) / 2**32); |q| <= budget + 1 < 2**(bits-1), so the
    # signed cast is exact and wraps into the ring
    np.copyto(out, scratch.high[:m], casting="unsafe")
    return clipped


@dataclass(frozen=True)
class FixedPoint:
    """A fixed-point code for sums of at most ``n`` weighted vectors.

    Parameters
    ----------
    clip:
        Every entry is clipped to ``[-clip, clip]`` before scaling.
    n:
        Largest number of clients whose encodings may be summed.
    bits:
        Ring size ``2**bits`` (8..32); entries travel as uint16 when ``bits <= 16``, else uint32.
    max_weight:
        Largest client weight; a larger weight is clipped to it (a bound on one client's influence).
    headroom_bits:
        Bits of the ring left unused by honest sums, so out-of-range sums are detectable
        (``check_sum``); each bit halves the precision.
    """

    clip: float
    n: int
    bits: int = 32
    max_weight: float = 1.0
    headroom_bits: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"clip must be positive and finite, got {self.clip}")
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ConfigError(f"max_weight must be positive and finite, got {self.max_weight}")
        if not 8 <= self.bits <= 32:
            raise ConfigError(f"bits must be in 8..32, got {self.bits}")
        if not 0 <= self.headroom_bits <= 4:
            raise ConfigError(f"headroom_bits must be in 0..4, got {self.headroom_bits}")
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if self.budget <= 0:
            raise ConfigError(f"{self.bits} bits cannot hold the sum of {self.n} clients; use more bits")

    # -- derived constants --------------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.bits <= 16 else np.uint32)

    @property
    def budget(self) -> int:
        """Largest magnitude one rounded entry may take so that n of them never overflow."""
        return (self._top - 1 - self.n) // self.n

    @property
    def _top(self) -> int:
        return 2 ** (self.bits - 1 - self.headroom_bits)

    @property
    def scale(self) -> float:
        return (self._top - 1 - self.n) / (self.n * self.max_weight * self.clip)

    @property
    def weight_scale(self) -> float:
        """A power of two at most ``(2**(bits-1-h) - 1 - n) / (n * max_weight)``.

        A power of two, so integer (and dyadic) weights such as sample counts encode and decode
        exactly; at most half the precision of the largest scale otherwise.
        """
        return 2.0 ** math.floor(math.log2((self._top - 1 - self.n) / (self.n * self.max_weight)))

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1

    def rounding_factors(self, weight: float) -> tuple[float, float]:
        """``(2**32 * w * scale, 2**32 * clip * w * scale)`` for a weight ``w <= max_weight``.

        The stochastic rounding works on ``2**32`` times the scaled entry: both factors are
        the float64 ``w * scale`` and ``clip * w * scale`` times a power of two, so exact scalings
        of them (the same rounding as without the ``2**32``).
        """
        factor = weight * self.scale
        return factor * 2.0**32, self.clip * factor * 2.0**32

    def error_bound(self, m: int, total_weight: float) -> float:
        """Worst-case absolute error per entry of the decoded weighted mean of ``m`` clients."""
        ew = m / (2 * self.weight_scale)
        if total_weight <= ew:
            return math.inf
        return (m / self.scale + self.clip * ew) / (total_weight - ew)

    # -- client side --------------------------------------------------------------------------
    def encode(
        self,
        x: np.ndarray,
        weight: float,
        *,
        seed: bytes | None = None,
        sender: int | None = None,
        out: np.ndarray | None = None,
        chunk_hook: Callable[[np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """``[len(x) + 1]`` ring elements: ``w * clip(x)`` stochastically rounded, then the weight.

        ``seed`` keys the rounding randomness (AES-256-CTR); None draws a fresh one.  ``out``
        receives the result when given; ``chunk_hook`` is called on each encoded chunk of
        ``out`` while it is still in cache (the masking step uses it).
        """
        x = np.asarray(x).reshape(-1)
        if not np.isfinite(weight) or weight <= 0:
            raise InvalidUpdateError(f"weight must be positive and finite, got {weight}", sender=sender)
        w = min(float(weight), self.max_weight)
        if out is None:
            out = np.empty(x.size + 1, dtype=self.dtype)
        elif out.shape != (x.size + 1,) or out.dtype != self.dtype:
            raise ConfigError(f"out must be a [{x.size + 1}] {self.dtype} array")
        factor, hi = self.rounding_factors(w)
        enc = Cipher(algorithms.AES(seed or new_seed()), modes.CTR(bytes(16))).encryptor()
        scratch = RoundingScratch(min(_CHUNK, max(1, x.size)))
        signed = out.view(np.int16 if self.dtype.itemsize == 2 else np.int32)
        for start in range(0, x.size, _CHUNK):
            stop = min(start + _CHUNK, x.size)
            round_chunk(x[start:stop], factor, hi, self.clip, enc.update_into, scratch, signed[start:stop],
                        sender=sender)
            if chunk_hook is not None:
                chunk_hook(out[start:stop])
        out[-1:] = int(round(w * self.weight_scale)) & self.mask
        if chunk_hook is not None:
            chunk_hook(out[-1:])
        if self.bits != 8 * self.dtype.itemsize:
            out &= self.dtype.type(self.mask)
        return out

    # -- server side --------------------------------------------------------------------------
    def decode_sum(self, total: np.ndarray) -> tuple[np.ndarray, float]:
        """The float64 weighted sum and the total weight from the modular sum of encodings."""
        t = np.asarray(total).astype(np.int64) & self.mask
        half = 1 << (self.bits - 1)
        t[t >= half] -= 1 << self.bits
        return t[:-1].astype(np.float64) / self.scale, float(t[-1]) / self.weight_scale

    def check_sum(self, weighted_sum: np.ndarray, total_weight: float, m: int) -> float:
        """Raise ``AggregateOutOfRange`` unless ``m`` in-range encodings can decode to this sum.

        Checks, with the rounding slack of ``m`` encodings: ``0 < total_weight <= m *
        max_weight``; a finite error bound; ``max |entry| <= clip * total_weight``.  Returns
        the error bound.  One pass over the vector (``np.abs(...).max()``), no copy kept.
        """
        if not 1 <= m <= self.n:
            raise AggregateOutOfRange(f"{m} contributors, the code is sized for 1..{self.n}")
        slack_w = m / (2 * self.weight_scale)
        if not (math.isfinite(total_weight) and 0 < total_weight <= m * self.max_weight + slack_w):
            raise AggregateOutOfRange(
                f"decoded total weight {total_weight:.6g} is outside (0, {m} * {self.max_weight:g}]"
            )
        bound = self.error_bound(m, total_weight)
        if not math.isfinite(bound):
            raise AggregateOutOfRange(f"decoded total weight {total_weight:.6g} leaves no finite error bound")
        top = float(np.abs(weighted_sum).max()) if weighted_sum.size else 0.0
        limit = self.clip * (total_weight + slack_w) + m / self.scale
        if not top <= limit:
            raise AggregateOutOfRange(
                f"a decoded entry of magnitude {top:.6g} exceeds what {m} in-range inputs of total weight "
                f"{total_weight:.6g} can produce ({limit:.6g})"
            )
        return bound
