"""TenSEAL CKKS aggregation: encrypted selected layers, homomorphic sums, encrypted statistics.

Three roles (DESIGN.md, threat model):

* ``CKKSKeyHolder`` (``ckks_keys``): the secret key; computes from the round's signed uploads,
  and decrypts, only the sums and the ``Gram`` its ``DecryptionPolicy`` allows.
* ``CKKSServer``: the public context only (``is_private()`` is False); validates messages
  (and checks each ciphertext adds to the others), forwards the signed uploads and asks.
* ``CKKSClient``: the public context; packs its selected layers densely, encrypts and signs them.

``CKKS`` drives one round of all three for the federation loop.

Message (stage ``"update"``, a ``wire`` envelope of kind ``"ckks-update"``, bound to round and
sender by the envelope header)::

    ctx     16-byte fingerprint of the public context (the key set)
    layout  16-byte fingerprint of the model layout
    frame   16-byte fingerprint of the round's packing frame (layers, slot count)
    layers  the client's layer manifest (layout order)
    weight  float64 sample count
    scale   float64 factor the update was multiplied by before encryption (``weight / W``, or 1)
    chunks  u32 indices of the frame chunks sent (exactly those overlapping ``layers``)
    ct.<k>  one serialized fresh CKKS ciphertext per chunk (``slots`` values, zero padded)
    sig     64-byte Ed25519 signature of the client over its upload statement
            (``ckks_auth``: context, round, sender, frame, layers, weight, scale, SHA-256 of each ct)

The key holder decrypts only combinations it recomputes from such signed uploads, under its
``DecryptionPolicy`` (``ckks_policy``); the server forwards the uploads and the combination it
wants, and a request outside the policy raises ``PolicyViolation`` (a ``ProtocolError``).

Example
-------
>>> import torch
>>> from securefml.defenses.mean import Mean
>>> from securefml.protocols.base import ClientUpdate
>>> from securefml.updates import LayerLayout
>>> layout = LayerLayout([("fc.weight", (2, 3)), ("fc.bias", (2,))])
>>> proto = CKKS(preset="add-only")
>>> ups = [ClientUpdate(i, torch.full((8,), float(i)), ("fc",), weight=1.0) for i in range(3)]
>>> out = proto.run_round(0, ups, layout, defense=Mean())
>>> proto.server.is_private(), round(float(out.aggregate[0]), 4), out.extras["ciphertexts"]
(False, 1.0, 3)
>>> from securefml.defenses import Krum
>>> proto.check_defense(Krum(0))
Traceback (most recent call last):
...
securefml.errors.ConfigError: defense Krum(...) outputs ... one client's update ...
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import tenseal as ts
import torch

from securefml.errors import (
    ConfigError,
    DecryptionError,
    InvalidUpdateError,
    MalformedMessageError,
    ProtocolError,
    ReplayError,
)
from securefml.protocols.base import (
    AggregationProtocol,
    ClientUpdate,
    Reveals,
    RoundOutput,
    Transport,
    check_finite,
    nothing_accepted,
)
from securefml.protocols.ckks_auth import SIGNATURE_BYTES, SignedUpload, UploadSigner, VerifyKeyRegistry
from securefml.protocols.ckks_keys import (
    CKKSKeyHolder,
    CKKSPreset,
    context_fingerprint,
    get_preset,
    load_public_context,
)
from securefml.protocols.ckks_policy import (
    REFERENCE_PARTY,
    SKIP_BELOW,
    AggregateRequest,
    DecryptionPolicy,
    GramRequest,
)
from securefml.protocols.ckks_stats import PackingFrame
from securefml.protocols.plaintext_codec import decode_manifest, encode_manifest
from securefml.protocols.wire import Envelope, decode, encode, pack_array, unpack_array
from securefml.updates import LayerLayout

if TYPE_CHECKING:  # pragma: no cover
    from securefml.defenses.base import Defense

__all__ = ["CKKS", "CKKSClient", "CKKSServer", "ReceivedCiphertexts", "KIND", "MAX_ABS", "REFERENCE_PARTY"]

log = logging.getLogger(__name__)

KIND = "ckks-update"
#: Largest |entry| a client encrypts.  With scale 2^40 the add-only preset holds sums below
#: 2^19 and the statistics preset inner products below 2^59; 2^16 leaves room for any number of
#: (weight-normalised) clients and for inner products of up to 2^27 entries.
MAX_ABS = float(2**16)
_ENVELOPE_OVERHEAD = 65536


_HEADER_FIELDS = frozenset({"ctx", "layout", "frame", "layers", "weight", "scale", "chunks", "sig"})


def _ct_field(k: int) -> str:
    return f"ct.{k}"


@functools.lru_cache(maxsize=8)
def _ct_fields(n: int) -> frozenset[str]:
    return frozenset(_ct_field(k) for k in range(n))


class CKKSClient:
    """Client half: packs a client's selected layers into frame chunks and encrypts them.

    Parameters
    ----------
    public_context:
        The key holder's serialized public context (no secret key; refused otherwise).
    preset:
        The public parameters the context was made with.
    """

    def __init__(self, public_context: bytes, preset: str | CKKSPreset) -> None:
        self.preset = get_preset(preset)
        self.context = load_public_context(public_context)
        self.fingerprint = context_fingerprint(public_context)

    def encrypt(
        self,
        round_idx: int,
        update: ClientUpdate,
        frame: PackingFrame,
        *,
        signer: UploadSigner,
        layers: Sequence[str] | None = None,
        prescale: float = 1.0,
    ) -> SignedUpload:
        """Encrypt ``update`` into its frame chunks and sign them (what ``encode`` puts on the wire)."""
        if frame.slots != self.preset.slots:
            raise ConfigError(f"frame packs {frame.slots} slots, the context has {self.preset.slots}")
        if signer.party_id != update.client_id:
            raise ConfigError(f"client {update.client_id} cannot sign with party {signer.party_id}'s key")
        if not math.isfinite(prescale) or prescale <= 0:
            raise InvalidUpdateError(f"weight scale must be positive and finite, got {prescale}",
                                     sender=update.client_id)
        own = frame.layout.canonical(update.layers)
        chosen = own if layers is None else frame.layout.canonical(layers)
        if not set(chosen) <= set(own):
            raise ConfigError(f"client {update.client_id} cannot upload layers it did not compute: {chosen}")
        vec = update.vector.detach().to("cpu", torch.float64)
        check_finite(vec, update.client_id)
        if vec.numel() and float(vec.abs().max()) * max(abs(prescale), 1.0) > MAX_ABS:
            raise InvalidUpdateError(
                f"entries beyond +-{MAX_ABS:g} would overflow the CKKS modulus; clip the update first",
                sender=update.client_id,
            )
        if vec.numel() != frame.layout.numel_of(own):
            raise InvalidUpdateError(f"vector has {vec.numel()} entries for layers {own}", sender=update.client_id)
        if chosen != own:
            vec = frame.layout.gather(frame.layout.scatter(vec, own), chosen)
        chunks = frame.pack(vec.numpy() * float(prescale), chosen)
        blobs = {k: ts.ckks_vector(self.context, arr.tolist()).serialize() for k, arr in chunks.items()}
        return signer.sign(context=self.fingerprint, round_idx=round_idx, frame=frame.fingerprint(),
                           layers=chosen, weight=float(update.weight), prescale=float(prescale), chunks=blobs)

    def encode(
        self,
        round_idx: int,
        update: ClientUpdate,
        frame: PackingFrame,
        *,
        signer: UploadSigner,
        layers: Sequence[str] | None = None,
        prescale: float = 1.0,
    ) -> bytes:
        """Encrypt and sign ``update`` (restricted to ``layers``, default all of its layers) as envelope bytes.

        ``signer`` is the client's enrolled Ed25519 key (its ``party_id`` must be the update's
        client id); the signature binds the ciphertexts to round, sender, frame and ``prescale``.
        ``prescale`` multiplies the plaintext before encryption: for a weighted mean the
        client encrypts ``(weight / W) * update`` with the round's public normalizer W, so the
        server only adds (no multiplicative level is spent, which the add-only preset lacks).
        """
        signed = self.encrypt(round_idx, update, frame, signer=signer, layers=layers, prescale=prescale)
        chosen = signed.layers
        blobs = signed.chunks
        fields: dict[str, bytes] = {
            "ctx": self.fingerprint,
            "layout": frame.layout_fingerprint,
            "frame": frame.fingerprint(),
            "layers": encode_manifest(chosen),
            "weight": struct.pack(">d", float(update.weight)),
            "scale": struct.pack(">d", float(prescale)),
            "chunks": pack_array(np.asarray(sorted(blobs), dtype=np.uint32)),
            "sig": signed.signature,
        }
        for k, blob in blobs.items():
            fields[_ct_field(k)] = bytes(blob)  # a no-op for the bytes TenSEAL serializes to
        return encode(Envelope(KIND, round_idx, update.client_id, fields))


@dataclass
class ReceivedCiphertexts:
    """A validated client message: its chunk ciphertexts, bound to the server's context."""

    client_id: int
    weight: float
    layers: tuple[str, ...]
    chunks: dict[int, ts.CKKSVector]
    nbytes: int
    digests: tuple[bytes, ...] = field(default=(), repr=False)
    upload: SignedUpload | None = field(default=None, repr=False)


