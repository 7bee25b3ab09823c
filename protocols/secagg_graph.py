"""SecAgg+ public parameters: the neighbour graph, the threshold, and the bucket partition.

Everything here is a deterministic function of public data (round index, the cohort's ids,
an optional public beacon value), so every client recomputes its own neighbourhood and its
bucket and the server cannot choose them (Bell et al., CCS 2020: the graph must be
random from the adversary's point of view).

Graph (Bell et al.'s random Harary graph): the cohort is put in a pseudorandom order derived
from the round seed; node ``i`` in that ring is joined to the ``k/2`` nodes on each side
(plus the opposite node when ``k`` is odd and ``n`` even).  ``k >= n-1`` is the complete
graph, i.e. classic SecAgg (Bonawitz et al., CCS 2017).

Choosing ``k`` and ``t`` (``derive_parameters``).  With a random labelling, the neighbour set
of a node is a uniformly random ``k``-subset of the other ``n-1`` nodes, so the number of
dropped (or corrupt) neighbours is exactly hypergeometric.  Following the three conditions
of Bell et al.'s analysis of the Harary-graph construction, union-bounded over the ``n`` nodes:

1. security against collusion: ``c`` = the count that no node's corrupt neighbours exceed,
   except with probability ``2**-sigma``; the threshold satisfies ``2t > k + c`` (so neither
   the corrupt neighbours alone, ``c < t``, nor a server that splits the honest neighbours
   into two camps, can gather ``t`` shares of both of a node's secrets);
2. privacy of the sum: the honest survivors stay connected, which in the ring fails only if
   two runs of ``k/2`` consecutive removed nodes appear: probability about
   ``(n * C(R, h) / C(n, h))**2`` with ``R`` removed nodes, ``h = k/2`` (union bound over the
   start of each run, the two runs treated as independent); required ``<= 2**-sigma``;
3. correctness: every node keeps at least ``t`` live neighbours except with probability
   ``2**-eta`` (dropped and corrupt nodes both count as lost).

The smallest ``k`` that meets all three is used; if none below ``n-1`` does, the complete
graph with the majority threshold, and a ``ConfigError`` if even that cannot tolerate the
stated fractions.  With the defaults ``sigma = 40``, ``eta = 10``: ``n = 100`` with 10% dropouts
gives ``k = 15, t = 8``; adding 5% corrupt clients gives ``k = 28, t = 17``; ``n = 1000`` with
10% dropouts and 5% corrupt gives ``k = 81, t = 53``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from securefml.errors import ConfigError

__all__ = [
    "GraphParams",
    "derive_parameters",
    "round_seed",
    "ring_order",
    "neighbour_graph",
    "bucket_partition",
    "hypergeom_tail",
]


@dataclass(frozen=True)
class GraphParams:
    """``k`` neighbours per node and Shamir threshold ``t`` (``k = n - 1``: complete graph)."""

    k: int
    t: int

    def __post_init__(self) -> None:
        if self.k < 1 or not 1 <= self.t <= self.k:
            raise ConfigError(f"need 1 <= t <= k, got k={self.k}, t={self.t}")
        if 2 * self.t <= self.k:
            raise ConfigError(f"threshold t={self.t} must exceed k/2={self.k / 2} (majority of neighbours)")


def hypergeom_tail(population: int, marked: int, draws: int, above: int) -> float:
    """P[X > above] for X ~ Hypergeometric(population, marked, draws)."""
    total = math.comb(population, draws)
    hi = min(marked, draws)
    s = sum(math.comb(marked, j) * math.comb(population - marked, draws - j) for j in range(above + 1, hi + 1))
    return s / total


def derive_parameters(
    n: int, *, dropout_fraction: float = 0.1, corrupt_fraction: float = 0.0, sigma: int = 40, eta: int = 10
) -> GraphParams:
    """Smallest ``k`` (and its ``t``) meeting the security and correctness conditions above."""
    if n < 2:
        raise ConfigError(f"secure aggregation needs at least 2 clients, got {n}")
    if not (0 <= dropout_fraction < 1 and 0 <= corrupt_fraction < 0.5):
        raise ConfigError("need 0 <= dropout_fraction < 1 and 0 <= corrupt_fraction < 1/2")
    dropped = math.ceil(dropout_fraction * n)
    corrupt = math.ceil(corrupt_fraction * n)
    removed = min(n - 1, dropped + corrupt)
    sec, cor = 2.0**-sigma, 2.0**-eta
    for k in range(2, n - 1):
        c = next(c for c in range(k + 1) if n * hypergeom_tail(n - 1, corrupt, k, c) <= sec)
        t = (k + c) // 2 + 1
        if t > k:
            continue
        h = k // 2
        gap = math.comb(removed, h) / math.comb(n, h) if removed >= h else 0.0
        if (n * gap) ** 2 > sec:
            continue
        if n * hypergeom_tail(n - 1, removed, k, k - t) > cor:
            continue
        return GraphParams(k, t)
    k = n - 1
    t = (k + corrupt) // 2 + 1
    if t > k or k - removed < t:
        raise ConfigError(
            f"{n} clients cannot tolerate {dropout_fraction:.0%} dropouts with {corrupt_fraction:.0%} corrupt clients "
            f"(the complete graph needs {t} live neighbours of {k})"
        )
    return GraphParams(k, t)


def round_seed(round_idx: int, cohort: Sequence[int], public_seed: bytes = b"", purpose: str = "graph") -> bytes:
    """SHA-256 of the public round data: what both sides hash to derive graph and buckets."""
    h = hashlib.sha256(b"securefml/secagg/" + purpose.encode() + b"\x00")
    h.update(struct.pack(">II", round_idx, len(cohort)))
    for c in sorted(cohort):
        h.update(struct.pack(">I", c))
    h.update(public_seed)
    return h.digest()


def ring_order(cohort: Sequence[int], seed: bytes) -> list[int]:
    """A pseudorandom permutation of ``cohort``: sort by SHA-256(seed || id)."""
    return sorted(cohort, key=lambda c: hashlib.sha256(seed + struct.pack(">I", c)).digest())


def neighbour_graph(cohort: Sequence[int], k: int, seed: bytes) -> dict[int, tuple[int, ...]]:
    """Each client's neighbours (sorted ids) in the random Harary graph of degree ``k``.

    Odd ``k`` with odd ``n`` is rounded up to ``k + 1`` (no ``k``-regular graph exists).  A pure
    function of public data, memoized (a simulated round builds every client's plan from the
    same bytes; a deployed client computes it once): each call returns a fresh ``dict``.
    """
    return dict(_neighbour_graph(tuple(cohort), k, bytes(seed)))


@functools.lru_cache(maxsize=64)
def _neighbour_graph(cohort: tuple[int, ...], k: int, seed: bytes) -> dict[int, tuple[int, ...]]:
    n = len(cohort)
    if len(set(cohort)) != n:
        raise ConfigError("cohort ids must be distinct")
    if k >= n - 1:
        return {c: tuple(sorted(x for x in cohort if x != c)) for c in cohort}
    if k % 2 and n % 2:
        k += 1
    ring = ring_order(cohort, seed)
    half = k // 2
    nbrs: dict[int, set[int]] = {c: set() for c in cohort}
    for i, c in enumerate(ring):
        for d in range(1, half + 1):
            for j in (i + d, i - d):
                nbrs[c].add(ring[j % n])
        if k % 2:
            nbrs[c].add(ring[(i + n // 2) % n])
    return {c: tuple(sorted(v)) for c, v in nbrs.items()}


def bucket_partition(cohort: Sequence[int], buckets: int, seed: bytes) -> list[tuple[int, ...]]:
    """Split ``cohort`` into ``buckets`` pseudorandom groups whose sizes differ by at most one."""
    if buckets < 1 or buckets > len(cohort):
        raise ConfigError(f"cannot split {len(cohort)} clients into {buckets} buckets")
    ring = ring_order(cohort, seed)
    return [tuple(sorted(ring[b::buckets])) for b in range(buckets)]
