"""Where DP noise comes from: an AES-256-CTR stream keyed from the operating system.

Why: DP noise protects only if the adversary cannot regenerate it.  Noise drawn from a generator
seeded with the run's published seed (or from torch's Mersenne Twister / Philox streams, which
are predictable from enough output) can be subtracted again.  ``NoiseSource.secure()`` keys an
AES-256 counter-mode keystream with 32 bytes from ``os.urandom`` (the construction of NIST
SP 800-90A's CTR_DRBG, without reseeding); every sample below is a deterministic function of that
keystream, so the samples are as unpredictable as AES-256 is a pseudo-random permutation.

``NoiseSource.seeded(seed)`` derives the key from a public integer instead (SHA-256): the same
samplers, reproducible, for experiments and tests only.  A run gets it only behind the explicit
``PrivacyConfig(insecure_seeded_noise=True)`` (``--dp-insecure-seeded-noise``).

Samplers
--------
- ``uniform``: doubles in the open interval (0, 1) from 53 keystream bits each.
- ``normal``: Box-Muller on those uniforms; ``fp_resistant=True`` returns the sum of four draws
  scaled by 1/2 (the construction of Opacus' ``secure_mode``, Holohan and Braghin 2021, against
  the floating-point attack of Mironov 2012).
- ``bernoulli``: ``u < p``.
- ``poisson``: inversion for ``lam < 10``; Hoermann's transformed rejection (PTRS, 1993, the
  algorithm numpy uses) otherwise.  Both are exact in distribution up to double-precision
  arithmetic; ``lam`` above ``MAX_POISSON_LAM`` is refused, because the acceptance test of PTRS
  subtracts numbers of size ``lam log lam`` and loses its precision there.
- ``skellam``: ``Poisson(v/2) - Poisson(v/2)``, integer noise of variance ``v``.

References
----------
Barker and Kelsey, NIST SP 800-90A Rev. 1 (CTR_DRBG), 2015; Hoermann, The transformed rejection
method for generating Poisson random variables, Insurance: Mathematics and Economics 12, 1993;
Mironov, On significance of the least significant bits for differential privacy, CCS 2012;
Holohan and Braghin, Secure random sampling in differential privacy, ESORICS 2021.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy.special import gammaln

from securefml.errors import ConfigError

__all__ = ["MAX_POISSON_LAM", "NoiseSource"]

#: largest Poisson mean sampled (see the module docstring); Skellam variance up to twice this
MAX_POISSON_LAM = 1e12


class NoiseSource:
    """A stream of DP noise from an AES-256-CTR keystream.

    Use the constructors: ``NoiseSource.secure()`` (key from ``os.urandom``, the default of every
    DP mechanism) or ``NoiseSource.seeded(seed)`` (reproducible, insecure).  ``fork(label)`` gives
    an independent stream (for one client, or one device) keyed from this one.
    """

    def __init__(self, key: bytes, *, is_secure: bool) -> None:
        if len(key) != 32:
            raise ConfigError(f"a noise source needs a 32-byte key, got {len(key)} bytes")
        self._key = key
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self.is_secure = is_secure

    @classmethod
    def secure(cls) -> NoiseSource:
        """A source keyed with 32 bytes from ``os.urandom`` (the default for every DP mechanism)."""
        return cls(os.urandom(32), is_secure=True)

    @classmethod
    def seeded(cls, seed: int) -> NoiseSource:
        """A reproducible (insecure) source keyed by SHA-256 of ``seed``."""
        return cls(hashlib.sha256(b"securefml-dp-noise|" + str(int(seed)).encode()).digest(), is_secure=False)

    def fork(self, label: str) -> NoiseSource:
        """An independent stream keyed from this stream's next 32 bytes and ``label``."""
        key = hashlib.sha256(self._bytes(32) + label.encode()).digest()
        return NoiseSource(key, is_secure=self.is_secure)

    def __repr__(self) -> str:
        return f"NoiseSource({self.kind})"

    @property
    def kind(self) -> str:
        return "os-csprng" if self.is_secure else "seeded (insecure)"

    # -- raw material -------------------------------------------------------------------------
    def _bytes(self, n: int) -> bytes:
        return self._enc.update(bytes(n))

    def uint64(self, n: int) -> np.ndarray:
        return np.frombuffer(self._bytes(8 * n), dtype="<u8").copy()

    def uniform(self, n: int) -> np.ndarray:
        """``n`` doubles uniform on the open interval (0, 1)."""
        return ((self.uint64(n) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    # -- distributions --------------------------------------------------------------------------
    def normal(self, n: int, std: float = 1.0, *, fp_resistant: bool = True) -> np.ndarray:
        """``n`` draws of ``N(0, std^2)`` (float64)."""
        if std < 0 or not math.isfinite(std):
            raise ConfigError(f"noise std must be finite and >= 0, got {std}")
        if fp_resistant:
            total = self._box_muller(n) + self._box_muller(n) + self._box_muller(n) + self._box_muller(n)
            return total * (0.5 * std)
        return self._box_muller(n) * std

    def _box_muller(self, n: int) -> np.ndarray:
        half = (n + 1) // 2
        u1, u2 = self.uniform(half), self.uniform(half)
        r = np.sqrt(-2.0 * np.log(u1))
        out = np.concatenate([r * np.cos(2 * math.pi * u2), r * np.sin(2 * math.pi * u2)])
        return out[:n]

    def normal_tensor(self, shape: torch.Size | tuple[int, ...], std: float, *, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``normal`` shaped as a tensor on ``device`` (drawn on the CPU, then moved)."""
        n = math.prod(shape)
        return torch.from_numpy(self.normal(n, std)).reshape(tuple(shape)).to(device=device, dtype=dtype)

    def bernoulli(self, n: int, p: float) -> np.ndarray:
        """``n`` independent coin flips with success probability ``p`` (bool array)."""
        if not 0 <= p <= 1:
            raise ConfigError(f"a probability must be in [0, 1], got {p}")
        return self.uniform(n) < p

    def poisson(self, n: int, lam: float) -> np.ndarray:
        """``n`` draws of ``Poisson(lam)`` (int64)."""
        if not (lam >= 0 and math.isfinite(lam)):
            raise ConfigError(f"a Poisson mean must be finite and >= 0, got {lam}")
        if lam > MAX_POISSON_LAM:
            raise ConfigError(f"Poisson mean {lam:.3g} exceeds {MAX_POISSON_LAM:.0g}: double precision cannot "
                              "sample it exactly; use a smaller integer scale (see securefml.privacy.distributed)")
        if lam == 0 or n == 0:
            return np.zeros(n, dtype=np.int64)
        return self._poisson_small(n, lam) if lam < 10 else self._poisson_ptrs(n, lam)

    def _poisson_small(self, n: int, lam: float) -> np.ndarray:
        u = self.uniform(n)
        k = np.zeros(n, dtype=np.int64)
        p = math.exp(-lam)
        cdf = np.full(n, p)
        active = u > cdf
        j = 0
        while active.any():
            j += 1
            p *= lam / j
            k[active] += 1
            cdf[active] += p
            active &= u > cdf
            if p == 0.0:  # the remaining mass is below double precision
                break
        return k

    def _poisson_ptrs(self, n: int, lam: float) -> np.ndarray:
        slam, loglam = math.sqrt(lam), math.log(lam)
        b = 0.931 + 2.53 * slam
        a = -0.059 + 0.02483 * b
        invalpha = 1.1239 + 1.1328 / (b - 3.4)
        vr = 0.9277 - 3.6224 / (b - 2)
        out = np.empty(n, dtype=np.int64)
        todo = np.arange(n)
        while todo.size:
            m = todo.size
            u = self.uniform(m) - 0.5
            v = self.uniform(m)
            us = 0.5 - np.abs(u)
            k = np.floor((2 * a / us + b) * u + lam + 0.43)
            quick = (us >= 0.07) & (v <= vr)
            valid = (k >= 0) & ~((us < 0.013) & (v > us))
            with np.errstate(divide="ignore", invalid="ignore"):
                kk = np.where(k >= 0, k, 0.0)
                slow = (np.log(v) + math.log(invalpha) - np.log(a / (us * us) + b)
                        <= -lam + kk * loglam - gammaln(kk + 1))
            ok = quick | (valid & slow)
            out[todo[ok]] = k[ok].astype(np.int64)
            todo = todo[~ok]
        return out

    def skellam(self, n: int, variance: float) -> np.ndarray:
        """``n`` draws of the symmetric Skellam distribution of variance ``variance`` (int64)."""
        if variance < 0 or not math.isfinite(variance):
            raise ConfigError(f"Skellam variance must be finite and >= 0, got {variance}")
        return self.poisson(n, variance / 2) - self.poisson(n, variance / 2)
