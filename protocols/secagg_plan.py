"""The public, server-dictated plan of one SecAgg+ round, which both halves check and share.

A plan fixes the cohort, the graph degree and threshold, the fixed-point code, the length
of the vector (the uploaded layers; every client uploads the same ones) and whether the
active-server option (signatures + consistency round) is on.  Neighbourhoods are derived from
it deterministically (``secagg_graph``), so a client never takes its neighbour list on the
server's word.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from securefml.errors import ConfigError, MalformedMessageError
from securefml.protocols.quantize import FixedPoint
from securefml.protocols.secagg_graph import GraphParams, neighbour_graph, round_seed
from securefml.protocols.wire import Envelope, decode, encode, pack_array, unpack_array

#: wire kind of a plan, and the sender id it carries (the server's)
PLAN_KIND = "secagg-plan"
_SERVER = 0xFFFFFFFF
_FIXED = struct.Struct(">dIBd")  # clip, n, bits, max_weight
_SIZES = struct.Struct(">IIQ?")  # k, t, length, signatures
_KEY_BYTES = 32  # raw Ed25519 public key
_MAX_PLAN_BYTES = 1 << 24

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

    # -- bytes form (for a client on another device) --------------------------------------------
    def to_bytes(self) -> bytes:
        """The plan as one versioned ``wire`` message, so a remote client need not rebuild it.

        Every field travels (cohort, ``k``/``t``, fixed-point code, length, layout fingerprint,
        layer names, the signature option, identity keys and public seed); the neighbour graph is
        not sent, as each side derives it from the plan (``from_bytes`` recomputes it).  The plan is
        public: nothing here is secret, and in the active-server setting a client compares what
        it received with the signed advertisements, never trusts it blindly.
        """
        ids = sorted(self.identities)
        fields = {
            "cohort": pack_array(np.asarray(self.cohort, dtype=np.uint32)),
            "sizes": _SIZES.pack(self.params.k, self.params.t, self.length, self.signatures),
            "fixed": _FIXED.pack(self.fixed_point.clip, self.fixed_point.n, self.fixed_point.bits,
                                 self.fixed_point.max_weight),
            "layout": bytes(self.layout_fingerprint),
            "layers": "\n".join(self.layers).encode("utf-8"),
            "id_clients": pack_array(np.asarray(ids, dtype=np.uint32)),
            "id_keys": b"".join(bytes(self.identities[c]) for c in ids),
            "seed": bytes(self.public_seed),
        }
        if any("\n" in name for name in self.layers) or any(len(self.identities[c]) != _KEY_BYTES for c in ids):
            raise ConfigError("layer names must not contain newlines and identity keys must be 32 bytes")
        return encode(Envelope(PLAN_KIND, self.round_idx, _SERVER, fields))

    @classmethod
    def from_bytes(cls, data: bytes, *, round_idx: int | None = None) -> RoundPlan:
        """Decode ``to_bytes`` output; anything else raises ``MalformedMessageError``.

        ``round_idx``, when given, must match (a replayed plan of another round is refused).
        The decoded plan passes the same checks as one built in process.
        """
        env = decode(data, sender=_SERVER, max_bytes=_MAX_PLAN_BYTES)
        env.expect(kind=PLAN_KIND, round=env.round if round_idx is None else round_idx, sender=_SERVER)
        sizes, fixed = env.field("sizes"), env.field("fixed")
        if len(sizes) != _SIZES.size or len(fixed) != _FIXED.size:
            raise MalformedMessageError("plan size fields have the wrong length", sender=_SERVER)
        k, t, length, signatures = _SIZES.unpack(sizes)
        clip, n, bits, max_weight = _FIXED.unpack(fixed)
        if not (math.isfinite(clip) and math.isfinite(max_weight)):
            raise MalformedMessageError("plan fixed-point code is not finite", sender=_SERVER)
        cohort = tuple(int(c) for c in unpack_array(env.field("cohort"), sender=_SERVER))
        ids = [int(c) for c in unpack_array(env.field("id_clients"), sender=_SERVER)]
        keys = env.field("id_keys")
        if len(keys) != _KEY_BYTES * len(ids) or len(set(ids)) != len(ids):
            raise MalformedMessageError("plan identity keys do not match their clients", sender=_SERVER)
        try:
            raw_layers = env.field("layers").decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedMessageError("plan layer names are not utf-8", sender=_SERVER) from None
        try:
            return cls(
                round_idx=env.round, cohort=cohort, params=GraphParams(k, t),
                fixed_point=FixedPoint(clip, n, bits, max_weight), length=length,
                layout_fingerprint=env.field("layout"), layers=tuple(raw_layers.split("\n")) if raw_layers else (),
                signatures=bool(signatures),
                identities={c: keys[i * _KEY_BYTES : (i + 1) * _KEY_BYTES] for i, c in enumerate(ids)},
                public_seed=env.field("seed"),
            )
        except ConfigError as exc:  # a well-formed message describing an impossible plan
            raise MalformedMessageError(f"invalid plan: {exc}", sender=_SERVER) from None
