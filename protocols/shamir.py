"""Shamir secret sharing over a prime field (the shares SecAgg+ uses to recover seeds).

Why a prime field and raw secrets: SecAgg+ shares two 32-byte secrets per client (the
self-mask seed and the X25519 masking key).  Over the prime ``P256 = 2**256 + 297`` (the
smallest prime above ``2**256``) a 32-byte secret is one field element and a share is 33
bytes, instead of Flower's 306-byte PEM key shared over GF(2^128) in chunks.

Guarantees (Shamir 1979): any ``t`` shares of a degree ``t-1`` polynomial determine the
secret (Lagrange interpolation at 0); any ``t-1`` shares are consistent with every secret in
the field with the same number of polynomials, so they carry no information about it.  The
split draws its coefficients from ``secrets`` (the OS CSPRNG) unless a ``random.Random``-like
``rng`` is injected (tests only).  Share abscissae are the ids of the receiving parties plus
one, so they are distinct and non-zero.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from functools import lru_cache
from typing import Protocol

from securefml.errors import ConfigError

__all__ = [
    "P256",
    "SHARE_BYTES",
    "split",
    "reconstruct",
    "lagrange_at_zero",
    "split_bytes",
    "reconstruct_bytes",
    "interpolate_at",
]

P256 = 2**256 + 297
SHARE_BYTES = 33


class _Rng(Protocol):
    def randrange(self, stop: int) -> int: ...


def _check(t: int, xs: Sequence[int], prime: int) -> None:
    if t < 1:
        raise ConfigError(f"threshold must be >= 1, got {t}")
    if len(xs) < t:
        raise ConfigError(f"{len(xs)} shares cannot meet threshold {t}")
    if len(set(xs)) != len(xs) or any(not 0 < x < prime for x in xs):
        raise ConfigError("share abscissae must be distinct and in 1..prime-1")


def split(secret: int, t: int, xs: Sequence[int], *, prime: int = P256, rng: _Rng | None = None) -> list[int]:
    """Evaluate a random degree ``t-1`` polynomial with ``f(0) = secret`` at every ``x`` in ``xs``."""
    _check(t, xs, prime)
    if not 0 <= secret < prime:
        raise ConfigError("secret must lie in the field")
    draw = secrets.randbelow if rng is None else rng.randrange
    coeffs = [draw(prime) for _ in range(t - 1)]
    out = []
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner, highest degree first
            acc = (acc + c) * x % prime
        out.append((acc + secret) % prime)
    return out


@lru_cache(maxsize=4096)
def lagrange_at_zero(xs: tuple[int, ...], prime: int = P256) -> tuple[int, ...]:
    """Coefficients ``l_i`` with ``f(0) = sum l_i f(x_i)``; cached, since a round reuses subsets."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % prime
                den = den * (xj - xi) % prime
        out.append(num * pow(den, -1, prime) % prime)
    return tuple(out)


def reconstruct(points: Sequence[tuple[int, int]], t: int, *, prime: int = P256) -> int:
    """The secret from the first ``t`` of ``points`` (``(x, f(x))`` pairs)."""
    if len(points) < t:
        raise ConfigError(f"{len(points)} shares cannot meet threshold {t}")
    use = sorted(points[:t])
    xs = tuple(x for x, _ in use)
    _check(t, xs, prime)
    coeffs = lagrange_at_zero(xs, prime)
    return sum(c * y for c, (_, y) in zip(coeffs, use)) % prime


def interpolate_at(points: Sequence[tuple[int, int]], x: int, *, prime: int = P256) -> int:
    """``f(x)`` for the polynomial of degree ``len(points) - 1`` through ``points``."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (x - xj) % prime
                den = den * (xi - xj) % prime
        total += yi * num * pow(den, -1, prime)
    return total % prime


def split_bytes(secret: bytes, t: int, xs: Sequence[int]) -> list[bytes]:
    """Share a 32-byte secret over ``P256``; each share is ``SHARE_BYTES`` big-endian bytes."""
    if len(secret) != 32:
        raise ConfigError(f"secret must be 32 bytes, got {len(secret)}")
    return [y.to_bytes(SHARE_BYTES, "big") for y in split(int.from_bytes(secret, "big"), t, xs)]


def reconstruct_bytes(points: Sequence[tuple[int, bytes]], t: int) -> bytes:
    """Inverse of ``split_bytes``; a result that does not fit 32 bytes means bad shares."""
    ys = [(x, int.from_bytes(y, "big")) for x, y in points]
    value = reconstruct(ys, t)
    if value >= 2**256:
        raise ValueError("shares do not reconstruct a 32-byte secret")
    return value.to_bytes(32, "big")
