"""Fixed-point encoding of weighted float updates into Z_{2^bits}, with a stated error bound.

Why: masks only cancel in a ring, so SecAgg sums integers modulo ``2**bits``.  A client
clips every entry of its update to ``[-clip, clip]``, multiplies by its weight ``w`` (its
sample count, at most ``max_weight``), scales by ``scale`` and rounds *stochastically* in
float64 (``floor(v * scale + u)``, ``u`` uniform on the 2**32-point grid of [0, 1) from an
AES-256-CTR stream: unbiased up to 2**-32 of a unit, error below one unit).  One
extra coordinate carries the weight itself, rounded to nearest on its own scale, so the
server learns only the *total* weight of the clients in the sum, never a single weight.

Overflow check (the bit budget is picked from ``n``): every rounded entry satisfies
``|q| <= max_weight * clip * scale + 1``, so choosing
``scale = (2**(bits-1) - 1 - n) / (n * max_weight * clip)`` keeps the sum of ``n`` entries
inside the signed range ``(-2**(bits-1), 2**(bits-1))``: the modular sum decodes exactly to
the integer sum.  The weight coordinate uses ``weight_scale = (2**(bits-1) - 1 - n) /
(n * max_weight)`` the same way.

Error bound (``error_bound``): with ``m <= n`` clients in the sum and true total weight
``W``, the decoded weighted sum is off by less than ``m / scale`` per entry and the decoded
total weight by at most ``m / (2 * weight_scale)``, so the weighted mean is off by at most
``(m / scale + clip * m / (2 * weight_scale)) / (W - m / (2 * weight_scale))`` per entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from securefml.errors import ConfigError, InvalidUpdateError
from securefml.protocols.prg import new_seed

__all__ = ["FixedPoint"]

_CHUNK = 1 << 15


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
    """

    clip: float
    n: int
    bits: int = 32
    max_weight: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"clip must be positive and finite, got {self.clip}")
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ConfigError(f"max_weight must be positive and finite, got {self.max_weight}")
        if not 8 <= self.bits <= 32:
            raise ConfigError(f"bits must be in 8..32, got {self.bits}")
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
        return (2 ** (self.bits - 1) - 1 - self.n) // self.n

    @property
    def scale(self) -> float:
        return (2 ** (self.bits - 1) - 1 - self.n) / (self.n * self.max_weight * self.clip)

    @property
    def weight_scale(self) -> float:
        return (2 ** (self.bits - 1) - 1 - self.n) / (self.n * self.max_weight)

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1

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
        factor = w * self.scale
        lim = self.clip
        enc = Cipher(algorithms.AES(seed or new_seed()), modes.CTR(bytes(16))).encryptor()
        rnd = np.empty(_CHUNK + 4, dtype=np.uint32)  # 32 random bits per entry for the rounding
        rview = rnd.view(np.uint8)
        zeros = memoryview(bytes(_CHUNK * 4))
        tmp = np.empty(_CHUNK, dtype=np.float64)
        uni = np.empty(_CHUNK, dtype=np.float64)
        signed = out.view(np.int16 if self.dtype.itemsize == 2 else np.int32)
        for start in range(0, x.size, _CHUNK):
            part = x[start : start + _CHUNK]
            m = part.size
            if not np.isfinite(part).all():
                raise InvalidUpdateError("update contains NaN or Inf", sender=sender)
            enc.update_into(zeros[: m * 4], rview)  # type: ignore[arg-type]  # an ndarray is a writable buffer
            t = tmp[:m]
            np.clip(part, -lim, lim, out=t)
            t *= factor
            u = uni[:m]
            np.multiply(rnd[:m], 2.0**-32, out=u)
            t += u
            np.floor(t, out=t)
            # |t| <= budget + 1 < 2**(bits-1): the signed cast is exact and wraps into the ring
            np.copyto(signed[start : start + m], t, casting="unsafe")
            if chunk_hook is not None:
                chunk_hook(out[start : start + m])
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