class CKKSServer:
    """Server half: public context only; validates, adds, weights and multiplies ciphertexts.

    A message is rejected with a ``ProtocolError`` subclass naming its sender when it is for
    another round, sender, context, layout or packing frame; when its blob is oversized or
    truncated; when a ciphertext does not load under the context (other parameters) or has the
    wrong size, scale or level; or when a ciphertext repeats one already received (from any
    sender, this round or the last ``replay_window`` rounds).  CKKS ciphertexts are malleable
    and not authenticated: a ciphertext made under a different key with the *same* parameters
    cannot be detected here; it decrypts to noise inside the aggregate (a Byzantine update).
    With ``verify_keys`` (the enrolled clients' public verify keys), an upload whose signature
    does not verify is rejected here with a ``DecryptionError`` naming its sender, so the key
    holder (which checks again) is only sent well-signed uploads and the round goes on.

    Parameters
    ----------
    public_context:
        The key holder's serialized public context.
    preset:
        The public parameters the context was made with.
    verify_keys:
        The clients' verify keys (public); ``None`` skips the early signature check.
    replay_window:
        How many past rounds' ciphertext digests to remember.
    """

    def __init__(
        self,
        public_context: bytes,
        preset: str | CKKSPreset,
        *,
        verify_keys: VerifyKeyRegistry | None = None,
        replay_window: int = 8,
    ) -> None:
        self.preset = get_preset(preset)
        self.context = load_public_context(public_context)
        self.fingerprint = context_fingerprint(public_context)
        if replay_window < 0:
            raise ConfigError(f"replay_window must be >= 0, got {replay_window}")
        self.replay_window = int(replay_window)
        self.verify_keys = verify_keys
        self._seen: dict[bytes, tuple[int, int]] = {}

    def is_private(self) -> bool:
        """False by construction: the server's context never holds the secret key."""
        return bool(self.context.is_private())

    def max_message_bytes(self, frame: PackingFrame) -> int:
        return frame.n_chunks * self.preset.max_ciphertext_bytes + _ENVELOPE_OVERHEAD

    @staticmethod
    def _digest(blob: bytes | memoryview) -> bytes:
        # A fresh ciphertext is randomized; its last 256 bytes (compressed polynomial data, then
        # the scale) identify it.  A client can always re-randomize a stolen ciphertext (CKKS is
        # malleable), so this check catches verbatim replays and duplicates, not re-encryptions.
        view = memoryview(blob).cast("B")
        return hashlib.blake2b(view[-256:], digest_size=16, salt=struct.pack(">Q", len(view))).digest()

    def decode(
        self,
        round_idx: int,
        sender: int,
        data: bytes,
        frame: PackingFrame,
        *,
        strict: bool = True,
        into: dict[int, list] | None = None,
        normalizer: float | None = None,
    ) -> ReceivedCiphertexts:
        """Validate one client message and load its ciphertexts under the public context.

        Parameters
        ----------
        normalizer:
            The round's public weight normalizer W: the message's signed scale must then be
            ``weight / W`` (a weighted mean); ``None``: it must be 1 (robust rounds).
        strict:
            Check every ciphertext's size, level, NTT form and scale (needed before
            multiplications).
        into:
            Running chunk sums (``chunk -> [ciphertext, count]``): each ciphertext is added as
            soon as it is loaded (while it is still in cache) and the returned record keeps no
            ciphertexts.  The first ciphertext of a chunk seeds its sum and is checked strictly;
            TenSEAL/SEAL refuse to add one of another size, scale or form to it.  A lower-level
            or size-3 ciphertext still sums and decrypts correctly, so a sum needs no other
            per-ciphertext check.  If the message is rejected at any point, its additions are
            undone exactly (CKKS addition is modular arithmetic) before the error propagates.
        """
        # ciphertext fields stay views into ``data``: each is copied just before it is loaded and
        # dropped right after, so the copies reuse warm memory instead of faulting in a new buffer
        env = decode(data, sender=sender, max_bytes=self.max_message_bytes(frame), views=_ct_fields(frame.n_chunks))
        env.expect(kind=KIND, round=round_idx, sender=sender)
        if env.field("ctx") != self.fingerprint:
            raise ProtocolError("ciphertexts were made under another CKKS context", sender=sender)
        if env.field("layout") != frame.layout_fingerprint:
            raise ProtocolError("update was built for another model layout", sender=sender)
        if env.field("frame") != frame.fingerprint():
            raise ProtocolError("update was packed for another packing frame", sender=sender)
        layers = decode_manifest(env.field("layers"), frame.layout, sender=sender)
        if not layers or not set(layers) <= set(frame.spans):
            raise MalformedMessageError("layer manifest is empty or outside this round's frame", sender=sender)
        raw_w = env.field("weight")
        if len(raw_w) != 8:
            raise MalformedMessageError("weight field must be 8 bytes", sender=sender)
        (weight,) = struct.unpack(">d", raw_w)
        if not math.isfinite(weight) or weight <= 0:
            raise MalformedMessageError(f"weight must be positive and finite, got {weight}", sender=sender)
        raw_s, sig = env.field("scale"), env.field("sig")
        if len(raw_s) != 8 or len(sig) != SIGNATURE_BYTES:
            raise MalformedMessageError("scale must be 8 bytes and the signature 64", sender=sender)
        (prescale,) = struct.unpack(">d", raw_s)
        expected_scale = 1.0 if normalizer is None else weight / normalizer
        if not math.isclose(prescale, expected_scale, rel_tol=1e-9):
            raise MalformedMessageError(
                f"scale {prescale} is not the round's weight / W = {expected_scale}", sender=sender
            )
        expected = frame.chunks_for(layers)
        got = tuple(int(k) for k in unpack_array(env.field("chunks"), expected_len=len(expected), sender=sender))
        if got != expected:
            raise MalformedMessageError(f"chunk list {got} does not match the layers' chunks {expected}", sender=sender)
        if set(env.fields) != _HEADER_FIELDS | {_ct_field(k) for k in got}:
            raise MalformedMessageError("unexpected or missing ciphertext fields", sender=sender)
        chunks: dict[int, ts.CKKSVector] = {}
        blobs: dict[int, bytes | memoryview] = {}
        digests = []
        try:
            for k in got:
                blob = env.fields[_ct_field(k)]  # a view into ``data``: copied only to load it
                vec = self._load(blob, frame.slots, sender, strict=strict)
                digests.append(self._digest(blob))
                blobs[k] = blob
                if into is not None:
                    self._add(into, k, vec, sender)
                chunks[k] = vec
            upload = SignedUpload(sender, round_idx, frame.fingerprint(), layers, float(weight), float(prescale),
                                  blobs, bytes(sig))
            if self.verify_keys is not None:
                self.verify_keys.verify(upload, self.fingerprint)
            self._check_replay(round_idx, sender, digests)
        except Exception:
            if into is not None:
                self._undo(into, chunks)
            raise
        kept = {} if into is not None else chunks
        return ReceivedCiphertexts(sender, float(weight), layers, kept, len(data), tuple(digests), upload)

    def _add(self, sums: dict[int, list], k: int, vec: ts.CKKSVector, sender: int) -> None:
        slot = sums.get(k)
        if slot is None:  # this ciphertext seeds the sum: every later one is added to it
            self.check_fresh(vec, self.preset.slots, sender)
            sums[k] = [vec, 1]
            return
        try:
            slot[0].add_(vec)  # SEAL refuses a size / scale / form mismatch before writing
        except Exception:
            raise MalformedMessageError(
                "a ciphertext cannot be added to the others (size, scale or form mismatch)", sender=sender
            ) from None
        slot[1] += 1

    @staticmethod
    def _undo(sums: dict[int, list], added: Mapping[int, ts.CKKSVector]) -> None:
        for k, vec in added.items():
            slot = sums[k]
            if slot[1] == 1 and slot[0] is vec:
                del sums[k]
            else:
                slot[0].sub_(vec)
                slot[1] -= 1

    def _load(self, blob: bytes | memoryview, size: int, sender: int, *, strict: bool = True) -> ts.CKKSVector:
        if len(blob) > self.preset.max_ciphertext_bytes:
            raise MalformedMessageError(f"ciphertext of {len(blob)} bytes is oversized", sender=sender)
        try:
            vec = ts.ckks_vector_from(self.context, blob if isinstance(blob, bytes) else bytes(blob))
        except Exception:
            raise MalformedMessageError(
                "ciphertext does not load under this context (truncated, corrupt or other parameters)", sender=sender
            ) from None
        if strict:
            self.check_fresh(vec, size, sender)
        return vec

    def check_fresh(self, vec: ts.CKKSVector, size: int, sender: int) -> None:
        """Raise ``MalformedMessageError`` unless ``vec`` is one fresh ciphertext of ``size`` slots."""
        if vec.size() != size:
            raise MalformedMessageError(f"ciphertext holds {vec.size()} slots, expected {size}", sender=sender)
        cts = vec.ciphertext()
        if len(cts) != 1:
            raise MalformedMessageError("a chunk must be exactly one ciphertext", sender=sender)
        ct = cts[0]
        if (
            ct.size() != 2
            or ct.coeff_modulus_size() != self.preset.fresh_primes
            or not ct.is_ntt_form()
            or abs(ct.scale - self.preset.scale) > 1e-6 * self.preset.scale
        ):
            raise MalformedMessageError("ciphertext is not a fresh encryption at this context's scale", sender=sender)

    def _check_replay(self, round_idx: int, sender: int, digests: Sequence[bytes]) -> None:
        horizon = round_idx - self.replay_window
        self._seen = {d: rs for d, rs in self._seen.items() if rs[0] >= horizon}
        if len(set(digests)) != len(digests):
            raise ReplayError("the message repeats one of its own ciphertexts", sender=sender)
        for d in digests:
            if d in self._seen:
                rnd, who = self._seen[d]
                raise ReplayError(f"ciphertext replays one sent by client {who} in round {rnd}", sender=sender)
        for d in digests:
            self._seen[d] = (round_idx, sender)

    def state_dict(self) -> dict[str, object]:
        return {"seen": {d.hex(): list(rs) for d, rs in self._seen.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        seen = state.get("seen", {})
        assert isinstance(seen, Mapping)
        self._seen = {bytes.fromhex(d): (int(rs[0]), int(rs[1])) for d, rs in seen.items()}


class CKKS(AggregationProtocol):
    """Clients upload signed CKKS-encrypted selected layers; the server never holds the secret key.

    With ``Mean`` the clients pre-scale by their weight over the round's public total, and the
    key holder decrypts, per frame chunk, the plain sum of the signed ciphertexts of the
    clients that sent it (per layer, over the clients that sent that layer).  With a rule that
    runs on geometry (``runs_on`` contains ``Reveals.GRAM``) the key holder computes and
    decrypts the Gram matrix of the round's signed uploads (squared norms, pairwise inner
    products, inner products with the reference party's signed reference), the rule returns
    per-client coefficients, and the key holder decrypts the coefficient-weighted sum it
    computes itself.  The server validates, forwards, and asks; ``ckks_policy`` states what the
    key holder agrees to.

    Threat model
    ------------
    Server: curious and free to send the key holder any request (a deviating server is refused
    by the key holder's policy, tested with hypothesis); holds the public context only.  Key
    holder: follows its policy and does not collude with the server; it receives individual
    signed ciphertexts (it must, to recompute what it decrypts) and is trusted not to decrypt
    them one by one.  Clients: up to f Byzantine clients send anything, honest ones may drop
    out; a client's verify key is enrolled with the key holder out of band (``enroll``).
    Declared leakage: participants, each client's layer manifest and weight (so per-layer
    upload counts), and in robust mode the ``Gram`` and the rule's coefficients.

    A rule whose output is one client's update (``Krum``, ``MultiKrum`` with
    ``m < min_contributors``: its ``selects`` attribute) is refused up front with a
    ``ConfigError`` (``check_defense``): under CKKS the key holder would decrypt that update.  A
    rule whose coefficients in a given round fall outside the policy (e.g. one client carrying
    more than ``max_share`` of the weight) gets its aggregate withheld for that round
    (``extras["policy_refused"]``, the model keeps its value), as a layer too few clients
    sent is withheld under ``Mean``.

    CKKS ciphertexts are malleable, and nothing proves a ciphertext's plaintext is in range: a
    Byzantine client can encrypt entries beyond ``MAX_ABS`` (honest clients refuse to) so that
    its decrypted statistics wrap around the modulus and look small.  Closing that needs
    zero-knowledge range proofs, which this protocol does not have; pair CKKS with rules that
    also bound the aggregate (e.g. norm bounding of the result).  Signatures stop a third party
    from altering or replaying a client's ciphertexts, not the client itself.

    Assumptions and guarantees
    --------------------------
    The decrypted aggregate matches the plaintext one within ``ckks_stats.sum_error_bound``;
    Gram entries within ``inner_product_error_bound``.  Robust rules need every client to send
    the same layers (a server-dictated selection plan).

    Parameters
    ----------
    key_holder:
        The party with the secret key; generated with ``preset`` when omitted.
    preset:
        ``"stats"`` (default: robust rules available) or ``"add-only"`` (smallest ciphertexts,
        ``Mean`` only).
    min_contributors:
        Passed to a generated key holder's policy (ignored when ``key_holder`` or ``policy``
        is given).
    policy:
        The policy of a generated key holder; default ``DecryptionPolicy(min_contributors)``
        (whose reference party is ``REFERENCE_PARTY``).
    replay_window:
        Rounds of ciphertext digests the server remembers to reject replays.

    References
    ----------
    Cheon, Kim, Kim, Song, Homomorphic Encryption for Arithmetic of Approximate Numbers
    (CKKS), ASIACRYPT 2017.  Benaissa et al., TenSEAL, 2021.  NVIDIA FLARE homomorphic
    encryption (shared key, no robust rules).  Gram-based robust rules: Blanchard et al. 2017
    (Krum), Cao et al. 2021 (FLTrust).
    """

    name = "ckks"
    reveals = Reveals.GRAM

    # Interim (this session's architecture work): the halves of this protocol are being moved
    # behind ``server_half``/``client_half``; until then its own ``run_round`` drives it.
    def server_half(self, round_idx, layout, cohort, *, setup):  # type: ignore[no-untyped-def]
        raise NotImplementedError(f"{self.name}: server_half is being ported; use run_round")

    def client_half(self, round_idx, layout, update):  # type: ignore[no-untyped-def]
        raise NotImplementedError(f"{self.name}: client_half is being ported; use run_round")

    def __init__(
        self,
        key_holder: CKKSKeyHolder | None = None,
        *,
        preset: str | CKKSPreset = "stats",
        min_contributors: int = 2,
        policy: DecryptionPolicy | None = None,
        replay_window: int = 8,
    ) -> None:
        if key_holder is None:
            policy = policy or DecryptionPolicy(min_contributors=min_contributors)
            key_holder = CKKSKeyHolder.generate(preset, policy=policy)
        self.key_holder = key_holder
        self.preset = self.key_holder.preset
        public = self.key_holder.public_context_bytes()
        # the key holder checks every signature and names a bad signer; the server does not hash the
        # ciphertexts a second time (pass ``verify_keys`` to a CKKSServer to reject them on arrival)
        self.server = CKKSServer(public, self.preset, replay_window=replay_window)
        self.client = CKKSClient(public, self.preset)
        self._signers: dict[int, UploadSigner] = {}

    @property
    def min_contributors(self) -> int:
        return self.key_holder.min_contributors

    @property
    def policy(self) -> DecryptionPolicy:
        return self.key_holder.policy

    def enroll(self, party_id: int) -> UploadSigner:
        """Give a party a signing key and register its verify key with the key holder and server.

        This models the out-of-band enrolment (in a deployment each client makes its own key and
        the key holder registers it through a channel the server does not control).  The
        simulation plays every client's and the reference party's part in-process.
        """
        pid = int(party_id)
        signer = self._signers.get(pid)
        if signer is None:
            if pid in self.key_holder.registry:
                raise ConfigError(
                    f"party {pid} is already enrolled with this key holder under a key this driver does not "
                    "hold; share one CKKS driver per key holder"
                )
            signer = self._signers[pid] = UploadSigner.generate(pid)
            self.key_holder.registry.register(pid, signer.verify_key())
        return signer

    def check_defense(self, defense: Defense) -> None:
        """Also refuse a rule whose output is fewer than ``min_contributors`` clients' updates."""
        super().check_defense(defense)
        selects = getattr(defense, "selects", None)
        mins = self.min_contributors
        if selects is not None and int(selects) < mins:
            raise ConfigError(
                f"defense {defense!r} outputs a combination of at most {selects} client update(s), "
                f"i.e. one client's update when it keeps one; under CKKS the key holder would decrypt it, "
                f"and its policy needs at least {mins} contributors: use MultiKrum(m >= {mins}) or an averaging rule"
            )
        if defense.needs_reference and self.policy.reference_party is None:
            raise ConfigError(
                f"defense {defense!r} needs a reference, and the key holder's policy names no reference party"
            )

    def frame_for(self, layout: LayerLayout, layer_sets: Sequence[Sequence[str]]) -> PackingFrame:
        """The round's packing frame: layers announced by at least ``min_contributors`` clients."""
        counts = Counter(name for layers in layer_sets for name in set(layout.canonical(layers)))
        chosen = tuple(n for n in layout.layer_names if counts[n] >= self.min_contributors)
        return PackingFrame(layout, chosen, self.preset.slots)

    def run_round(
        self,
        round_idx: int,
        updates: Sequence[ClientUpdate],
        layout: LayerLayout,
        *,
        defense: Defense,
        transport: Transport | None = None,
        reference: torch.Tensor | None = None,
        context: Mapping[str, object] | None = None,
    ) -> RoundOutput:
        self.check_defense(defense)
        gram_mode = not defense.is_weighted_mean
        if gram_mode and not self.preset.statistics:
            raise ConfigError(
                f"defense {defense!r} needs encrypted statistics; preset {self.preset.name!r} has no "
                "relinearization/Galois keys (use preset='stats')"
            )
        t_start = time.perf_counter()
        transport = transport or Transport()
        announced: dict[int, tuple[str, ...]] = {}
        for u in updates:
            announced.setdefault(u.client_id, layout.canonical(u.layers))
        if gram_mode and len(set(announced.values())) > 1:
            raise ConfigError(
                f"defense {defense!r} needs every client to upload the same layers; "
                "use a server-dictated selection plan with robust rules"
            )
        frame = self.frame_for(layout, list(announced.values()))
        weights_ok = [float(u.weight) for u in updates if math.isfinite(float(u.weight)) and float(u.weight) > 0]
        norm = sum(weights_ok) or 1.0  # the round's public weight normalizer W

        received: dict[int, ReceivedCiphertexts] = {}
        sums: dict[int, list] = {}  # mean mode: the server checks each ciphertext adds to the others
        rejected: dict[int, str] = {}
        nbytes = n_cts = carried = offered = 0
        t_enc = t_srv = 0.0
        for upd in updates:
            cid = upd.client_id
            chosen = tuple(n for n in layout.canonical(upd.layers) if n in frame.spans)
            if not chosen:
                continue  # nothing of this client's is aggregated this round: it sends nothing
            offered += 1
            signer = self.enroll(cid)
            t0 = time.perf_counter()
            try:
                prescale = 1.0 if gram_mode else float(upd.weight) / norm
                sent = self.client.encode(round_idx, upd, frame, signer=signer, layers=chosen, prescale=prescale)
            except (InvalidUpdateError, ProtocolError) as exc:
                self.record_rejection(rejected, cid, exc)
                continue
            t_enc += time.perf_counter() - t0
            n_cts += len(frame.chunks_for(chosen))
            carried += layout.numel_of(chosen)
            msg = transport.deliver(cid, "update", sent)
            if msg is None:
                continue
            nbytes += len(msg)
            t0 = time.perf_counter()
            try:
                if cid in received:
                    raise ReplayError("duplicate message in this round", sender=cid)
                received[cid] = self.server.decode(
                    round_idx, cid, msg, frame, strict=gram_mode, into=None if gram_mode else sums,
                    normalizer=None if gram_mode else norm,
                )
            except Exception as exc:  # typed errors recorded, anything else re-raised
                self.record_rejection(rejected, cid, exc)
            t_srv += time.perf_counter() - t0

        extras: dict[str, object] = {
            "preset": self.preset.name,
            "mode": "gram" if gram_mode else "sum",
            "bytes_uploaded": nbytes,
            "ciphertexts": n_cts,
            "slot_utilisation": carried / (n_cts * self.preset.slots) if n_cts else 0.0,
            "bytes_per_float": nbytes / carried if carried else 0.0,
            "frame_layers": frame.layers,
        }
        timing = {"encrypt_s": t_enc, "server_receive_s": t_srv}
        clients = list(received.values())
        if not clients and (rejected or offered):
            # every client that had something to send was rejected or lost (when the frame
            # withholds every layer, below min_contributors, nobody sends and the round is empty)
            raise nothing_accepted(round_idx, offered, rejected)
        if gram_mode:
            out = self._robust(round_idx, layout, frame, clients, defense, reference, context, timing, rejected)
        else:
            out = self._mean(round_idx, layout, frame, clients, norm, timing, rejected)
        out.rejected = rejected
        out.bytes_uploaded = nbytes
        timing["total_s"] = time.perf_counter() - t_start
        extras["timing"] = timing
        out.extras.update(extras)
        return out

    def _drop_blamed(
        self, exc: DecryptionError, clients: Sequence[ReceivedCiphertexts], rejected: dict[int, str]
    ) -> list[ReceivedCiphertexts]:
        """The key holder named a client whose upload it cannot verify: reject it, ask again.

        The key holder checks every signature before it decrypts or records anything, so the
        request can be repeated without that client; an error naming nobody propagates.
        """
        ids = {c.client_id for c in clients}
        if exc.sender is None or exc.sender not in ids:
            raise exc
        self.record_rejection(rejected, exc.sender, exc)
        return [c for c in clients if c.client_id != exc.sender]

    def _refused(self, uploads: Sequence[SignedUpload], name: str) -> bool:
        """Whether the key holder's policy refuses layer ``name`` summed over these uploads."""
        eff = {u.sender: u.prescale for u in uploads if name in u.layers}
        return bool(eff) and self.policy.violation(eff) is not None

    @staticmethod
    def _uploads(clients: Sequence[ReceivedCiphertexts]) -> tuple[SignedUpload, ...]:
        ups = tuple(c.upload for c in clients)
        if any(u is None for u in ups):  # pragma: no cover - decode always attaches the upload
            raise ProtocolError("a received message carries no signed upload")
        return ups  # type: ignore[return-value]

    # -- weighted mean: the key holder adds the signed ciphertexts --------------------------------
    def _mean(
        self,
        round_idx: int,
        layout: LayerLayout,
        frame: PackingFrame,
        clients: Sequence[ReceivedCiphertexts],
        norm: float,
        timing: dict[str, float],
        rejected: dict[int, str],
    ) -> RoundOutput:
        mins = self.min_contributors
        t0 = time.perf_counter()
        while True:
            uploads = self._uploads(clients)
            carried = {k for u in uploads for k in u.chunks}
            refused = {n for n in frame.layers if self._refused(uploads, n)}  # asked before sending
            withheld = {k for k in carried if set(frame.layers_in_chunk(k)) & refused}
            wanted = tuple(sorted(carried - withheld))
            if not wanted:
                dec: dict[int, np.ndarray] = {}
                break
            try:
                dec = self.key_holder.decrypt_aggregate(
                    AggregateRequest(round_idx, frame, uploads, {u.sender: 1.0 for u in uploads}, wanted)
                )
                break
            except DecryptionError as exc:
                clients = self._drop_blamed(exc, clients, rejected)
        packed = np.zeros(frame.numel, dtype=np.float64)
        for k in wanted:
            lo, hi = frame.chunk_range(k)
            packed[lo:hi] = dec[k][: hi - lo]
        timing["decrypt_s"] = time.perf_counter() - t0
        counts = Counter(n for c in clients for n in c.layers)
        totals: defaultdict[str, float] = defaultdict(float)
        for c in clients:
            for n in c.layers:
                totals[n] += c.weight
        full = torch.zeros(layout.numel, dtype=torch.float64)
        layer_weight = dict.fromkeys(layout.layer_names, 0.0)
        dropped_layers = []
        slices = layout.slices()
        for name, (a, b) in frame.spans.items():
            chunks = range(a // frame.slots, (b - 1) // frame.slots + 1) if b > a else range(0)
            if counts[name] < mins or any(k in withheld for k in chunks):
                if counts[name]:
                    dropped_layers.append(name)
                continue
            full[slices[name]] = torch.from_numpy(packed[a:b] * (norm / totals[name]))
            layer_weight[name] = float(totals[name])
        ids = tuple(c.client_id for c in clients)
        out = RoundOutput(full.to(torch.float32), layer_weight, ids)
        out.extras["withheld_layers"] = tuple(dropped_layers)
        out.extras["layer_counts"] = {n: int(counts[n]) for n in layout.layer_names}
        return out

    def _reference_upload(
        self, round_idx: int, layout: LayerLayout, frame: PackingFrame, reference: torch.Tensor
    ) -> SignedUpload:
        """The reference party encrypts and signs its reference (played in-process here)."""
        party = self.policy.reference_party
        if party is None:
            raise ConfigError("a reference was given, and the key holder's policy names no reference party")
        r = reference.detach().to("cpu", torch.float64).reshape(-1)
        if r.numel() == layout.numel:
            r = layout.gather(r, frame.layers)
        if r.numel() != frame.numel:
            raise ConfigError(f"reference has {r.numel()} entries; expected {layout.numel} (full layout)")
        if r.numel() and float(r.abs().max()) > MAX_ABS:
            raise ConfigError(f"reference entries beyond +-{MAX_ABS:g} would overflow the CKKS modulus")
        upd = ClientUpdate(party, r.to(torch.float32), frame.layers, 1.0)
        return self.client.encrypt(round_idx, upd, frame, signer=self.enroll(party))

    # -- robust: Gram of the signed uploads -> rule -> weighted sum, both by the key holder ----
    def _robust(
        self,
        round_idx: int,
        layout: LayerLayout,
        frame: PackingFrame,
        clients: Sequence[ReceivedCiphertexts],
        defense: Defense,
        reference: torch.Tensor | None,
        context: Mapping[str, object] | None,
        timing: dict[str, float],
        rejected: dict[int, str],
    ) -> RoundOutput:
        ref_upload = None if reference is None else self._reference_upload(round_idx, layout, frame, reference)
        t0 = time.perf_counter()
        while True:
            ids = tuple(c.client_id for c in clients)
            empty = RoundOutput(torch.zeros(layout.numel), dict.fromkeys(layout.layer_names, 0.0), ids)
            empty.extras["layer_counts"] = {n: (len(clients) if n in frame.spans else 0) for n in layout.layer_names}
            if len(clients) < self.min_contributors or frame.numel == 0:
                empty.extras["withheld_layers"] = frame.layers if clients else ()
                return empty
            uploads = self._uploads(clients)
            try:
                gram = self.key_holder.decrypt_gram(GramRequest(round_idx, frame, uploads, ref_upload))
                break
            except DecryptionError as exc:
                clients = self._drop_blamed(exc, clients, rejected)
        timing["gram_s"] = timing["decrypt_gram_s"] = time.perf_counter() - t0
        sample_w = torch.tensor([c.weight for c in clients], dtype=torch.float64)
        result = defense.aggregate_gram(gram, sample_w, context=dict(context or {}))
        coeffs = result.weights
        if coeffs is None or coeffs.numel() != len(clients) or not torch.isfinite(coeffs).all():
            raise ConfigError(f"defense {defense!r} returned no valid per-client weights from the Gram")
        coeff_map = {c.client_id: float(x) for c, x in zip(clients, coeffs.to(torch.float64))}
        reason = self.policy.violation(coeff_map)
        if reason is not None:  # the key holder would refuse: do not ask, keep the model as it is
            log.warning("round %d: aggregate withheld, outside the key holder's policy: %s", round_idx, reason)
            out = RoundOutput(empty.aggregate, empty.layer_weight, ids, flagged=tuple(result.flagged), defense=result)
            out.extras.update(gram=gram, withheld_layers=frame.layers, layer_counts=empty.extras["layer_counts"],
                              policy_refused=reason)
            return out
        t0 = time.perf_counter()
        dec = self.key_holder.decrypt_aggregate(AggregateRequest(round_idx, frame, uploads, coeff_map))
        vec = np.concatenate([dec[k][: frame.chunk_len(k)] for k in range(frame.n_chunks)])
        timing["decrypt_s"] = time.perf_counter() - t0
        noise_std = float(result.info.get("noise_std", 0.0) or 0.0)
        if noise_std > 0:
            # rules such as FLAME add Gaussian noise to the aggregate: it is added right after
            # decryption, before the aggregate leaves the protocol
            gen = (context or {}).get("generator")
            noise = torch.randn(vec.shape, generator=gen if isinstance(gen, torch.Generator) else None,
                                dtype=torch.float64)
            vec = vec + noise_std * noise.numpy()
        full = layout.scatter(torch.from_numpy(vec).to(torch.float32), frame.layers)
        kept = sum(c.weight for c in clients if abs(coeff_map[c.client_id]) > SKIP_BELOW)
        layer_weight = {n: (float(kept) if n in frame.spans else 0.0) for n in layout.layer_names}
        out = RoundOutput(full, layer_weight, ids, flagged=tuple(result.flagged), defense=result)
        out.extras["gram"] = gram
        out.extras["withheld_layers"] = ()
        out.extras["layer_counts"] = empty.extras["layer_counts"]
        return out
