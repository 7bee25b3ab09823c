"""The CKKS client's encryption: pack selected layers into frame chunks, encrypt, sign, encode.

A client holds the key holder's *public* context only (``load_public_context`` refuses one with
the secret key).  It encrypts the chunks of the round's ``PackingFrame`` that hold one of its
layers (zeros in the slots of frame layers it did not select), multiplied by ``prescale``
(``weight / W`` under a weighted mean, so the key holder only adds; 1 in a robust round), and
signs the ciphertexts' digests with its enrolled Ed25519 key (``ckks_auth``).  It refuses to
encrypt NaN/Inf and entries beyond ``MAX_ABS`` (they would wrap around the modulus).

Message (a ``wire`` envelope of kind ``"ckks-update"``, bound to round and sender)::

    ctx     16-byte fingerprint of the public context (the key set)
    layout  16-byte fingerprint of the model layout
    frame   16-byte fingerprint of the round's packing frame (layers, slot count)
    layers  the client's layer manifest (layout order)
    weight  float64 sample count
    scale   float64 factor the update was multiplied by before encryption (``weight / W``, or 1)
    chunks  u32 indices of the frame chunks sent (exactly those overlapping ``layers``)
    ct.<k>  one serialized fresh CKKS ciphertext per chunk (``slots`` values, zero padded)
    sig     64-byte Ed25519 signature over the upload statement (``ckks_auth``)
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np
import tenseal as ts
import torch

from securefml.errors import ConfigError, InvalidUpdateError
from securefml.protocols.ckks_auth import SignedUpload, UploadSigner
from securefml.protocols.ckks_keys import CKKSPreset, context_fingerprint, get_preset, load_public_context
from securefml.protocols.ckks_params import KIND, MAX_ABS, ct_field, wire_id
from securefml.protocols.ckks_stats import PackingFrame
from securefml.protocols.plaintext_codec import encode_manifest
from securefml.protocols.wire import Envelope, encode, pack_array
from securefml.rounds import ClientUpdate, check_finite

__all__ = ["CKKSClient"]


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
            fields[ct_field(k)] = bytes(blob)  # a no-op for the bytes TenSEAL serializes to
        return encode(Envelope(KIND, round_idx, wire_id(update.client_id), fields))
