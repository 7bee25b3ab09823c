"""The CKKS path of relevance aggregation: an encrypted task-vector Gram, one decryption per client.

Data flow of one round (``RelevanceAggregation`` under ``CKKS``)
-----------------------------------------------------------------
1. Every cohort client encrypts its task vector under the key holder's public context and
   signs it (``CKKSClient.encrypt`` + ``UploadSigner``); the server sends a ``GramRequest`` and
   the key holder computes and decrypts exactly the Gram of those signed vectors
   (``CKKSKeyHolder.decrypt_gram``).  The server turns the Gram into cosines, then into
   tempered relevance weights (``weights``; recipient-blind bound, see ``policy``).
2. Every client encrypts its new local model once.  For each recipient i the contributors
   sign those same ciphertexts for the key-holder round of (round, i), the server checks row
   i against ``RelevancePolicy`` **before** it asks (a refused row costs no request; its
   client keeps its model this round), and sends one ``AggregateRequest`` with row i's
   coefficients.  The key holder recomputes ``sum_j w_ij x_j`` from the signed ciphertexts,
   checks the coefficients against its own ``RelevancePolicy`` and decrypts.
3. The global aggregate (sample-weighted) is one more request.

Key-holder rounds
-----------------
The key holder decrypts each chunk of a round once (so no two combinations of one round's
uploads can be subtracted).  Per-client aggregates are n combinations of the same models, so
each gets its own key-holder round ``round * STRIDE + slot`` (slot 0: the task-vector Gram,
slots 1..n: the recipients, n + 1: the global aggregate), and a contributor signs its
ciphertexts for each of them: its signature is its consent to that combination.

Declared leakage and what is not covered
----------------------------------------
The server learns the task vectors' Gram, the weights, the global aggregate.  Each ``a_i``
is meant for client i: a party holding all n of a round, with the public weight matrix, can
solve for the individual models when the matrix is invertible.  In a deployment the key
holder returns row i's plaintext to client i over a channel the server cannot read; this
API returns it to its caller, and the in-process simulation (``RelevanceServer``) keeps each
``a_i`` as "what client i holds".  The key holder's policy bounds what client i learns about
the others; it cannot tell which party will read a decrypted row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from securefml.errors import ConfigError, PolicyViolation
from securefml.gram import Gram
from securefml.protocols.base import ClientUpdate
from securefml.protocols.ckks import CKKSClient
from securefml.protocols.ckks_auth import SignedUpload, UploadSigner
from securefml.protocols.ckks_keys import CKKSKeyHolder
from securefml.protocols.ckks_policy import SKIP_BELOW, AggregateRequest, GramRequest
from securefml.protocols.ckks_stats import PackingFrame
from securefml.relevance.policy import RelevancePolicy
from securefml.updates import LayerLayout

__all__ = ["EncryptedRelevance", "EncryptedRows", "STRIDE"]

log = logging.getLogger(__name__)

#: key-holder rounds per federation round (slots for the Gram, each recipient, the global sum)
STRIDE = 1 << 16


@dataclass
class EncryptedRows:
    """What ``EncryptedRelevance.combine`` decrypted.

    Attributes
    ----------
    vectors:
        Row position -> the decrypted combination (float64), for the rows the policy allowed.
    applied:
        Row position -> the coefficients actually requested (tiny ones dropped, renormalized).
    refused:
        Row position -> why the server's own pre-check refused it (no request was sent).
    bytes_uploaded:
        Serialized ciphertext bytes the contributors uploaded (each model once).
    """

    vectors: dict[int, np.ndarray] = field(default_factory=dict)
    applied: dict[int, torch.Tensor] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    bytes_uploaded: int = 0


class EncryptedRelevance:
    """The parties of the CKKS relevance path: key holder, client halves, the server's requests.

    Parameters
    ----------
    key_holder:
        Owns the secret key.  Its policy must be a ``RelevancePolicy`` (so the key holder
        itself refuses concentrated per-client combinations) and its preset must carry the
        statistics keys (the encrypted Gram and plaintext-scalar products need them).
    """

    def __init__(self, key_holder: CKKSKeyHolder) -> None:
        if not isinstance(key_holder, CKKSKeyHolder):
            raise ConfigError(f"need a CKKSKeyHolder, got {type(key_holder).__name__}")
        if not isinstance(key_holder.policy, RelevancePolicy):
            raise ConfigError(
                "relevance aggregation under CKKS needs a key holder whose policy is a RelevancePolicy "
                "(e.g. CKKSKeyHolder.generate('stats', policy=RelevancePolicy(min_effective=2))), so that the key "
                f"holder itself refuses concentrated per-client combinations; got {type(key_holder.policy).__name__}"
            )
        if not key_holder.preset.statistics:
            raise ConfigError(f"relevance under CKKS needs a statistics preset, not {key_holder.preset.name!r}")
        self.key_holder = key_holder
        self.policy: RelevancePolicy = key_holder.policy
        self.preset = key_holder.preset
        self.client = CKKSClient(key_holder.public_context_bytes(), self.preset)
        self._signers: dict[int, UploadSigner] = {}
        self._frames: dict[int, PackingFrame] = {}

    @classmethod
    def generate(cls, *, min_effective: float = 2.0, min_contributors: int = 2,
                 preset: str = "stats") -> EncryptedRelevance:
        """A fresh key holder with ``RelevancePolicy(min_effective, min_contributors)``."""
        policy = RelevancePolicy(min_contributors=min_contributors, min_effective=min_effective)
        return cls(CKKSKeyHolder.generate(preset, policy=policy))

    def __repr__(self) -> str:
        return f"EncryptedRelevance({self.key_holder!r}, min_effective={self.policy.min_effective})"

    # -- parties -----------------------------------------------------------------------------
    def enroll(self, party_id: int) -> UploadSigner:
        """The party's signing key (made and registered with the key holder on first use).

        Models the out-of-band enrolment: in a deployment each client makes its own key.
        """
        pid = int(party_id)
        signer = self._signers.get(pid)
        if signer is None:
            if pid in self.key_holder.registry:
                raise ConfigError(f"party {pid} is already enrolled with this key holder under another key")
            signer = self._signers[pid] = UploadSigner.generate(pid)
            self.key_holder.registry.register(pid, signer.verify_key())
        return signer

    @staticmethod
    def key_round(round_idx: int, slot: int) -> int:
        """The key-holder round of ``slot`` within federation round ``round_idx``."""
        if not 0 <= slot < STRIDE:
            raise ConfigError(f"slot {slot} outside [0, {STRIDE}): cohort too large for one round")
        return int(round_idx) * STRIDE + int(slot)

    def frame(self, numel: int) -> PackingFrame:
        """The public packing frame of a flat vector of ``numel`` entries (one layer, ``"v"``)."""
        got = self._frames.get(numel)
        if got is None:
            layout = LayerLayout([("v", (int(numel),))])
            got = self._frames[numel] = PackingFrame(layout, layout.layer_names, self.preset.slots)
        return got

    def _encrypt(self, key_round: int, client_id: int, vector: torch.Tensor, frame: PackingFrame) -> SignedUpload:
        update = ClientUpdate(int(client_id), vector.detach().to("cpu", torch.float64).reshape(-1),
                              frame.layout.layer_names, weight=1.0)
        return self.client.encrypt(key_round, update, frame, signer=self.enroll(client_id))

    def _resign(self, upload: SignedUpload, key_round: int) -> SignedUpload:
        """The contributor signs its existing ciphertexts for another key-holder round."""
        return self.enroll(upload.sender).sign(
            context=self.client.fingerprint, round_idx=key_round, frame=upload.frame, layers=upload.layers,
            weight=upload.weight, prescale=upload.prescale, chunks={k: bytes(v) for k, v in upload.chunks.items()})

    # -- the Gram --------------------------------------------------------------------------------
    def gram(self, round_idx: int, client_ids: Sequence[int], vectors: torch.Tensor, *, slot: int = 0) -> Gram:
        """Encrypt, sign and have the key holder decrypt the Gram of ``vectors`` ``[n, k]``."""
        frame = self.frame(vectors.shape[1])
        kr = self.key_round(round_idx, slot)
        uploads = tuple(self._encrypt(kr, c, v, frame) for c, v in zip(client_ids, vectors))
        gram = self.key_holder.decrypt_gram(GramRequest(kr, frame, uploads))
        order = [gram.client_ids.index(int(c)) for c in client_ids]
        mat = gram.inner[order][:, order]
        return Gram(tuple(int(c) for c in client_ids), mat, None, None)

    # -- per-row combinations ----------------------------------------------------------------
    def combine(
        self,
        round_idx: int,
        client_ids: Sequence[int],
        vectors: torch.Tensor,
        rows: torch.Tensor,
        *,
        first_slot: int = 1,
    ) -> EncryptedRows:
        """Decrypt ``rows @ vectors`` one row per key-holder request (row r in slot ``first_slot + r``).

        Each row is checked against the key holder's own ``RelevancePolicy`` before it is
        asked for (``PolicyViolation`` is recorded in ``refused``, no request is sent); the
        key holder checks it again itself.
        """
        ids = tuple(int(c) for c in client_ids)
        if rows.dim() != 2 or rows.shape[1] != len(ids) or vectors.shape[0] != len(ids):
            raise ConfigError("rows must be [r, n] over the n contributors of vectors [n, d]")
        frame = self.frame(vectors.shape[1])
        out = EncryptedRows()
        plans: dict[int, dict[int, float]] = {}
        for r in range(rows.shape[0]):
            row = rows[r].to(torch.float64)
            if not bool(torch.isfinite(row).all()) or bool((row < 0).any()) or float(row.sum()) <= 0:
                out.refused[r] = "row is not a non-negative finite weight vector"
                continue
            keep = row > SKIP_BELOW
            row = torch.where(keep, row, torch.zeros_like(row))
            row = row / row.sum()
            coeffs = {c: float(w) for c, w in zip(ids, row.tolist()) if w > 0}
            reason = self.policy.violation(coeffs)
            if reason is not None:  # enforced before asking: an honest server never sends it
                out.refused[r] = f"refused before asking: {reason}"
                continue
            plans[r] = coeffs
            out.applied[r] = row
        if not plans:
            return out
        needed = sorted({c for coeffs in plans.values() for c in coeffs})
        base_round = self.key_round(round_idx, first_slot + min(plans))
        cts = {c: self._encrypt(base_round, c, vectors[ids.index(c)], frame) for c in needed}
        out.bytes_uploaded = sum(len(b) for u in cts.values() for b in u.chunks.values())
        for r, coeffs in plans.items():
            kr = self.key_round(round_idx, first_slot + r)
            uploads = tuple(cts[c] if cts[c].round_idx == kr else self._resign(cts[c], kr) for c in coeffs)
            try:
                dec = self.key_holder.decrypt_aggregate(AggregateRequest(kr, frame, uploads, coeffs))
            except PolicyViolation as exc:
                out.refused[r] = f"key holder refused: {exc}"
                out.applied.pop(r, None)
                continue
            out.vectors[r] = np.concatenate([dec[k][: frame.chunk_len(k)] for k in range(frame.n_chunks)])
        return out
