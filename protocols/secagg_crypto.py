"""The SecAgg+ key schedule on ``cryptography``: X25519, HKDF-SHA256, AES-256-GCM, Ed25519.

Why each piece (the key schedule of Bonawitz et al., CCS 2017):

- two fresh X25519 key pairs per client per round: ``c`` keys make the pairwise channel that
  seals Shamir shares, ``s`` keys make the pairwise mask seeds.  Keeping them apart means a
  reconstructed masking key (of a dropped client) reveals nothing about the channel keys.
- HKDF-SHA256 turns each raw shared secret into a 256-bit key whose ``info`` binds the
  purpose, the round and the (unordered) pair, so no key is reused across rounds or roles.
- AES-256-GCM seals a share pair; its associated data binds round, sender and receiver, and
  the nonce is the sender's id (each direction of a pair seals exactly one message per round
  under a key that exists for that round only), so a share cannot be replayed from another
  round or redirected to another client without failing authentication.
- Ed25519 (active-server option) signs the key advertisement, the share complaints and the
  survivor list of the consistency round with a long-term identity key the clients know from
  a PKI.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securefml.errors import DecryptionError, MalformedMessageError
from securefml.protocols.secagg_messages import pack_ids

__all__ = [
    "KeyPair",
    "generate_keypair",
    "public_of",
    "pair_key",
    "seal_share",
    "open_share",
    "SEALED_BYTES",
    "sign",
    "verify",
    "advert_payload",
    "consistency_payload",
    "complaints_payload",
    "commit_seed",
]

SHARE_PAIR_BYTES = 66  # two 33-byte Shamir shares
SEALED_BYTES = SHARE_PAIR_BYTES + 16


class KeyPair:
    """Raw 32-byte X25519 private and public keys (raw bytes, so a state can be copied or stored)."""

    __slots__ = ("private", "public", "_key")

    def __init__(self, private: bytes, public: bytes) -> None:
        self.private = private
        self.public = public
        self._key: X25519PrivateKey | None = None

    def key(self) -> X25519PrivateKey:
        """The private key as a ``cryptography`` object, parsed once (a client uses it once per neighbour)."""
        if self._key is None:
            self._key = X25519PrivateKey.from_private_bytes(self.private)
        return self._key

    def __repr__(self) -> str:  # never show the private key
        return f"KeyPair(public={self.public.hex()[:16]}...)"


def generate_keypair() -> KeyPair:
    sk = X25519PrivateKey.generate()
    pair = KeyPair(sk.private_bytes_raw(), sk.public_key().public_bytes_raw())
    pair._key = sk
    return pair


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def pair_key(private: bytes | X25519PrivateKey, peer_public: bytes, *, purpose: bytes, round_idx: int, a: int, b: int,
             sender: int | None = None) -> bytes:
    """HKDF-SHA256 of X25519(private, peer_public), bound to purpose, round and the pair {a, b}."""
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
        own = X25519PrivateKey.from_private_bytes(private) if isinstance(private, bytes) else private
        shared = own.exchange(peer)
    except ValueError as exc:  # wrong length, or a low-order point giving an all-zero secret
        raise MalformedMessageError(f"unusable X25519 public key: {exc}", sender=sender) from None
    lo, hi = min(a, b), max(a, b)
    info = b"securefml/secagg/" + purpose + struct.pack(">III", round_idx, lo, hi)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _share_ad(round_idx: int, sender: int, receiver: int) -> bytes:
    return b"securefml/secagg/share" + struct.pack(">III", round_idx, sender, receiver)


def seal_share(key: bytes, plaintext: bytes, *, round_idx: int, sender: int, receiver: int) -> bytes:
    nonce = struct.pack(">I", sender) + bytes(8)
    return AESGCM(key).encrypt(nonce, plaintext, _share_ad(round_idx, sender, receiver))


def open_share(key: bytes, sealed: bytes, *, round_idx: int, sender: int, receiver: int) -> bytes:
    """Open a sealed share pair or raise ``DecryptionError`` naming ``sender``."""
    nonce = struct.pack(">I", sender) + bytes(8)
    try:
        return AESGCM(key).decrypt(nonce, sealed, _share_ad(round_idx, sender, receiver))
    except (InvalidTag, ValueError):
        raise DecryptionError("sealed share failed authentication", sender=sender) from None


def advert_payload(round_idx: int, client: int, c_pk: bytes, s_pk: bytes) -> bytes:
    return b"securefml/secagg/advertise" + struct.pack(">II", round_idx, client) + c_pk + s_pk


def consistency_payload(round_idx: int, survivors: Iterable[int]) -> bytes:
    return b"securefml/secagg/consistency" + struct.pack(">I", round_idx) + pack_ids(survivors)


def complaints_payload(round_idx: int, client: int, accused: Iterable[int]) -> bytes:
    return b"securefml/secagg/complaints" + struct.pack(">II", round_idx, client) + pack_ids(accused)


def sign(identity: Ed25519PrivateKey, payload: bytes) -> bytes:
    return identity.sign(payload)


def verify(public: bytes, signature: bytes, payload: bytes, *, sender: int) -> None:
    """Raise ``DecryptionError`` naming ``sender`` unless ``signature`` is valid."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, payload)
    except (InvalidSignature, ValueError):
        raise DecryptionError("signature does not verify", sender=sender) from None


def commit_seed(seed: bytes, round_idx: int, client: int) -> bytes:
    """SHA-256 commitment to a self-mask seed; lets the server check a reconstruction."""
    return hashlib.sha256(b"securefml/secagg/commit" + struct.pack(">II", round_idx, client) + seed).digest()
