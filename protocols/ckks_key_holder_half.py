"""The CKKS key holder as its own party: requests in as bytes, decrypted values out as bytes.

The server half holds the public context only; when it needs a Gram or an aggregate it sends
this half a ``ckks-gram-request`` / ``ckks-aggregate-request`` (``ckks_codec``).  The half
decodes the bytes into the typed request and hands it to ``CKKSKeyHolder.decrypt_gram`` /
``decrypt_aggregate``, which apply the key holder's own ``DecryptionPolicy`` (``ckks_policy``):
signatures, round, frame, contributors, shares, one Gram and each chunk once per round.

Threat model: the server may send this half *any* bytes (tested with hypothesis in
``tests/property/test_ckks_key_holder_adversary.py``).  Bytes that do not decode raise
``MalformedMessageError`` naming the server; a request outside the policy raises
``PolicyViolation``: the half stops for the round (the driver records it) and nothing is
decrypted.  An upload whose signature does not verify is answered with a ``ckks-blame`` naming
its sender (nothing was decrypted), so an honest server can drop that client and ask again.
"""

from __future__ import annotations

import logging

from securefml.errors import ConfigError, DecryptionError, MalformedMessageError, ProtocolError
from securefml.protocols.ckks_codec import (
    decode_aggregate_request,
    decode_gram_request,
    encode_blame,
    encode_chunks,
    encode_gram,
)
from securefml.protocols.ckks_keys import CKKSKeyHolder
from securefml.protocols.ckks_params import ENVELOPE_OVERHEAD, KEY_HOLDER_PARTY, SERVER
from securefml.protocols.ckks_policy import AggregateRequest, GramRequest
from securefml.protocols.halves import ClientHalf
from securefml.updates import LayerLayout

__all__ = ["CKKSKeyHolderHalf", "GRAM_STAGE", "DECRYPT_STAGE"]

log = logging.getLogger(__name__)

GRAM_STAGE = "gram"
DECRYPT_STAGE = "decrypt"


class CKKSKeyHolderHalf(ClientHalf):
    """The key holder's half for one round: answers the server's decryption requests.

    Parameters
    ----------
    key_holder:
        The party with the secret key (its policy, registry and ledger persist across rounds).
    layout:
        The model layout (a request's frame is rebuilt over it and must match it).
    round_idx:
        The round; a request for another round is a ``ReplayError``.
    party:
        This half's party id (``KEY_HOLDER_PARTY``).
    """

    def __init__(
        self, key_holder: CKKSKeyHolder, layout: LayerLayout, *, round_idx: int, party: int = KEY_HOLDER_PARTY
    ) -> None:
        self.party = int(party)
        self.key_holder = key_holder
        self.layout = layout
        self.round_idx = int(round_idx)

    def max_request_bytes(self) -> int:
        """A bound on an honest request: every enrolled party's upload of the whole layout."""
        slots = self.key_holder.preset.slots
        per_upload = -(-self.layout.numel // slots) * self.key_holder.preset.max_ciphertext_bytes + ENVELOPE_OVERHEAD
        return (len(self.key_holder.registry) + 1) * per_upload + (1 << 20)

    def _decode(self, stage: str, message: bytes) -> GramRequest | AggregateRequest:
        limit = self.max_request_bytes()
        try:
            if stage == GRAM_STAGE:
                return decode_gram_request(message, self.round_idx, self.layout, max_bytes=limit)
            if stage == DECRYPT_STAGE:
                return decode_aggregate_request(message, self.round_idx, self.layout, max_bytes=limit)
        except ProtocolError:
            raise
        except (ConfigError, ValueError, KeyError, TypeError, OverflowError) as exc:  # bytes that name nothing valid
            raise MalformedMessageError(f"the request does not decode: {exc}", sender=SERVER) from None
        raise ProtocolError(f"the key holder answers {GRAM_STAGE!r} and {DECRYPT_STAGE!r}, not {stage!r}",
                            sender=SERVER)

    def respond(self, stage: str, message: bytes) -> bytes:
        request = self._decode(stage, message)
        try:
            if isinstance(request, GramRequest):
                return encode_gram(self.round_idx, self.party, self.key_holder.decrypt_gram(request))
            return encode_chunks(self.round_idx, self.party, self.key_holder.decrypt_aggregate(request))
        except DecryptionError as exc:
            if exc.sender is None:
                raise
            log.warning("key holder, round %d: %s", self.round_idx, exc)
            return encode_blame(self.round_idx, self.party, exc)
