"""Signed CKKS uploads: what a client vouches for, and the registry that checks it.

Why
---
CKKS ciphertexts carry no authentication, and the key holder (``ckks_keys``) cannot tell a sum
of many clients' ciphertexts from one client's ciphertext.  So the key holder decrypts only
what it computes itself from ciphertexts that their authors signed.  Each client signs, with
Ed25519, one *upload statement* per round::

    SHA-256( "securefml-ckks-upload-v1" || context fingerprint || round || sender
             || frame fingerprint || layer manifest || weight || prescale
             || for each chunk k: k || SHA-256(ciphertext k) )

It binds the ciphertexts (by their SHA-256 digests) to the key set, the round, the sender, the
round's packing frame, the layers the client says it filled, its declared weight (sample
count), and the factor it multiplied its update by before encrypting (``weight / W`` for a
weighted mean, 1 for a robust round).  The key holder learns each client's effective weight in
a combination from that signed factor, not from the server.

Registration of verify keys is out of band (enrolment): ``VerifyKeyRegistry`` is the key
holder's own table of client (and reference-party) verify keys; the server may hold a copy of
the public keys to reject badly signed uploads early and blame their sender.  A party that
can register keys can add Sybil clients: enrolment is a trust assumption, not something this
module can check.

References
----------
Bernstein, Duif, Lange, Schwabe, Yang, High-speed high-security signatures (Ed25519), 2012.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from securefml.errors import ConfigError, DecryptionError

__all__ = ["SIGNATURE_BYTES", "UploadSigner", "SignedUpload", "VerifyKeyRegistry", "upload_statement"]

_DOMAIN = b"securefml-ckks-upload-v1\x00"
SIGNATURE_BYTES = 64


def upload_statement(
    *,
    context: bytes,
    round_idx: int,
    sender: int,
    frame: bytes,
    layers: tuple[str, ...],
    weight: float,
    prescale: float,
    chunks: Mapping[int, bytes | memoryview],
) -> bytes:
    """The 32-byte digest a client signs for one upload (see the module docstring)."""
    h = hashlib.sha256(_DOMAIN)
    h.update(context)
    h.update(struct.pack(">qq", int(round_idx), int(sender)))
    h.update(frame)
    manifest = "\n".join(layers).encode("utf-8")
    h.update(struct.pack(">I", len(manifest)) + manifest)
    h.update(struct.pack(">ddI", float(weight), float(prescale), len(chunks)))
    for k in sorted(chunks):
        h.update(struct.pack(">I", int(k)))
        h.update(hashlib.sha256(chunks[k]).digest())
    return h.digest()


@dataclass(frozen=True)
class SignedUpload:
    """One client's ciphertexts for one round, with the signature over their statement.

    Attributes
    ----------
    sender, round_idx:
        Who signed it, for which round.
    frame:
        Fingerprint of the round's ``PackingFrame``.
    layers:
        The frame layers the client filled (layout order); its other slots are zeros.
    weight:
        The client's declared weight (sample count), used by robust rules.
    prescale:
        The factor the client multiplied its update by before encrypting.
    chunks:
        Chunk index -> serialized fresh ciphertext (``bytes``, or a view into the received
        message, so the server keeps no second copy).
    signature:
        Ed25519 signature over ``upload_statement`` of all of the above.
    """

    sender: int
    round_idx: int
    frame: bytes
    layers: tuple[str, ...]
    weight: float
    prescale: float
    chunks: Mapping[int, bytes | memoryview] = field(repr=False)
    signature: bytes = field(repr=False)

    def statement(self, context: bytes) -> bytes:
        return upload_statement(
            context=context, round_idx=self.round_idx, sender=self.sender, frame=self.frame,
            layers=self.layers, weight=self.weight, prescale=self.prescale, chunks=self.chunks,
        )


class UploadSigner:
    """A client's (or the reference party's) Ed25519 signing key; serialized only to provision its party.

    Build one with ``UploadSigner.generate(party_id)``; hand ``verify_key()`` to the key
    holder's registry out of band.
    """

    def __init__(self, party_id: int, _key: Ed25519PrivateKey) -> None:
        self.party_id = int(party_id)
        self._key = _key

    @classmethod
    def generate(cls, party_id: int) -> UploadSigner:
        return cls(party_id, Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, party_id: int, raw: bytes) -> UploadSigner:
        """Load a provisioned 32-byte raw Ed25519 key (``ConfigError`` if it is not one)."""
        try:
            return cls(party_id, Ed25519PrivateKey.from_private_bytes(bytes(raw)))
        except ValueError:
            raise ConfigError(f"party {party_id}: not a 32-byte Ed25519 signing key") from None

    def private_bytes(self) -> bytes:
        """The raw 32-byte key, for writing it to its own party's machine when provisioning only."""
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def verify_key(self) -> bytes:
        """The 32-byte raw Ed25519 public key."""
        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(
        self, *, context: bytes, round_idx: int, frame: bytes, layers: tuple[str, ...], weight: float,
        prescale: float, chunks: Mapping[int, bytes],
    ) -> SignedUpload:
        """Sign these ciphertexts as this party's upload for ``round_idx``."""
        if not math.isfinite(prescale) or not math.isfinite(weight):
            raise ConfigError(f"weight and prescale must be finite, got {weight}, {prescale}")
        blobs = {int(k): bytes(v) for k, v in chunks.items()}
        stmt = upload_statement(context=context, round_idx=round_idx, sender=self.party_id, frame=frame,
                                layers=layers, weight=weight, prescale=prescale, chunks=blobs)
        return SignedUpload(self.party_id, int(round_idx), frame, tuple(layers), float(weight), float(prescale),
                            blobs, self._key.sign(stmt))

    def __repr__(self) -> str:
        return f"UploadSigner(party_id={self.party_id}, verify_key={self.verify_key().hex()[:16]}...)"


