"""The public, server-dictated plan of one SecAgg+ round, which both halves check and share.

A plan fixes the cohort, the graph degree and threshold, the fixed-point code, the length
of the vector (the uploaded layers; every client uploads the same ones) and whether the
active-server option (signatures + consistency round) is on.  Neighbourhoods are derived from
it deterministically (``secagg_graph``), so a client never takes its neighbour list on the
server's word.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from securefml.errors import ConfigError
from securefml.protocols.quantize import FixedPoint
from securefml.protocols.secagg_graph import GraphParams, neighbour_graph, round_seed

__all__ = ["RoundPlan"]


@dataclass(frozen=True)
class RoundPlan:
    """Everything public about one secure sum.

    Attributes
    ----------
    round_idx, cohort:
        Round index and the ids of the clients asked to take part (sorted, distinct).
    params:
        Neighbours per client ``k`` and Shamir threshold ``t``.
    fixed_point:
        The code clients quantize with (its ``n`` must be at least the cohort size).
    length:
        Entries of the float vector each client contributes (the weight rides in one more).
    layout_fingerprint, layers:
        The model layout and the uploaded layers every client must match.
    signatures:
        Active-server option: Ed25519-signed advertisements and a consistency round.
    identities:
        Client id -> raw Ed25519 public identity key (the PKI), needed when ``signatures``.
    public_seed:
        Optional public randomness (a beacon value) mixed into the graph seed.
    """

    round_idx: int
    cohort: tuple[int, ...]
    params: GraphParams
    fixed_point: FixedPoint
    length: int
    layout_fingerprint: bytes = b""
    layers: tuple[str, ...] = ()
    signatures: bool = False
    identities: Mapping[int, bytes] = field(default_factory=dict)
    public_seed: bytes = b""
    _graph: dict[int, tuple[int, ...]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if tuple(sorted(set(self.cohort))) != tuple(self.cohort):
            raise ConfigError("cohort must be sorted distinct ids")
        if len(self.cohort) < 2:
            raise ConfigError("a secure sum needs at least 2 clients")
        if not 0 <= self.round_idx < 2**32 or any(not 0 <= c < 2**32 - 1 for c in self.cohort):
            raise ConfigError("round index and client ids must fit in u32 (the top id is the server's)")
        if self.params.k > len(self.cohort) - 1:
            raise ConfigError(f"k={self.params.k} exceeds n-1={len(self.cohort) - 1}")
        if self.fixed_point.n < len(self.cohort):
            raise ConfigError("the fixed-point code must be sized for the whole cohort")
        if self.length < 0:
            raise ConfigError("length must be >= 0")
        if self.signatures and set(self.identities) < set(self.cohort):
            raise ConfigError("signatures need an identity key for every cohort member")
        seed = round_seed(self.round_idx, self.cohort, self.public_seed)
        self._graph.update(neighbour_graph(self.cohort, self.params.k, seed))

    @property
    def n(self) -> int:
        return len(self.cohort)

    @property
    def t(self) -> int:
        return self.params.t

    def neighbours(self, client: int) -> tuple[int, ...]:
        try:
            return self._graph[client]
        except KeyError:
            raise ConfigError(f"client {client} is not in this round's cohort") from None
