"""The client half of SecAgg+: six stages, each turning the server's message into bytes.

A client keeps its state in a ``ClientState`` dataclass and checks stage order explicitly:
calling a stage out of order, or receiving a server message that breaks the plan, raises a
typed error (never ``return False``).  Bad peer material (a tampered sealed share, an
unusable X25519 key, an advertisement whose signature fails) is *not* fatal: the client
leaves that peer out, keeps the typed error in ``ClientState.errors`` and reports the peer in
its complaints message (``complain``, after the share stage and before any input is masked).
The server forwards the union of accused peers (``exclusions``); the client masks with none of
them, so they leave the round like clients that dropped before the masked stage and no key of
theirs ever has to be reconstructed (see ``secagg_server``).

The client does not take exclusions on the server's word (issue 11, finding 1): with
``signatures`` every excluded peer must be named in a complaint signed by its accuser (a
neighbour of the accused) for this round, and in every mode the client aborts
(``ProtocolAbort``) if fewer than ``t`` neighbours are left to mask with, or if fewer than
``t`` of its neighbours survive at the unmask stage (Bonawitz et al.: ``|U_i| >= t``).

The heavy step (quantize + self mask + pairwise masks) is a pure function of a ``MaskJob``,
so a driver may run many clients' jobs in worker processes (``run_mask_job``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import cast

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefml.errors import ProtocolAbort, ProtocolError
from securefml.protocols import shamir
from securefml.protocols.prg import MaskStreams, new_seed
from securefml.protocols.quantize import FixedPoint
from securefml.protocols.secagg_crypto import (
    SEALED_BYTES,
    KeyPair,
    advert_payload,
    commit_seed,
    complaints_payload,
    consistency_payload,
    generate_keypair,
    open_share,
    pair_key,
    seal_share,
    sign,
    verify,
)
from securefml.protocols.secagg_messages import (
    KIND,
    SERVER_ID,
    Stage,
    check_subset,
    pack_ids,
    pack_records,
    unpack_complaints,
    unpack_ids,
    unpack_records,
)
from securefml.protocols.secagg_plan import RoundPlan
from securefml.protocols.wire import Envelope, decode, encode

__all__ = ["SecAggClient", "ClientState", "MaskJob", "run_mask_job", "KEY_RECORD_BYTES", "UNMASK_RECORD_BYTES"]

log = logging.getLogger(__name__)

KEY_RECORD_BYTES = 64 + 64  # c_pk | s_pk | signature (zeros when unsigned)
UNMASK_RECORD_BYTES = 1 + shamir.SHARE_BYTES  # kind (0 = self-mask seed, 1 = masking key) | share
B_SHARE, S_SHARE = 0, 1
_CODES = {2: b"u2", 4: b"u4"}


class _Step(IntEnum):
    NEW = 0
    ADVERTISED = 1
    SHARED = 2
    COMPLAINED = 3
    MASKED = 4
    CONFIRMED = 5
    DONE = 6


@dataclass
class MaskJob:
    """Inputs of the masked-input computation (secret: stays on the client's machine).

    ``fields`` are the public fields of the stage-3 (masked) message; ``run_mask_job`` adds the masked
    vector and returns the finished message, so a worker process hands back bytes only.
    """

    vector: np.ndarray
    weight: float
    fixed_point: FixedPoint
    plus: list[bytes]
    minus: list[bytes]
    client_id: int
    round_idx: int
    fields: dict[str, bytes]
    ring_noise: np.ndarray | None = None  # distributed DP: int64 noise added to the quantized vector before masking


_scratch: dict[int, np.ndarray] = {}  # per-process buffer reuse (a fresh 4 MB buffer costs page faults)


def run_mask_job(job: MaskJob) -> bytes:
    """Quantize ``weight * vector`` (plus the weight coordinate), add every mask mod 2^bits, encode.

    Each chunk is masked right after it is quantized, while it is still in cache, and the
    masked words are written straight into a ``wire.pack_array`` payload (dtype code, then
    little-endian words, aligned), so the only copy left is the envelope's final join.
    """
    fp = job.fixed_point
    item = fp.dtype.itemsize
    size = 4 + item * (job.vector.size + 1)
    raw = _scratch.get(size)
    if raw is None:
        _scratch.clear()
        raw = _scratch[size] = np.empty(size, dtype=np.uint8)
    raw[2:4] = np.frombuffer(_CODES[item], dtype=np.uint8)
    y = raw[4:].view(fp.dtype)
    streams = MaskStreams(job.plus, job.minus)
    hook = streams.apply if job.ring_noise is None else _noise_then(job.ring_noise.astype(fp.dtype), streams.apply)
    fp.encode(job.vector, job.weight, sender=job.client_id, out=y, chunk_hook=hook)
    if sys.byteorder != "little":  # pragma: no cover - the wire is little-endian
        y.byteswap(inplace=True)
    fields = dict(job.fields)
    # a zero-copy view, which ``encode`` writes as is; numpy declares the buffer protocol only for 3.12+
    fields["vector"] = cast(bytes, memoryview(raw)[2:])  # type: ignore[arg-type]
    return encode(Envelope(KIND[Stage.MASKED], job.round_idx, job.client_id, fields))


def _noise_then(noise: np.ndarray, apply: Callable[[np.ndarray], None]) -> Callable[[np.ndarray], None]:
    """Add ``noise`` (mod 2^bits, chunk by chunk in order) to the quantized entries, then mask them."""
    pos = [0]

    def hook(chunk: np.ndarray) -> None:
        chunk += noise[pos[0] : pos[0] + chunk.size]
        pos[0] += chunk.size
        apply(chunk)

    return hook


@dataclass
class ClientState:
    """What a client remembers between stages (secrets included: never serialized by default)."""

    step: _Step = _Step.NEW
    c_keys: KeyPair | None = None
    s_keys: KeyPair | None = None
    seed: bytes = b""
    peer_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    channel: dict[int, bytes] = field(default_factory=dict)
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    mask_seeds: dict[int, bytes] = field(default_factory=dict)
    peers: tuple[int, ...] = ()
    survivors: tuple[int, ...] = ()
    errors: dict[int, ProtocolError] = field(default_factory=dict)


class SecAggClient:
    """One client's half of a SecAgg+ round.

    Parameters
    ----------
    client_id:
        This client's id (must be in ``plan.cohort``).
    plan:
        The round's public plan.
    identity:
        Long-term Ed25519 identity key; required when ``plan.signatures``.
    checks:
        The active-server checks of the masked stage (every exclusion backed by a signed
        complaint, at least ``t`` mask peers left).  ``False`` exists only so
        ``benchmarks/secagg.py`` can measure their cost; it is the client's own choice, never
        the plan's, and without the checks a lying server can recover this client's input.
    """

    def __init__(self, client_id: int, plan: RoundPlan, *, identity: Ed25519PrivateKey | None = None,
                 checks: bool = True) -> None:
        self.id = client_id
        self.checks = checks
        self.plan = plan
        self.neighbours = plan.neighbours(client_id)
        if plan.signatures and identity is None:
            raise ProtocolError("signatures are on but this client has no identity key", sender=client_id)
        self._identity = identity
        self.state = ClientState()

    def __repr__(self) -> str:
        return f"SecAggClient(id={self.id}, round={self.plan.round_idx}, step={self.state.step.name})"

    # -- helpers ---------------------------------------------------------------------------
    def _expect(self, step: _Step) -> None:
        if self.state.step != step:
            raise ProtocolError(f"stage out of order: client is at {self.state.step.name}", sender=SERVER_ID)

    def _open(self, data: bytes, kind: str) -> Envelope:
        env = decode(data, sender=SERVER_ID, max_bytes=1 << 26)
        env.expect(kind=kind, round=self.plan.round_idx, sender=SERVER_ID)
        return env

    def _msg(self, stage: Stage, fields: dict[str, bytes]) -> bytes:
        return encode(Envelope(KIND[stage], self.plan.round_idx, self.id, fields))

    def _complain(self, exc: ProtocolError) -> None:
        log.warning("client %s: leaving out a peer: %s", self.id, exc)
        if exc.sender is not None:
            self.state.errors[exc.sender] = exc

    # -- stage 0: advertise keys -----------------------------------------------------------------
    def advertise(self) -> bytes:
        """Two fresh X25519 public keys (share channel, masks), signed when the plan asks."""
        self._expect(_Step.NEW)
        st = self.state
        st.c_keys, st.s_keys = generate_keypair(), generate_keypair()
        fields = {"c_pk": st.c_keys.public, "s_pk": st.s_keys.public}
        if self.plan.signatures:
            assert self._identity is not None
            payload = advert_payload(self.plan.round_idx, self.id, st.c_keys.public, st.s_keys.public)
            fields["sig"] = sign(self._identity, payload)
        st.step = _Step.ADVERTISED
        return self._msg(Stage.ADVERTISE, fields)

    # -- stage 1: share keys ----------------------------------------------------------------------
    def share(self, keys_msg: bytes) -> bytes:
        """Shamir-share the self-mask seed and the masking key among the advertised neighbours."""
        self._expect(_Step.ADVERTISED)
        st = self.state
        assert st.c_keys is not None and st.s_keys is not None
        env = self._open(keys_msg, KIND["keys"])
        records = unpack_records(env.field("keys"), KEY_RECORD_BYTES, sender=SERVER_ID)
        check_subset([r for r, _ in records], self.neighbours, "key list", sender=SERVER_ID)
        rnd = self.plan.round_idx
        for peer, body in records:
            c_pk, s_pk, sig = body[:32], body[32:64], body[64:]
            try:
                if self.plan.signatures:
                    verify(self.plan.identities[peer], sig, advert_payload(rnd, peer, c_pk, s_pk), sender=peer)
                key = pair_key(st.c_keys.key(), c_pk, purpose=b"share", round_idx=rnd, a=self.id, b=peer,
                               sender=peer)
            except ProtocolError as exc:
                self._complain(exc)
                continue
            st.peer_keys[peer] = (c_pk, s_pk)
            st.channel[peer] = key
        peers = sorted(st.peer_keys)
        if len(peers) < self.plan.t:
            raise ProtocolAbort(f"only {len(peers)} neighbours advertised keys, threshold is {self.plan.t}",
                                sender=self.id)
        st.seed = new_seed()
        xs = [p + 1 for p in peers]
        b_shares = shamir.split_bytes(st.seed, self.plan.t, xs)
        s_shares = shamir.split_bytes(st.s_keys.private, self.plan.t, xs)
        sealed = [
            (p, seal_share(st.channel[p], b + s, round_idx=rnd, sender=self.id, receiver=p))
            for p, b, s in zip(peers, b_shares, s_shares)
        ]
        st.step = _Step.SHARED
        return self._msg(Stage.SHARE, {"shares": pack_records(sealed, SEALED_BYTES)})

    # -- stage 2: complaints --------------------------------------------------------------------------
    def complain(self, shares_msg: bytes) -> bytes:
        """Open the shares addressed to us and report the peers whose material failed.

        A peer is accused when its sealed share fails AES-GCM authentication, or its masking
        key is unusable, or it was already left out at the key stage.  Nothing about this
        client's input is computed yet: the exclusions come back before any mask is chosen.
        """
        self._expect(_Step.SHARED)
        st = self.state
        assert st.s_keys is not None
        env = self._open(shares_msg, KIND["shares"])
        records = unpack_records(env.field("shares"), SEALED_BYTES, sender=SERVER_ID)
        check_subset([r for r, _ in records], self.neighbours, "share list", sender=SERVER_ID)
        rnd = self.plan.round_idx
        for peer, sealed in records:
            if peer not in st.channel:
                continue  # a peer we left out at the key stage (already in ``errors``)
            try:
                plain = open_share(st.channel[peer], sealed, round_idx=rnd, sender=peer, receiver=self.id)
                seed = pair_key(st.s_keys.key(), st.peer_keys[peer][1], purpose=b"mask", round_idx=rnd,
                                a=self.id, b=peer, sender=peer)
            except ProtocolError as exc:
                self._complain(exc)
                continue
            st.held[peer] = (plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :])
            st.mask_seeds[peer] = seed
        st.step = _Step.COMPLAINED
        accused = tuple(sorted(st.errors))
        fields = {"accused": pack_ids(accused)}
        if self.plan.signatures:
            assert self._identity is not None
            fields["sig"] = sign(self._identity, complaints_payload(rnd, self.id, accused))
        return self._msg(Stage.COMPLAINTS, fields)

    # -- stage 3: masked input ----------------------------------------------------------------------
    def prepare_masked(
        self,
        exclusions_msg: bytes,
        vector: torch.Tensor | np.ndarray,
        weight: float,
        *,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> MaskJob:
        """Drop the excluded peers, pick the peers to mask with, and build the mask job."""
        self._expect(_Step.COMPLAINED)
        st = self.state
        env = self._open(exclusions_msg, KIND["exclusions"])
        excluded = set(unpack_ids(env.field("excluded"), sender=SERVER_ID))
        check_subset(sorted(excluded), self.neighbours, "exclusion list", sender=SERVER_ID)
        rnd = self.plan.round_idx
        if self.checks and self.plan.signatures:
            self._check_exclusions(env, excluded & set(st.held))
        st.peers = tuple(sorted(p for p in st.held if p not in excluded))
        if self.checks and len(st.peers) < self.plan.t:
            # Bonawitz et al.: |U_i| >= t at every stage.  With fewer mask peers than t, a server
            # that later learns this client's self-mask seed (it is revealed for a survivor) could
            # remove every pairwise mask whose other end it declares dropped: refuse to mask.
            raise ProtocolAbort(f"only {len(st.peers)} neighbours left to mask with, threshold is {self.plan.t}",
                                sender=SERVER_ID)
        plus: list[bytes] = [st.seed]
        minus: list[bytes] = []
        for peer in st.peers:
            (plus if self.id < peer else minus).append(st.mask_seeds[peer])
        x = vector if isinstance(vector, torch.Tensor) else torch.as_tensor(vector)
        x = x.detach().to("cpu")
        if noise_fn is not None:
            x = noise_fn(x)
        arr = x.to(torch.float32).numpy().reshape(-1)
        if arr.size != self.plan.length:
            raise ProtocolError(f"vector has {arr.size} entries, the plan says {self.plan.length}", sender=self.id)
        st.step = _Step.MASKED
        fields = {
            "layout": self.plan.layout_fingerprint,
            "layers": "\n".join(self.plan.layers).encode(),
            "peers": pack_ids(st.peers),
            "commit": commit_seed(st.seed, rnd, self.id),
        }
        return MaskJob(arr, float(weight), self.plan.fixed_point, plus, minus, self.id, rnd, fields)

    def _check_exclusions(self, env: Envelope, excluded: set[int]) -> None:
        """Every excluded peer we hold shares of must be named in a complaint its accuser signed.

        The complaint is bound to round, accuser and its whole accused list
        (``complaints_payload``); the accuser must be a neighbour of the accused (only
        neighbours exchange shares) and cannot accuse itself.  A missing, forged or replayed
        complaint means the server is lying about the exclusion: ``ProtocolAbort``.
        """
        if not excluded:
            return
        justified: set[int] = set()
        for proof in unpack_complaints(env.field("proofs"), sender=SERVER_ID):
            named = excluded.intersection(proof.accused) - justified
            if not named or proof.accuser not in self.plan.identities:
                continue
            if any(v == proof.accuser or proof.accuser not in self.plan.neighbours(v) for v in named):
                continue
            try:
                verify(self.plan.identities[proof.accuser], proof.sig,
                       complaints_payload(self.plan.round_idx, proof.accuser, proof.accused), sender=proof.accuser)
            except ProtocolError:
                raise ProtocolAbort(f"the server forwarded a complaint that client {proof.accuser} did not sign",
                                    sender=SERVER_ID) from None
            justified |= named
        missing = sorted(excluded - justified)
        if missing:
            raise ProtocolAbort(f"exclusion of {missing[:5]} is not backed by a signed complaint", sender=SERVER_ID)

    def masked(self, exclusions_msg: bytes, vector: torch.Tensor | np.ndarray, weight: float, *,
               noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> bytes:
        """The stage-3 message: ``prepare_masked`` then ``run_mask_job`` in this process."""
        return run_mask_job(self.prepare_masked(exclusions_msg, vector, weight, noise_fn=noise_fn))

    # -- stage 4: consistency check (active-server option) -------------------------------------------
    def consistency(self, survivors_msg: bytes) -> bytes:
        """Sign the survivor list the server announced, so neighbours can check they saw the same."""
        self._expect(_Step.MASKED)
        if not self.plan.signatures:
            raise ProtocolError("the plan has no consistency round", sender=SERVER_ID)
        env = self._open(survivors_msg, KIND["survivors"])
        survivors = unpack_ids(env.field("alive"), sender=SERVER_ID)
        self._check_survivors(survivors)
        self.state.survivors = survivors
        self.state.step = _Step.CONFIRMED
        assert self._identity is not None
        sig = sign(self._identity, consistency_payload(self.plan.round_idx, survivors))
        return self._msg(Stage.CONSISTENCY, {"sig": sig})

    def _check_survivors(self, survivors: tuple[int, ...]) -> None:
        check_subset(survivors, self.plan.cohort, "survivor list", sender=SERVER_ID)
        if self.id not in survivors:
            raise ProtocolError("server lists this client as dropped although it sent its input", sender=SERVER_ID)
        if len(survivors) < self.plan.t:
            raise ProtocolAbort(f"only {len(survivors)} survivors, threshold is {self.plan.t}", sender=SERVER_ID)
        live = len(set(survivors) & set(self.neighbours))
        if self.checks and live < self.plan.t:  # |U_i| >= t: our own seed could not be recovered anyway
            raise ProtocolAbort(f"only {live} neighbours survive, threshold is {self.plan.t}", sender=SERVER_ID)

    # -- stage 5: unmask ------------------------------------------------------------------------------
    def unmask(self, request_msg: bytes) -> bytes:
        """Reveal, per neighbour, the seed share if it survived or the key share if it dropped; never both."""
        st = self.state
        if st.step not in ((_Step.CONFIRMED,) if self.plan.signatures else (_Step.MASKED,)):
            raise ProtocolError(f"stage out of order: client is at {st.step.name}", sender=SERVER_ID)
        env = self._open(request_msg, KIND["request"])
        alive = unpack_ids(env.field("alive"), sender=SERVER_ID)
        dropped = unpack_ids(env.field("dropped"), sender=SERVER_ID)
        if set(alive) & set(dropped):
            raise ProtocolError("server lists a client as both alive and dropped", sender=SERVER_ID)
        check_subset(dropped, self.plan.cohort, "dropped list", sender=SERVER_ID)
        if self.plan.signatures:
            if alive != st.survivors:
                raise ProtocolError("unmask request disagrees with the signed survivor list", sender=SERVER_ID)
            self._check_signatures(env)
        else:
            self._check_survivors(alive)
        alive_set, dropped_set = set(alive), set(dropped)
        out = []
        for peer, (b_share, s_share) in st.held.items():
            if peer in alive_set:
                out.append((peer, bytes([B_SHARE]) + b_share))
            elif peer in dropped_set:
                out.append((peer, bytes([S_SHARE]) + s_share))
        st.step = _Step.DONE
        return self._msg(Stage.UNMASK, {"shares": pack_records(out, UNMASK_RECORD_BYTES)})

    def _check_signatures(self, env: Envelope) -> None:
        st = self.state
        sigs = unpack_records(env.field("sigs"), 64, sender=SERVER_ID)
        check_subset([r for r, _ in sigs], self.neighbours, "signature list", sender=SERVER_ID)
        payload = consistency_payload(self.plan.round_idx, st.survivors)
        alive = set(st.survivors)
        for peer, sig in sigs:
            verify(self.plan.identities[peer], sig, payload, sender=peer)
        sigs = [(peer, sig) for peer, sig in sigs if peer in alive]  # a signer listed as dropped does not count
        if len(sigs) < self.plan.t:
            raise ProtocolAbort(f"only {len(sigs)} neighbours confirmed the survivor list", sender=SERVER_ID)

