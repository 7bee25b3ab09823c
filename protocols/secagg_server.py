"""The server half of SecAgg+: collect, forward, decide who is in the sum, unmask.

The server keeps its state in a ``ServerState`` dataclass; each ``receive_*`` checks that the
message is the right kind for this round from a client entitled to send it at this stage,
and raises a typed error naming the sender otherwise (the driver records the client as
rejected and goes on).  Decisions that need the whole stage (who contributes) are taken in
``close_masked``; ``finish`` checks that *every* secret it needs has ``t`` shares before it
reconstructs *any*, so a round below threshold aborts with ``ProtocolAbort`` having
unmasked nothing.

Share complaints.  After the share stage every client opens the sealed shares addressed to
it and sends a (signed, with ``signatures``) list of the neighbours whose share failed
authentication or whose keys were unusable.  ``close_complaints`` rejects every accused
client with a ``DecryptionError`` naming it (and its accusers) and fixes the exclusion list
``X`` = clients that shared but will not contribute: the accused, clients rejected so far,
and clients whose complaints never arrived (unsigned mode); with ``signatures`` the accused
only, forwarded with the signed complaints that name them (clients verify each exclusion;
the others that are gone count as dropped and their masking keys are reconstructed at the
end). Each client receives ``X`` restricted to its neighbours (``exclusions_for``) *before*
it masks its input and masks with nobody in ``X``; a masked input whose peer list names a
member of ``X`` is rejected.  So a client in ``X`` is out of the round like a client that
dropped before masking: no mask involves its keys, its masking key is never reconstructed
and its self-mask seed never is either.

Who is in the sum.  ``C`` (contributors) = clients whose masked input arrived and passed the
checks, minus both ends of any pair whose mask lists disagree.  ``D`` = clients that shared
their keys but are not in ``C``: their pairwise masks are removed from the neighbours in
``C`` that used them, with the masking key reconstructed from ``t`` shares (only clients that
dropped after the exclusion list was fixed need this).

What the server keeps of a masked input: once every check of ``receive_masked`` passed, a copy
of the vector in a reused buffer (``secagg_buffers``), not the message, so the message's memory
serves the next one; the close's mask-list check still sees every accepted vector (a client it
rejects is not summed), and ``finish`` returns the buffers after the unmask.

Blame (``_recover``): with more than ``t`` revealed shares of a secret, the server finds the
polynomial a strict majority of them lie on; responders off it are rejected by name, and if
its secret does not match the dealer's seed commitment the *dealer* is rejected by name (its
input stays in the sum, with the seed its shares fix).  Only when no ``t`` consistent shares
determine a needed secret does the round abort.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from securefml.errors import DecryptionError, MalformedMessageError, ProtocolAbort, ProtocolError, ReplayError
from securefml.protocols import shamir
from securefml.protocols.secagg_buffers import POOL
from securefml.protocols.secagg_client import B_SHARE, KEY_RECORD_BYTES, S_SHARE, UNMASK_RECORD_BYTES
from securefml.protocols.secagg_crypto import (
    SEALED_BYTES,
    advert_payload,
    commit_seed,
    complaints_payload,
    consistency_payload,
    pair_key,
    public_of,
    verify,
)
from securefml.protocols.secagg_masking import unmask_sum
from securefml.protocols.secagg_messages import (
    KIND,
    SERVER_ID,
    Complaint,
    Stage,
    check_subset,
    pack_complaints,
    pack_ids,
    pack_records,
    unpack_ids,
    unpack_records,
)
from securefml.protocols.secagg_plan import RoundPlan
from securefml.protocols.wire import Envelope, decode, encode, unpack_array

__all__ = ["SecAggServer", "ServerState"]

log = logging.getLogger(__name__)

MAX_SUBSETS = 5000  # t-subsets tried to route around bad revealed shares


@dataclass
class _Masked:
    vector: np.ndarray
    peers: tuple[int, ...]
    commit: bytes


@dataclass
class ServerState:
    """What the server has collected so far in one round."""

    adverts: dict[int, tuple[bytes, bytes, bytes]] = field(default_factory=dict)
    sealed: dict[int, dict[int, bytes]] = field(default_factory=dict)
    complaints: dict[int, tuple[int, ...]] = field(default_factory=dict)
    complaint_sigs: dict[int, bytes] = field(default_factory=dict)
    excluded: frozenset[int] = frozenset()
    complaints_closed: bool = False
    masked: dict[int, _Masked] = field(default_factory=dict)
    rejected: dict[int, ProtocolError] = field(default_factory=dict)
    contributors: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()
    closed: bool = False
    sigs: dict[int, bytes] = field(default_factory=dict)
    shares: dict[int, list[tuple[int, int, bytes]]] = field(default_factory=dict)


class SecAggServer:
    """The server's half of one SecAgg+ round (one secure sum over ``plan.cohort``)."""

    def __init__(self, plan: RoundPlan) -> None:
        self.plan = plan
        self.state = ServerState()
        self._cohort = frozenset(plan.cohort)

    def __repr__(self) -> str:
        return f"SecAggServer(round={self.plan.round_idx}, n={self.plan.n}, k={self.plan.params.k}, t={self.plan.t})"

    # -- helpers -------------------------------------------------------------------------------------
    def _open(self, sender: int, data: bytes, stage: Stage, max_bytes: int = 1 << 24,
              views: tuple[str, ...] = ()) -> Envelope:
        if sender not in self._cohort:
            raise ProtocolError("not a member of this round's cohort", sender=sender)
        if sender in self.state.rejected:
            raise ProtocolError("already rejected in this round", sender=sender)
        env = decode(data, sender=sender, max_bytes=max_bytes, views=views)
        env.expect(kind=KIND[stage], round=self.plan.round_idx, sender=sender)
        return env

    def _msg(self, kind: str, fields: dict[str, bytes]) -> bytes:
        return encode(Envelope(kind, self.plan.round_idx, SERVER_ID, fields))

    def reject(self, sender: int, exc: ProtocolError) -> None:
        """Record a client as rejected (the driver calls this for failed messages)."""
        self.state.rejected.setdefault(sender, exc)

    @staticmethod
    def _exact(env: Envelope, name: str, size: int) -> bytes:
        value = env.field(name)
        if len(value) != size:
            raise MalformedMessageError(f"field {name!r} must be {size} bytes, got {len(value)}", sender=env.sender)
        return value

    # -- stage 0 ---------------------------------------------------------------------------------------
    def receive_advertise(self, sender: int, data: bytes) -> None:
        env = self._open(sender, data, Stage.ADVERTISE, 1024)
        if sender in self.state.adverts:
            raise ReplayError("duplicate advertisement", sender=sender)
        c_pk, s_pk = self._exact(env, "c_pk", 32), self._exact(env, "s_pk", 32)
        sig = b""
        if self.plan.signatures:
            sig = self._exact(env, "sig", 64)
            verify(self.plan.identities[sender], sig, advert_payload(self.plan.round_idx, sender, c_pk, s_pk),
                   sender=sender)
        self.state.adverts[sender] = (c_pk, s_pk, sig)

    def keys_for(self, client: int) -> bytes:
        """The advertised keys of ``client``'s neighbours."""
        st = self.state
        recs = [
            (v, st.adverts[v][0] + st.adverts[v][1] + (st.adverts[v][2] or bytes(64)))
            for v in self.plan.neighbours(client)
            if v in st.adverts and v not in st.rejected
        ]
        return self._msg(KIND["keys"], {"keys": pack_records(recs, KEY_RECORD_BYTES)})

    # -- stage 1 ----------------------------------------------------------------------------------------
    def receive_share(self, sender: int, data: bytes) -> None:
        env = self._open(sender, data, Stage.SHARE)
        st = self.state
        if sender not in st.adverts:
            raise ProtocolError("sent shares without advertising keys", sender=sender)
        if sender in st.sealed:
            raise ReplayError("duplicate share message", sender=sender)
        recs = unpack_records(env.field("shares"), SEALED_BYTES, sender=sender)
        targets = [r for r, _ in recs]
        check_subset(targets, [v for v in self.plan.neighbours(sender) if v in st.adverts], "share list",
                     sender=sender)
        if len(targets) < self.plan.t:
            raise ProtocolError(f"shared with {len(targets)} neighbours, threshold is {self.plan.t}", sender=sender)
        st.sealed[sender] = dict(recs)

    def shares_for(self, client: int) -> bytes:
        """The sealed shares addressed to ``client`` (the server cannot open them)."""
        st = self.state
        recs = [(u, st.sealed[u][client]) for u in self.plan.neighbours(client)
                if u in st.sealed and client in st.sealed[u]]  # independent of when others get rejected
        return self._msg(KIND["shares"], {"shares": pack_records(recs, SEALED_BYTES)})

    # -- stage 2 -----------------------------------------------------------------------------------------
    def receive_complaints(self, sender: int, data: bytes) -> None:
        """The neighbours ``sender`` accuses of unauthenticated shares or unusable keys."""
        env = self._open(sender, data, Stage.COMPLAINTS, 1 << 16)
        st = self.state
        if sender not in st.sealed:
            raise ProtocolError("sent complaints without sharing its keys", sender=sender)
        if sender in st.complaints:
            raise ReplayError("duplicate complaints message", sender=sender)
        if st.complaints_closed:
            raise ProtocolError("complaints arrived after the stage closed", sender=sender)
        accused = unpack_ids(env.field("accused"), sender=sender)
        check_subset(accused, self.plan.neighbours(sender), "complaint list", sender=sender)
        if self.plan.signatures:
            sig = self._exact(env, "sig", 64)
            verify(self.plan.identities[sender], sig, complaints_payload(self.plan.round_idx, sender, accused),
                   sender=sender)
            st.complaint_sigs[sender] = sig
        st.complaints[sender] = accused

    def close_complaints(self) -> tuple[int, ...]:
        """Reject the accused and fix the exclusion list; returns the clients still in the round.

        Every accusation counts, whoever makes it (the union, independent of arrival order):
        an accusation excludes only the accused, never the accuser.  ``ProtocolAbort`` if fewer
        than ``t`` clients are left (nothing has been masked, nothing is revealed).
        """
        st = self.state
        if st.complaints_closed:
            raise ProtocolError("complaint stage already closed", sender=SERVER_ID)
        st.complaints_closed = True
        accusers: dict[int, list[int]] = {}
        for c, accused in st.complaints.items():
            for a in accused:
                accusers.setdefault(a, []).append(c)
        for a, by in sorted(accusers.items()):
            self.reject(a, DecryptionError(f"neighbours {sorted(by)} could not authenticate its shares or keys",
                                           sender=a))
        live = tuple(sorted(c for c in st.complaints if c not in st.rejected))
        if self.plan.signatures:
            # clients check every exclusion against a signed complaint, so exclude the accused only;
            # the others that are gone (complaints missing or rejected) count as dropped: their
            # masking keys are reconstructed at the end, as in Bonawitz et al.
            st.excluded = frozenset(accusers) & frozenset(st.sealed)
        else:
            st.excluded = frozenset(st.sealed) - frozenset(live)
        if len(live) < self.plan.t:
            raise ProtocolAbort(f"only {len(live)} clients left after the complaint stage, threshold is {self.plan.t}")
        return live

    def exclusions_for(self, client: int) -> bytes:
        """The neighbours of ``client`` that it must not mask with (accused, rejected or gone)."""
        st = self.state
        if not st.complaints_closed:
            raise ProtocolError("the complaint stage is still open", sender=SERVER_ID)
        excluded = [v for v in self.plan.neighbours(client) if v in st.excluded]
        fields = {"excluded": pack_ids(excluded)}
        if self.plan.signatures:  # the evidence: every signed complaint that names one of them
            named = set(excluded)
            fields["proofs"] = pack_complaints(
                Complaint(a, accused, st.complaint_sigs[a]) for a, accused in sorted(st.complaints.items())
                if named.intersection(accused)
            )
        return self._msg(KIND["exclusions"], fields)

    # -- stage 3 -----------------------------------------------------------------------------------------
    def receive_masked(self, sender: int, data: bytes) -> None:
        fp = self.plan.fixed_point
        env = self._open(sender, data, Stage.MASKED, (self.plan.length + 1) * fp.dtype.itemsize + 65536,
                         views=("vector",))
        st = self.state
        if sender not in st.complaints or not st.complaints_closed:
            raise ProtocolError("sent a masked input before the complaint stage closed for it", sender=sender)
        if sender in st.excluded:
            raise ProtocolError("sent a masked input although excluded from this round", sender=sender)
        if sender in st.masked:
            raise ReplayError("duplicate masked input", sender=sender)
        if st.closed:
            raise ProtocolError("masked input arrived after the stage closed", sender=sender)
        if env.field("layout") != self.plan.layout_fingerprint:
            raise ProtocolError("masked input was built for another model layout", sender=sender)
        if env.field("layers") != "\n".join(self.plan.layers).encode():
            raise ProtocolError("masked input carries other layers than the round's plan", sender=sender)
        peers = unpack_ids(env.field("peers"), sender=sender)
        sent_to_me = [u for u, recs in st.sealed.items() if sender in recs and u not in st.excluded]
        check_subset(peers, sent_to_me, "mask peer list", sender=sender)
        commit = self._exact(env, "commit", 32)
        vec = unpack_array(env.field("vector"), expected_len=self.plan.length + 1, sender=sender)
        if vec.dtype != fp.dtype:
            raise MalformedMessageError(f"masked vector must be {fp.dtype}, got {vec.dtype}", sender=sender)
        st.masked[sender] = _Masked(self._hold(vec), peers, commit)

    @staticmethod
    def _hold(vec: np.ndarray) -> np.ndarray:
        """What the server keeps of an accepted masked vector until the unmask: a copy in warm memory.

        Not the message itself (``vec`` is a view of it): a copy in a ``secagg_buffers`` buffer
        lets the driver free the message, so the next client's message reuses its pages instead
        of faulting in fresh ones (``docs/performance.md``).
        """
        held = POOL.take(vec.size, vec.dtype)
        np.copyto(held, vec)
        return held

    def close_masked(self) -> tuple[int, ...]:
        """Fix the contributors ``C`` and the dropped set ``D``; returns ``C``."""
        st = self.state
        if st.closed:
            raise ProtocolError("masked stage already closed", sender=SERVER_ID)
        st.closed = True
        live = {c for c in st.masked if c not in st.rejected}
        for c in sorted(live):
            for p in st.masked[c].peers:
                if p in live and c not in st.masked[p].peers:
                    for bad in (c, p):
                        self.reject(bad, ProtocolError(f"mask lists of {c} and {p} disagree", sender=bad))
        st.contributors = tuple(sorted(c for c in live if c not in st.rejected))
        st.dropped = tuple(sorted(u for u in st.sealed if u not in st.contributors))
        if len(st.contributors) < self.plan.t:
            raise ProtocolAbort(f"only {len(st.contributors)} masked inputs, threshold is {self.plan.t}")
        return st.contributors

    # -- stage 4 (active-server option) ----------------------------------------------------------------------
    def survivors_for(self, client: int) -> bytes:
        return self._msg(KIND["survivors"], {"alive": pack_ids(self.state.contributors)})

    def receive_consistency(self, sender: int, data: bytes) -> None:
        env = self._open(sender, data, Stage.CONSISTENCY, 1024)
        st = self.state
        if sender not in st.contributors:
            raise ProtocolError("only contributors sign the survivor list", sender=sender)
        if sender in st.sigs:
            raise ReplayError("duplicate consistency signature", sender=sender)
        sig = self._exact(env, "sig", 64)
        verify(self.plan.identities[sender], sig, consistency_payload(self.plan.round_idx, st.contributors),
               sender=sender)
        st.sigs[sender] = sig

    # -- stage 5 ---------------------------------------------------------------------------------------------
    def request_for(self, client: int) -> bytes:
        st = self.state
        fields = {"alive": pack_ids(st.contributors), "dropped": pack_ids(st.dropped)}
        if self.plan.signatures:
            recs = [(v, st.sigs[v]) for v in self.plan.neighbours(client) if v in st.sigs]
            fields["sigs"] = pack_records(recs, 64)
        return self._msg(KIND["request"], fields)

    def receive_unmask(self, sender: int, data: bytes) -> None:
        env = self._open(sender, data, Stage.UNMASK)
        st = self.state
        allowed = st.sigs if self.plan.signatures else st.contributors
        if sender not in allowed:
            raise ProtocolError("not asked to unmask", sender=sender)
        if sender in st.shares:
            raise ReplayError("duplicate unmask message", sender=sender)
        recs = unpack_records(env.field("shares"), UNMASK_RECORD_BYTES, sender=sender)
        alive, dropped = set(st.contributors), set(st.dropped)
        out = []
        for about, body in recs:
            kind = body[0]
            if about not in self.plan.neighbours(sender) or sender not in st.sealed.get(about, {}):
                raise MalformedMessageError(f"share about {about}, who never shared with this client", sender=sender)
            if (kind == B_SHARE and about not in alive) or (kind == S_SHARE and about not in dropped) or kind > 1:
                raise MalformedMessageError(f"wrong kind of share about client {about}", sender=sender)
            out.append((about, kind, body[1:]))
        st.shares[sender] = out

    def finish(self) -> np.ndarray:
        """The modular sum of the contributors' encodings, or ``ProtocolAbort`` (nothing unmasked)."""
        st = self.state
        plan = self.plan
        t = plan.t
        need_s = sorted({d for d in st.dropped for c in st.contributors if d in st.masked[c].peers})
        points: dict[tuple[int, int], list[tuple[int, bytes]]] = {}
        for responder, recs in st.shares.items():
            for about, kind, share in recs:
                points.setdefault((about, kind), []).append((responder + 1, share))
        short = [c for c in st.contributors if len(points.get((c, B_SHARE), ())) < t]
        short += [d for d in need_s if len(points.get((d, S_SHARE), ())) < t]
        if short:
            raise ProtocolAbort(f"fewer than t={t} shares for clients {sorted(short)[:8]}; nothing was unmasked")
        culprits: set[int] = set()

        def commit_check(c: int) -> Callable[[bytes], bool]:
            return lambda v: commit_seed(v, plan.round_idx, c) == st.masked[c].commit

        def key_check(d: int) -> Callable[[bytes], bool]:
            return lambda v: public_of(v) == st.adverts[d][1]

        seeds = []
        for c in st.contributors:
            seed, dealer_lied = self._recover(points[(c, B_SHARE)], c, culprits, commit_check(c))
            if dealer_lied:  # its shares agree with each other, not with its commitment
                self.reject(c, DecryptionError(
                    "its seed commitment does not match the seed its consistent shares determine; its masked "
                    "input stays in the sum (removing it would need both of its secrets)", sender=c))
            seeds.append(seed)
        keys: dict[int, bytes] = {}
        for d in need_s:
            key, dealer_lied = self._recover(points[(d, S_SHARE)], d, culprits, key_check(d))
            if dealer_lied:  # the masks its neighbours used cannot be recomputed: nothing to go on with
                raise ProtocolAbort("its masking-key shares agree with each other but not with its advertised "
                                    "key; nothing was unmasked", sender=d)
            keys[d] = key
        for r in sorted(culprits):
            self.reject(r, DecryptionError("revealed a share that is not on its polynomial", sender=r))
        plus: list[bytes] = []
        minus: list[bytes] = []
        for d, key in keys.items():
            for c in st.contributors:
                if d in st.masked[c].peers:
                    seed = pair_key(key, st.adverts[c][1], purpose=b"mask", round_idx=plan.round_idx, a=c, b=d)
                    (minus if c < d else plus).append(seed)
        fp = plan.fixed_point
        # sum and unmask chunk by chunk on threads sized from the work (secagg_masking; equal to the
        # plain np.add loop followed by prg.apply_masks, word for word)
        total = unmask_sum([st.masked[c].vector for c in st.contributors], plus, minus + seeds)
        if fp.bits != 8 * fp.dtype.itemsize:
            total &= fp.dtype.type(fp.mask)
        self._release_vectors()
        return total

    def _release_vectors(self) -> None:
        """Give the held masked vectors back to the pool: the sum is taken, none is read again."""
        st = self.state
        POOL.give(m.vector for m in st.masked.values())
        for m in st.masked.values():
            m.vector = np.empty(0, dtype=m.vector.dtype)

    def _recover(
        self, points: list[tuple[int, bytes]], client: int, culprits: set[int], check: Callable[[bytes], bool]
    ) -> tuple[bytes, bool]:
        """Reconstruct ``client``'s secret, blaming whoever is inconsistent; returns ``(secret, dealer_lied)``.

        1. The first ``t`` shares pass ``check`` (the seed commitment, or the advertised public
           key): done (the honest case, one interpolation).
        2. Otherwise look (over at most ``MAX_SUBSETS`` ``t``-subsets) for the polynomial that a
           strict majority of the revealed shares, and at least ``t + 1`` of them, lie on: with
           more than ``t`` shares, consistency is checkable.  Responders off it are ``culprits``.
           If its secret passes ``check`` it is returned; if not, the shares agree with each
           other and not with what ``client`` committed to, so ``client`` (the dealer) lied:
           its secret is returned with ``dealer_lied=True``.  Sound while honest responders are
           a majority of those revealing (``t > (k + c) / 2`` with ``c`` corrupt neighbours).
        3. No such polynomial: any ``t``-subset that passes ``check`` (off-polynomial responders
           are ``culprits``); none: ``ProtocolAbort`` (nothing has been unmasked yet).
        """
        t = self.plan.t
        ints = [(x, int.from_bytes(y, "big")) for x, y in points]
        first = self._value(ints[:t], check)
        if first is not None:
            return first, False
        if len(ints) > t:
            max_off = min(len(ints) - t - 1, (len(ints) - 1) // 2)  # a strict majority and >= t + 1 on it
            windows = (ints[i : i + t] for i in range(1, len(ints) - t + 1))
            for n_tried, subset in enumerate(itertools.chain(windows, itertools.combinations(ints[::-1], t))):
                if n_tried >= MAX_SUBSETS:
                    break
                poly = list(subset)
                off = self._off_polynomial(poly, ints, max_off)
                if off is None:
                    continue
                culprits.update(off)
                value = shamir.reconstruct(poly, t)
                if value >= 2**256:
                    raise ProtocolAbort("its consistent shares do not encode a 32-byte secret", sender=client)
                raw = value.to_bytes(32, "big")
                ok = self._value(poly, check) is not None
                return raw, not ok
        for n_tried, subset in enumerate(itertools.combinations(ints, t)):
            if n_tried >= MAX_SUBSETS:
                break
            found = self._value(list(subset), check)
            if found is not None:
                culprits.update(x - 1 for x, y in ints if shamir.interpolate_at(list(subset), x) != y)
                return found, False
        raise ProtocolAbort(f"shares of client {client}'s secret are neither consistent nor match its commitment; "
                            "nothing was unmasked")

    @staticmethod
    def _off_polynomial(poly: list[tuple[int, int]], ints: list[tuple[int, int]], max_off: int) -> set[int] | None:
        """Responders whose share is off the polynomial through ``poly``; None once more than ``max_off``."""
        off: set[int] = set()
        on = set(poly)
        for x, y in ints:
            if (x, y) not in on and shamir.interpolate_at(poly, x) != y:
                off.add(x - 1)
                if len(off) > max_off:
                    return None
        return off

    @staticmethod
    def _value(points: list[tuple[int, int]], check: Callable[[bytes], bool]) -> bytes | None:
        v = shamir.reconstruct(points, len(points))
        if v >= 2**256:
            return None
        raw = v.to_bytes(32, "big")
        try:
            return raw if check(raw) else None
        except ValueError:
            return None
