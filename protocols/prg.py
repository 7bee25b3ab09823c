"""Mask expansion: a 32-byte seed -> a stream of uniform words, by AES-256-CTR.

Why AES-256-CTR: it is a PRF-based PRG keyed by the full 256-bit seed (Flower folds seeds
to 32 bits for numpy's MT19937, which is neither cryptographic nor 256-bit), and with AES-NI
it runs at several GB/s through ``cryptography``'s ``update_into`` into preallocated buffers.
Each seed is fresh per round and per purpose (derived with HKDF by the caller), so the fixed
all-zero counter block never repeats under one key.

Masks are added or subtracted in place modulo ``2**(8*itemsize)`` with numpy's wrapping
unsigned arithmetic, in cache-sized chunks so a vector of millions of entries is read and
written once per mask and never materialised as a separate mask array.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from securefml.errors import ConfigError

__all__ = ["SEED_BYTES", "keystream", "MaskStreams", "apply_masks", "uniform01", "new_seed"]

SEED_BYTES = 32
_ZERO_IV = bytes(16)
CHUNK_BYTES = 1 << 18  # 256 KiB: the keystream chunk stays in L2 while it is added


def new_seed() -> bytes:
    """A fresh 256-bit seed from the OS CSPRNG."""
    return os.urandom(SEED_BYTES)


def _encryptor(seed: bytes):  # noqa: ANN202 - cryptography's context type is private
    if len(seed) != SEED_BYTES:
        raise ConfigError(f"a mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
    return Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()


def keystream(seed: bytes, n: int, dtype: np.dtype | type = np.uint32) -> np.ndarray:
    """``n`` uniform words of ``dtype`` expanded from ``seed`` (the mask of one seed)."""
    dt = np.dtype(dtype)
    out = np.zeros(n + (15 // dt.itemsize) + 1, dtype=dt)
    enc = _encryptor(seed)
    raw = out.view(np.uint8)
    enc.update_into(bytes(n * dt.itemsize), raw)
    return out[:n].copy()


class MaskStreams:
    """The keystreams of several seeds, consumed chunk by chunk in lockstep.

    ``apply(part)`` adds the next ``len(part)`` words of every ``plus`` stream to ``part`` and
    subtracts those of every ``minus`` stream, in place (mod 2^w), so a caller can mask a chunk
    right after producing it, while it is still in cache.
    """

    def __init__(self, plus: Sequence[bytes] = (), minus: Sequence[bytes] = (), *, chunk_bytes: int = CHUNK_BYTES):
        self._streams = [(_encryptor(s), np.add) for s in plus] + [(_encryptor(s), np.subtract) for s in minus]
        self._chunk = max(16, chunk_bytes // 16 * 16)
        self._buf = np.empty(self._chunk + 16, dtype=np.uint8)
        self._zeros = memoryview(bytes(self._chunk))

    def __len__(self) -> int:
        return len(self._streams)

    def apply(self, part: np.ndarray) -> None:
        if not self._streams or part.size == 0:
            return
        item = part.dtype.itemsize
        step = self._chunk // item
        for start in range(0, part.size, step):
            sub = part[start : start + step]
            nb = sub.size * item
            src = self._zeros[:nb]
            for enc, op in self._streams:
                enc.update_into(src, self._buf)
                op(sub, self._buf[:nb].view(part.dtype), out=sub)


def apply_masks(
    acc: np.ndarray, plus: Sequence[bytes] = (), minus: Sequence[bytes] = (), *, chunk_bytes: int = CHUNK_BYTES
) -> np.ndarray:
    """Add the masks of ``plus`` seeds and subtract those of ``minus`` seeds, in place, mod 2^w.

    ``acc`` must be a contiguous unsigned integer array; the masks are the same streams
    ``keystream`` returns, so ``apply_masks(x, [s]); apply_masks(x, minus=[s])`` restores ``x``.
    """
    if acc.dtype.kind != "u" or not acc.flags.c_contiguous or acc.ndim != 1:
        raise ConfigError("masks apply to a contiguous 1-D unsigned integer array")
    MaskStreams(plus, minus, chunk_bytes=chunk_bytes).apply(acc)
    return acc


def uniform01(seed: bytes, n: int) -> np.ndarray:
    """``n`` float64 uniforms in [0, 1) from ``seed`` (53 random bits each)."""
    words = keystream(seed, n, np.uint64)
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
