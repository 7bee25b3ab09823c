"""The CKKS client's half, and the reference party's, over bytes.

Stages (``securefml.protocols.halves`` contract):

* ``announce``: the server's ``ckks-plan`` (round, layout and context fingerprints, mode); the
  client checks it was made for its model and key set and answers with its layer manifest and
  weight (``ckks-announce``: the declared leakage).
* ``update``: the server's ``ckks-upload-plan`` (the round's packing frame and the public
  weight normalizer W); the client encrypts the frame chunks of its layers, pre-scaled by
  ``weight / W`` under a weighted mean (1 in a robust round), signs them and answers with the
  upload (``ckks_client``).

A client checks what it can of the server's messages (round, layout, key set, that W covers its
own weight, that the frame holds one of its layers) and stops with a ``ProtocolError`` naming
the server otherwise.  A normalizer is public and checked only against the client's own weight:
a server that lies about W changes every client's scale alike, and the server half divides by
the signed weights it accepted, so a lie shows as a scale mismatch, not as a wrong mean.

The reference party (``ckks_policy.REFERENCE_PARTY``, e.g. the holder of the server's root data
for FLTrust) is addressed only at ``update`` in a robust round: it encrypts and signs its
reference over the frame layers; the key holder admits it to the Gram only under its key.
"""

from __future__ import annotations

import math

import torch

from securefml.errors import ConfigError, ProtocolError
from securefml.protocols.ckks_auth import UploadSigner
from securefml.protocols.ckks_client import CKKSClient
from securefml.protocols.ckks_codec import decode_plan, decode_upload_plan, encode_announcement
from securefml.protocols.ckks_keys import CKKSPreset
from securefml.protocols.ckks_params import MAX_ABS, SERVER
from securefml.protocols.halves import ClientHalf
from securefml.rounds import ClientUpdate
from securefml.updates import LayerLayout

__all__ = ["CKKSClientHalf", "CKKSReferenceHalf", "ANNOUNCE", "UPDATE"]

ANNOUNCE = "announce"
UPDATE = "update"


class CKKSClientHalf(ClientHalf):
    """One client's CKKS half: announces its manifest and weight, then uploads signed ciphertexts.

    Parameters
    ----------
    update:
        The client's update (its id is the party id).
    layout:
        The client's model layout (plans and frames for another model are refused).
    round_idx:
        The round it takes part in.
    public_context, preset:
        The key holder's public context and parameters (no secret key).
    signer:
        The client's enrolled Ed25519 key (its ``party_id`` must be the client's id).
    client:
        An already loaded ``CKKSClient`` for the same public context (loading a statistics
        context with its Galois keys takes a while; the in-process driver shares one).
    """

    def __init__(
        self,
        update: ClientUpdate,
        layout: LayerLayout,
        *,
        round_idx: int,
        public_context: bytes,
        preset: str | CKKSPreset,
        signer: UploadSigner,
        client: CKKSClient | None = None,
    ) -> None:
        if signer.party_id != update.client_id:
            raise ConfigError(f"client {update.client_id} cannot sign with party {signer.party_id}'s key")
        self.party = update.client_id
        self.update = update
        self.layout = layout
        self.round_idx = int(round_idx)
        self.client = client if client is not None else CKKSClient(public_context, preset)
        self.signer = signer
        self._mode: str | None = None
        self._layers = layout.canonical(update.layers)

    def respond(self, stage: str, message: bytes) -> bytes:
        if stage == ANNOUNCE and self._mode is None:
            plan = decode_plan(message, self.round_idx)
            if plan.layout != self.layout.fingerprint():
                raise ProtocolError("the round plan is for another model layout", sender=SERVER)
            if plan.context != self.client.fingerprint:
                raise ProtocolError("the round plan is for another CKKS key set", sender=SERVER)
            self._mode = plan.mode
            return encode_announcement(self.round_idx, self.party, self._layers, float(self.update.weight))
        if stage == UPDATE and self._mode is not None:
            up = decode_upload_plan(message, self.round_idx, self.layout)
            chosen = tuple(n for n in self._layers if n in up.frame.spans)
            if not chosen:
                raise ProtocolError("the packing frame holds none of this client's layers", sender=SERVER)
            prescale = 1.0
            if self._mode == "mean":
                w = float(self.update.weight)
                if not (math.isfinite(up.normalizer) and up.normalizer >= w > 0):
                    raise ProtocolError(f"weight normalizer {up.normalizer} does not cover this client's weight {w}",
                                        sender=SERVER)
                prescale = w / up.normalizer
            return self.client.encode(self.round_idx, self.update, up.frame, signer=self.signer, layers=chosen,
                                      prescale=prescale)
        raise ProtocolError(f"unexpected CKKS stage {stage!r} (mode {self._mode})", sender=SERVER)


class CKKSReferenceHalf(ClientHalf):
    """The reference party's half: encrypts and signs its reference over the round's frame.

    Parameters
    ----------
    reference:
        The reference update, over the full layout (or over the frame layers only).
    party:
        The reference party's id (the key holder's ``policy.reference_party``).
    client:
        As for ``CKKSClientHalf``.
    """

    def __init__(
        self,
        reference: torch.Tensor,
        layout: LayerLayout,
        *,
        round_idx: int,
        public_context: bytes,
        preset: str | CKKSPreset,
        signer: UploadSigner,
        party: int,
        client: CKKSClient | None = None,
    ) -> None:
        if signer.party_id != party:
            raise ConfigError(f"the reference party {party} cannot sign with party {signer.party_id}'s key")
        self.party = int(party)
        self.reference = reference.detach().to("cpu", torch.float64).reshape(-1)
        self.layout = layout
        self.round_idx = int(round_idx)
        self.client = client if client is not None else CKKSClient(public_context, preset)
        self.signer = signer

    def respond(self, stage: str, message: bytes) -> bytes:
        if stage != UPDATE:
            raise ProtocolError(f"the reference party answers only the {UPDATE!r} stage, not {stage!r}", sender=SERVER)
        frame = decode_upload_plan(message, self.round_idx, self.layout).frame
        r = self.reference
        if r.numel() == self.layout.numel:
            r = self.layout.gather(r, frame.layers)
        if r.numel() != frame.numel:
            raise ConfigError(f"reference has {r.numel()} entries; expected {self.layout.numel} (full layout)")
        if r.numel() and float(r.abs().max()) > MAX_ABS:
            raise ConfigError(f"reference entries beyond +-{MAX_ABS:g} would overflow the CKKS modulus")
        upd = ClientUpdate(self.party, r.to(torch.float32), frame.layers, 1.0)
        return self.client.encode(self.round_idx, upd, frame, signer=self.signer)