class VerifyKeyRegistry:
    """Verify keys of the enrolled parties (client ids, and the reference party's id).

    Enrolment is out of band: ``register`` models it.  A party id is bound to one key for
    good; re-registering it with another key raises ``ConfigError`` (no silent key swap).
    """

    def __init__(self) -> None:
        self._keys: dict[int, Ed25519PublicKey] = {}
        self._raw: dict[int, bytes] = {}

    def register(self, party_id: int, verify_key: bytes) -> None:
        pid = int(party_id)
        raw = bytes(verify_key)
        if pid in self._raw:
            if self._raw[pid] != raw:
                raise ConfigError(f"party {pid} is already enrolled with another verify key")
            return
        try:
            key = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            raise ConfigError(f"party {pid}: not a 32-byte Ed25519 verify key") from None
        self._keys[pid] = key
        self._raw[pid] = raw

    def __contains__(self, party_id: object) -> bool:
        return party_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, upload: SignedUpload, context: bytes) -> None:
        """Raise ``DecryptionError`` naming the sender unless its signature checks under its key."""
        key = self._keys.get(upload.sender)
        if key is None:
            raise DecryptionError("upload from a party that is not enrolled", sender=upload.sender)
        if len(upload.signature) != SIGNATURE_BYTES:
            raise DecryptionError("upload signature does not verify", sender=upload.sender)
        try:
            key.verify(upload.signature, upload.statement(context))
        except InvalidSignature:
            raise DecryptionError("upload signature does not verify", sender=upload.sender) from None

    def state_dict(self) -> dict[str, object]:
        return {"keys": {str(p): k.hex() for p, k in self._raw.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        keys = state.get("keys", {})
        if not isinstance(keys, Mapping):
            raise ConfigError("registry state must map party ids to hex keys")
        for p, k in keys.items():
            self.register(int(p), bytes.fromhex(str(k)))
