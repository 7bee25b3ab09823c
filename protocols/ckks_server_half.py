"""The CKKS aggregator's half: public context only; collects, validates, forwards, asks.

Stages, in order (``securefml.protocols.halves`` contract):

1. ``announce`` (every cohort client): the round plan; each client answers with its layer
   manifest and weight.  Closing the stage derives the public round parameters: the packing
   frame (``ckks_params.packing_frame``), the weight normalizer W (sum of the announced
   weights), and, for a rule other than the weighted mean, the same-layers check
   (``securefml.aggregation.check_same_layers``).
2. ``update`` (clients with a frame layer, and the reference party in a robust round with a
   reference): the upload plan; each answers with its signed ciphertexts, validated on arrival
   (``CKKSServer.decode``: context, layout, frame, scale ``weight / W``, replay, and under the
   weighted mean that each ciphertext adds to the others).  The signed weight must be the
   announced one.
3. Robust rounds: ``gram`` (the key holder): a ``GramRequest`` over the accepted signed uploads;
   the decrypted Gram goes to the aggregation step's combiner (``HalvesSetup.combine``), which
   returns per-client coefficients.  A combination the key holder's policy refuses is not asked
   for: the round reveals the Gram and no aggregate (``policy_refused``).
4. ``decrypt`` (the key holder): an ``AggregateRequest`` (coefficient 1 per client under the
   weighted mean, over the chunks no refused layer touches; the rule's coefficients otherwise).

A ``ckks-blame`` reply (the key holder could not verify one upload; it decrypted nothing)
rejects that client and the same stage is asked again without it.

Reveals ``RevealedLayerMeans`` (weighted mean) or ``RevealedGram`` (robust rules), with the
round's ``CKKSRoundStats``.  Where decrypted values become tensors (``_revealed_mean``,
``_revealed_gram``) the resolution floor ``zero_floor`` sets entries below it to exactly 0, so
that an entry that is 0 in every upload is 0 as in plaintext, not CKKS noise a scale-free server
optimizer amplifies (``ckks_stats``, *Resolution floor*).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from securefml.aggregation import check_same_layers
from securefml.errors import (
    ConfigError,
    InvalidUpdateError,
    MalformedMessageError,
    ProtocolAbort,
    ProtocolError,
    ReplayError,
)
from securefml.protocols.ckks_auth import SignedUpload
from securefml.protocols.ckks_client_half import ANNOUNCE, UPDATE
from securefml.protocols.ckks_codec import (
    CHUNKS,
    GRAM,
    Blame,
    RoundPlan,
    decode_announcement,
    decode_chunks,
    decode_gram,
    decode_reply,
    encode_aggregate_request,
    encode_gram_request,
    encode_plan,
    encode_upload_plan,
)
from securefml.protocols.ckks_key_holder_half import DECRYPT_STAGE, GRAM_STAGE
from securefml.protocols.ckks_keys import CKKSPreset
from securefml.protocols.ckks_params import KEY_HOLDER_PARTY, packing_frame
from securefml.protocols.ckks_policy import SKIP_BELOW, AggregateRequest, DecryptionPolicy, GramRequest
from securefml.protocols.ckks_server import CKKSServer, ReceivedCiphertexts
from securefml.protocols.ckks_stats import (
    PackingFrame,
    apply_zero_floor,
    check_zero_floor,
    default_zero_floor,
    sum_error_bound,
)
from securefml.protocols.halves import ServerHalf, StageMessages
from securefml.reveals import GramCombiner, GramDecision, RevealedGram, RevealedLayerMeans
from securefml.rounds import nothing_accepted
from securefml.updates import LayerLayout

if TYPE_CHECKING:  # pragma: no cover
    from securefml.defenses.base import Defense
    from securefml.gram import Gram
    from securefml.protocols.wire import Envelope

__all__ = ["CKKSServerHalf", "CKKSRoundStats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CKKSRoundStats:
    """What the CKKS server half measured in one round (``to_dict`` feeds ``RoundOutput.extras``).

    ``bytes_uploaded`` counts the clients' announcements and uploads (the key holder's replies
    are not uploads); ``timing`` holds the server's own wall-clock seconds: ``server_receive_s``
    (validating and adding the uploads), ``gram_s`` / ``decrypt_s`` (each key-holder request,
    as the server waits for it) and ``total_s``.
    """

    preset: str
    mode: str
    bytes_uploaded: int
    ciphertexts: int
    slot_utilisation: float
    bytes_per_float: float
    frame_layers: tuple[str, ...]
    timing: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "preset": self.preset,
            "mode": self.mode,
            "bytes_uploaded": self.bytes_uploaded,
            "ciphertexts": self.ciphertexts,
            "slot_utilisation": self.slot_utilisation,
            "bytes_per_float": self.bytes_per_float,
            "frame_layers": self.frame_layers,
            "timing": dict(self.timing),
        }


class CKKSServerHalf(ServerHalf):
    """The CKKS aggregator's half for one round (see the module docstring for the stages).

    Parameters
    ----------
    round_idx, layout, cohort:
        The round, the model layout and the clients asked to take part.
    public_context, preset:
        The key holder's public context (the server never holds the secret key).
    policy:
        The key holder's decryption policy (public): the server asks only what it allows.
    defense:
        The round's rule: the weighted mean runs in mean mode, any other rule decides on the
        Gram (``combine`` is then required).
    combine:
        The aggregation step's decision on a Gram (``securefml.aggregation.gram_combiner``).
    server:
        The receive path (its replay memory persists across rounds); a new one if omitted.
    reference_party:
        Party id of the reference party to ask for its signed reference (robust rounds), or None.
    key_holder_party:
        The key holder's party id.
    zero_floor:
        The resolution floor tau (``ckks_stats.apply_zero_floor``): decrypted entries with
        ``|x| < tau`` become exactly 0, in the mean path's decrypted sums and in the Gram path's
        decrypted combination.  None: ``default_zero_floor(preset.scale_bits)`` (2^-23 at scale
        2^40); 0 disables it.  The mean path's ``error_bound`` includes tau.
    """

    def __init__(
        self,
        round_idx: int,
        layout: LayerLayout,
        cohort: Sequence[int],
        *,
        public_context: bytes,
        preset: str | CKKSPreset,
        policy: DecryptionPolicy,
        defense: Defense,
        combine: GramCombiner | None = None,
        server: CKKSServer | None = None,
        reference_party: int | None = None,
        key_holder_party: int = KEY_HOLDER_PARTY,
        zero_floor: float | None = None,
    ) -> None:
        ids = [int(c) for c in cohort]
        if len(set(ids)) != len(ids):
            raise ConfigError("client ids in one round must be distinct")
        if any(c < 0 for c in ids):
            raise ConfigError("CKKS client ids are non-negative (negative ids are reserved for service parties)")
        gram_mode = not defense.is_weighted_mean
        if gram_mode and combine is None:
            raise ConfigError("a robust CKKS round needs the aggregation step's Gram combiner")
        self.round_idx = int(round_idx)
        self.layout = layout
        self.cohort = tuple(sorted(ids))
        self.server = server or CKKSServer(public_context, preset)
        self.preset = self.server.preset
        self.zero_floor = (default_zero_floor(self.preset.scale_bits) if zero_floor is None
                           else check_zero_floor(zero_floor))
        self.policy = policy
        self.defense = defense
        self.gram_mode = gram_mode
        self.combine = combine
        self.reference_party = reference_party
        self.key_holder_party = int(key_holder_party)
        self.frame: PackingFrame | None = None
        self.normalizer = 0.0
        self._stage: str | None = None
        self._done = False
        self._announced: dict[int, tuple[tuple[str, ...], float]] = {}
        self._asked: set[int] = set()
        self._received: dict[int, ReceivedCiphertexts] = {}
        self._reference: SignedUpload | None = None
        self._sums: dict[int, list] = {}
        self._rejected: dict[int, str] = {}
        self._reply: Envelope | Blame | None = None
        self._request_chunks: tuple[int, ...] = ()
        self._withheld: set[int] = set()
        self._gram: Gram | None = None
        self._decision: GramDecision | None = None
        self._coeffs: dict[int, float] = {}
        self._refused: str | None = None
        self._decrypted: dict[int, np.ndarray] | None = None
        self._client_bytes = 0
        self._update_bytes = 0
        self._n_cts = 0
        self._carried = 0
        self._timing: dict[str, float] = {"server_receive_s": 0.0}
        self._t_start: float | None = None
        self._t_asked = 0.0

    # -- the contract ------------------------------------------------------------------------------
    def next_stage(self) -> StageMessages | None:
        if self._t_start is None:
            self._t_start = time.perf_counter()
        if self._done:
            return None
        if self._stage is None:
            self._stage = ANNOUNCE
            plan = encode_plan(RoundPlan(self.round_idx, self.layout.fingerprint(), self.server.fingerprint,
                                         "gram" if self.gram_mode else "mean"))
            return StageMessages(ANNOUNCE, dict.fromkeys(self.cohort, plan))
        if self._stage == ANNOUNCE:
            return self._open_update()
        return self._open_key_holder_stage()

    def receive(self, party: int, data: bytes) -> None:
        if self._stage == ANNOUNCE:
            self._receive_announcement(party, data)
        elif self._stage == UPDATE:
            t0 = time.perf_counter()
            try:
                self._receive_upload(party, data)
            finally:
                self._timing["server_receive_s"] += time.perf_counter() - t0
        elif self._stage in (GRAM_STAGE, DECRYPT_STAGE):
            if party != self.key_holder_party:
                raise ReplayError(f"only the key holder answers the {self._stage!r} stage", sender=party)
            if self._reply is not None:
                raise ReplayError("duplicate key holder reply", sender=party)
            kind = GRAM if self._stage == GRAM_STAGE else CHUNKS
            self._reply = decode_reply(data, self.round_idx, party, expect=kind)
            key = "gram_s" if self._stage == GRAM_STAGE else "decrypt_s"
            self._timing[key] = self._timing.get(key, 0.0) + time.perf_counter() - self._t_asked
        else:
            raise ReplayError("no stage is open", sender=party)

    def reject(self, party: int, error: ProtocolError | InvalidUpdateError) -> None:
        self._rejected[party] = f"{type(error).__name__}: {error}"
        self._announced.pop(party, None)
        self._received.pop(party, None)

    def close_stage(self) -> None:
        if self._stage == ANNOUNCE:
            self._close_announce()
        elif self._stage == UPDATE:
            self._close_update()
        elif self._stage in (GRAM_STAGE, DECRYPT_STAGE):
            self._close_key_holder_stage()

    # -- announce ----------------------------------------------------------------------------------
    def _receive_announcement(self, party: int, data: bytes) -> None:
        if party not in self.cohort:
            raise ReplayError("sender is not in this round's cohort", sender=party)
        if party in self._announced:
            raise ReplayError("duplicate announcement in this round", sender=party)
        ann = decode_announcement(data, self.round_idx, party, self.layout)
        self._announced[party] = (ann.layers, ann.weight)
        self._client_bytes += len(data)

    def _close_announce(self) -> None:
        if not self.gram_mode:
            self._reject_dominating_weights()
        sets = [layers for layers, _ in self._announced.values()]
        check_same_layers(self.defense, sets)
        self.frame = packing_frame(self.layout, sets, self.preset.slots, self.policy.min_contributors)
        self.normalizer = sum(w for _, w in self._announced.values()) if not self.gram_mode else 0.0

    def _reject_dominating_weights(self) -> None:
        """Reject, by name, announcements whose weight would make every other contribution negligible.

        Under the weighted mean each client encrypts its update scaled by ``w_i / sum(w)``, and
        that scale is fixed when this stage closes.  One announcement whose weight is orders of
        magnitude above the others (a client that lies, or a flipped byte in transit) shrinks every
        other contribution below the key holder's ``negligible_share``: the key holder must then
        refuse the whole round, even when the liar is caught at the update stage, so one client
        could deny every round.  The same holds for a share above the policy's ``max_share``:
        every layer it is in would be refused.  So while more than ``min_contributors`` clients
        announced, the largest announcement is rejected as long as either would happen, and the
        others' round goes ahead (what the policy protects, that no decrypted layer is mostly one
        client, holds: the rejected client's update is never asked for).  A round of exactly
        ``min_contributors`` clients is left to the key holder, which refuses it as before.
        """
        while len(self._announced) > self.policy.min_contributors:
            weights = {c: w for c, (_, w) in self._announced.items()}
            total = sum(weights.values())
            counted = sum(w / total >= self.policy.negligible_share for w in weights.values())
            top = max(weights, key=weights.__getitem__)
            share = weights[top] / total
            if counted >= self.policy.min_contributors and share <= self.policy.max_share_bound + 1e-12:
                return
            log.warning("round %d: client %s announced weight %g, %.3f of the round's", self.round_idx, top,
                        weights[top], share)
            self.reject(top, MalformedMessageError(
                f"announced weight {weights[top]:g} is {share:.3f} of the round's: the key holder's policy "
                f"refuses a share above {self.policy.max_share_bound:.3f} or fewer than "
                f"{self.policy.min_contributors} clients above {self.policy.negligible_share:g}",
                sender=top))

    # -- update ------------------------------------------------------------------------------------
    def _open_update(self) -> StageMessages | None:
        assert self.frame is not None
        self._stage = UPDATE
        frame = self.frame
        asked = [c for c, (layers, _) in sorted(self._announced.items()) if any(n in frame.spans for n in layers)]
        self._asked = set(asked)
        message = encode_upload_plan(self.round_idx, frame, self.normalizer)
        parties = dict.fromkeys(asked, message)
        if self.gram_mode and self.reference_party is not None and frame.numel:
            parties[self.reference_party] = message
        return StageMessages(UPDATE, parties)

    def _receive_upload(self, party: int, data: bytes) -> None:
        assert self.frame is not None
        if party == self.reference_party and self.gram_mode:
            if self._reference is not None:
                raise ReplayError("duplicate reference in this round", sender=party)
            rec = self.server.decode(self.round_idx, party, data, self.frame, strict=True)
            if rec.layers != self.frame.layers:
                raise MalformedMessageError("the reference must fill every frame layer", sender=party)
            self._reference = rec.upload
            return
        if party not in self._asked:
            raise ReplayError("sender was not asked for an upload this round", sender=party)
        if party in self._received:
            raise ReplayError("duplicate message in this round", sender=party)
        announced_layers, announced_weight = self._announced[party]
        rec = self.server.decode(
            self.round_idx, party, data, self.frame, strict=self.gram_mode,
            into=None if self.gram_mode else self._sums, normalizer=None if self.gram_mode else self.normalizer,
        )
        expected_layers = tuple(n for n in announced_layers if n in self.frame.spans)
        # (under the weighted mean its ciphertexts were already added to the running sums; those
        # sums only check that ciphertexts add, the key holder recomputes from accepted uploads)
        if rec.weight != announced_weight or rec.layers != expected_layers:
            raise MalformedMessageError("the upload's weight or layers differ from the announced ones", sender=party)
        self._received[party] = rec
        self._client_bytes += len(data)
        self._update_bytes += len(data)
        self._n_cts += len(self.frame.chunks_for(rec.layers))
        self._carried += self.layout.numel_of(rec.layers)

    def _close_update(self) -> None:
        if not self.gram_mode:
            self._plan_mean_request()
        elif len(self._received) < self.policy.min_contributors or self.frame is None or self.frame.numel == 0:
            self._done = True
        else:
            self._stage = GRAM_STAGE

    # -- key holder stages -------------------------------------------------------------------------
    def _uploads(self) -> tuple[SignedUpload, ...]:
        ups = tuple(self._received[c].upload for c in sorted(self._received))
        if any(u is None for u in ups):  # pragma: no cover - decode always attaches the upload
            raise ProtocolError("a received message carries no signed upload")
        return ups  # type: ignore[return-value]

    def _plan_mean_request(self) -> None:
        """Which chunks to ask for: those no layer outside the policy touches (asked before sending)."""
        assert self.frame is not None
        uploads = self._uploads()
        carried = {k for u in uploads for k in u.chunks}
        refused = set()
        for name in self.frame.layers:
            eff = {u.sender: u.prescale for u in uploads if name in u.layers}
            if eff and self.policy.violation(eff) is not None:
                refused.add(name)
        self._withheld = {k for k in carried if set(self.frame.layers_in_chunk(k)) & refused}
        self._request_chunks = tuple(sorted(carried - self._withheld))
        if self._request_chunks:
            self._stage = DECRYPT_STAGE
        else:
            self._decrypted = {}
            self._done = True

    def _open_key_holder_stage(self) -> StageMessages | None:
        assert self.frame is not None
        self._reply = None
        uploads = self._uploads()
        if self._stage == GRAM_STAGE:
            message = encode_gram_request(GramRequest(self.round_idx, self.frame, uploads, self._reference))
        else:
            coeffs = self._coeffs if self.gram_mode else {u.sender: 1.0 for u in uploads}
            chunks = None if self.gram_mode else self._request_chunks
            message = encode_aggregate_request(AggregateRequest(self.round_idx, self.frame, uploads, coeffs, chunks))
        self._t_asked = time.perf_counter()
        return StageMessages(self._stage or "", {self.key_holder_party: message})

    def _close_key_holder_stage(self) -> None:
        reply = self._reply
        if reply is None:
            raise ProtocolAbort(f"round {self.round_idx}: the key holder gave no usable answer at {self._stage!r}")
        if isinstance(reply, Blame):
            if reply.party not in self._received:
                raise ProtocolAbort(f"round {self.round_idx}: the key holder blamed party {reply.party}, "
                                    "which is not in the request")
            log.warning("round %d: the key holder cannot verify client %s's upload: %s", self.round_idx,
                        reply.party, reply.reason)
            self._rejected[reply.party] = f"{reply.error}: {reply.reason}"
            del self._received[reply.party]
            if self.gram_mode and self._stage == GRAM_STAGE:
                self._close_update()  # ask again without it (or stop if too few are left)
            elif self.gram_mode:  # the Gram verified every upload: an honest key holder cannot blame one now
                raise ProtocolAbort(f"round {self.round_idx}: an upload failed verification after the Gram")
            else:
                self._plan_mean_request()
            return
        if self._stage == GRAM_STAGE:
            self._gram = decode_gram(reply, self.key_holder_party)
            self._decide()
        else:
            assert self.frame is not None
            self._decrypted = decode_chunks(reply, self.key_holder_party, self.frame.slots)
            self._done = True

    def _decide(self) -> None:
        assert self._gram is not None and self.combine is not None
        ids = tuple(sorted(self._received))
        if self._gram.client_ids != ids:
            raise ProtocolAbort(f"round {self.round_idx}: the key holder's Gram is over other clients")
        sample_w = torch.tensor([self._received[c].weight for c in ids], dtype=torch.float64)
        self._decision = self.combine(self._gram, sample_w)
        coeffs = self._decision.coefficients.to(torch.float64)
        self._coeffs = {c: float(x) for c, x in zip(ids, coeffs)}
        reason = self.policy.violation(self._coeffs)
        if reason is not None:  # the key holder would refuse: do not ask, keep the model as it is
            log.warning("round %d: aggregate withheld, outside the key holder's policy: %s", self.round_idx, reason)
            self._refused = reason
            self._done = True
        else:
            self._stage = DECRYPT_STAGE

    # -- what the round reveals --------------------------------------------------------------------
    def _stats(self) -> CKKSRoundStats:
        timing = dict(self._timing)
        timing["total_s"] = time.perf_counter() - (self._t_start or time.perf_counter())
        return CKKSRoundStats(
            preset=self.preset.name,
            mode="gram" if self.gram_mode else "sum",
            bytes_uploaded=self._client_bytes,
            ciphertexts=self._n_cts,
            slot_utilisation=self._carried / (self._n_cts * self.preset.slots) if self._n_cts else 0.0,
            bytes_per_float=self._update_bytes / self._carried if self._carried else 0.0,
            frame_layers=self.frame.layers if self.frame is not None else (),
            timing=timing,
        )

    def revealed(self) -> RevealedLayerMeans | RevealedGram:
        if self._asked and not self._received:
            # every client that had something to send was rejected or lost (when the frame
            # withholds every layer, below min_contributors, nobody is asked and the round is empty)
            raise nothing_accepted(self.round_idx, len(self._asked), self._rejected)
        if not self._announced and self._rejected:  # not one announcement was usable
            raise nothing_accepted(self.round_idx, len(self.cohort), self._rejected)
        if self.gram_mode:
            return self._revealed_gram()
        return self._revealed_mean()

    def _layer_counts(self) -> dict[str, int]:
        counts = Counter(n for rec in self._received.values() for n in rec.layers)
        return {n: int(counts[n]) for n in self.layout.layer_names}

    def _revealed_mean(self) -> RevealedLayerMeans:
        frame = self.frame
        assert frame is not None
        dec = self._decrypted or {}
        packed = np.zeros(frame.numel, dtype=np.float64)
        for k, values in dec.items():
            lo, hi = frame.chunk_range(k)
            packed[lo:hi] = values[: hi - lo]
        # the floor acts on the decrypted sums, where the CKKS noise lives, before the per-layer rescale
        packed = apply_zero_floor(packed, self.zero_floor)
        counts = self._layer_counts()
        totals: dict[str, float] = dict.fromkeys(self.layout.layer_names, 0.0)
        for rec in self._received.values():
            for n in rec.layers:
                totals[n] += rec.weight
        full = torch.zeros(self.layout.numel, dtype=torch.float64)
        layer_weight = dict.fromkeys(self.layout.layer_names, 0.0)
        withheld = []
        amplification = 1.0  # decoding divides by the layer's received total: CKKS error grows with it
        slices = self.layout.slices()
        for name, (a, b) in frame.spans.items():
            chunks = range(a // frame.slots, (b - 1) // frame.slots + 1) if b > a else range(0)
            if counts[name] < self.policy.min_contributors or any(k in self._withheld or k not in dec for k in chunks):
                if counts[name]:
                    withheld.append(name)
                continue
            full[slices[name]] = torch.from_numpy(packed[a:b] * (self.normalizer / totals[name]))
            layer_weight[name] = float(totals[name])
            amplification = max(amplification, self.normalizer / totals[name])
        return RevealedLayerMeans(
            mean=full.to(torch.float32),
            layer_weight=layer_weight,
            client_ids=tuple(sorted(self._received)),
            withheld_layers=tuple(withheld),
            layer_counts=counts,
            error_bound=(sum_error_bound(max(1, len(self._received)), 1.0) + self.zero_floor) * amplification,
            rejected=dict(self._rejected),
            stats=self._stats(),
        )

    def _revealed_gram(self) -> RevealedGram:
        frame = self.frame
        ids = tuple(sorted(self._received))
        layers = frame.layers if frame is not None else ()
        counts = {n: (len(ids) if frame is not None and n in frame.spans else 0) for n in self.layout.layer_names}
        combination = None
        kept = 0.0
        if self._decrypted is not None and frame is not None and self._decision is not None:
            combination = torch.from_numpy(apply_zero_floor(
                np.concatenate([self._decrypted[k][: frame.chunk_len(k)] for k in range(frame.n_chunks)]),
                self.zero_floor))
            kept = float(sum(self._received[c].weight for c in ids if abs(self._coeffs[c]) > SKIP_BELOW))
        return RevealedGram(
            client_ids=ids,
            sample_weights=tuple(self._received[c].weight for c in ids),
            layers=layers,
            gram=self._gram,
            decision=self._decision,
            combination=combination,
            kept_weight=kept,
            layer_counts=counts,
            policy_refused=self._refused,
            rejected=dict(self._rejected),
            stats=self._stats(),
        )
