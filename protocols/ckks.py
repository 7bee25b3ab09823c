"""TenSEAL CKKS aggregation as a factory of halves: clients, server, key holder, reference party.

Four parties, each its own half over bytes (``securefml.protocols.halves``), one job per module:

* ``ckks_client`` / ``ckks_client_half``: a client packs its selected layers densely into the
  round's frame chunks, encrypts and signs them (public context only).
* ``ckks_server`` / ``ckks_server_half``: the aggregator (public context only; ``is_private()``
  is False) validates every message, checks each ciphertext adds to the others, forwards the
  signed uploads to the key holder and asks for what the round needs.
* ``ckks_key_holder_half`` (over ``ckks_keys.CKKSKeyHolder``): the secret key; it decrypts, from
  the round's signed uploads, only the sums and the ``Gram`` its ``DecryptionPolicy``
  (``ckks_policy``) allows, whatever bytes the server sends it.
* ``ckks_client_half.CKKSReferenceHalf``: the reference party (FLTrust's root data) signs its
  reference so that the key holder admits it to the Gram.

``ckks_params`` derives the public round parameters (packing frame, party ids), ``ckks_codec``
holds the byte encodings of plans, announcements, requests and replies.  This module is the
factory: ``CKKS`` builds the halves of a round; the generic ``AggregationProtocol.run_round``
drives them (``simulate``) and the one aggregation step (``securefml.aggregation.aggregate``)
turns what the server half reveals (``RevealedLayerMeans`` or ``RevealedGram``) into the round's
output.  Stages: ``announce`` -> ``update`` -> (``gram``) -> ``decrypt``.

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

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from securefml.errors import ConfigError
from securefml.protocols.base import AggregationProtocol, ClientUpdate, HalvesSetup, Reveals
from securefml.protocols.ckks_auth import UploadSigner
from securefml.protocols.ckks_client import CKKSClient
from securefml.protocols.ckks_client_half import CKKSClientHalf, CKKSReferenceHalf
from securefml.protocols.ckks_key_holder_half import CKKSKeyHolderHalf
from securefml.protocols.ckks_keys import CKKSKeyHolder, CKKSPreset
from securefml.protocols.ckks_params import KEY_HOLDER_PARTY, KIND, MAX_ABS, packing_frame
from securefml.protocols.ckks_policy import REFERENCE_PARTY, DecryptionPolicy
from securefml.protocols.ckks_server import CKKSServer, ReceivedCiphertexts
from securefml.protocols.ckks_server_half import CKKSRoundStats, CKKSServerHalf
from securefml.protocols.ckks_stats import PackingFrame, check_zero_floor
from securefml.protocols.halves import ClientHalf
from securefml.protocols.registry import PROTOCOLS
from securefml.updates import LayerLayout

if TYPE_CHECKING:  # pragma: no cover
    from securefml.defenses.base import Defense

__all__ = [
    "CKKS",
    "CKKSClient",
    "CKKSServer",
    "CKKSClientHalf",
    "CKKSServerHalf",
    "CKKSKeyHolderHalf",
    "CKKSReferenceHalf",
    "CKKSRoundStats",
    "ReceivedCiphertexts",
    "KIND",
    "MAX_ABS",
    "KEY_HOLDER_PARTY",
    "REFERENCE_PARTY",
]

log = logging.getLogger(__name__)


@PROTOCOLS.register("ckks")
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
    The decrypted aggregate matches the plaintext one within ``ckks_stats.sum_error_bound`` plus
    the resolution floor ``zero_floor`` (below); an entry that is 0 in every upload decrypts to
    exactly 0 whenever its noise is below the floor (measured margin 2.9x or more up to 16 uploads);
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
    zero_floor:
        Resolution floor tau of the decode: decrypted entries with ``|x| < tau`` become exactly 0
        (mean sums and robust combinations), so an entry that is 0 in every upload stays 0 as it
        does in plaintext and SecAgg, instead of CKKS noise that a scale-free server optimizer
        (Adam) amplifies.  None (default): ``ckks_stats.default_zero_floor`` of the preset's
        scale (2^-23 ~ 1.2e-7 at 2^40; 24-48 noise standard deviations of a sum of 4-16 uploads,
        2.9x or more the largest noise measured); 0 disables it.
        Each entry then stays within the documented bound plus tau (``error_bound`` includes
        it); entries decoded at ``|x| >= tau`` are unchanged.  See ``ckks_stats``.

    References
    ----------
    Cheon, Kim, Kim, Song, Homomorphic Encryption for Arithmetic of Approximate Numbers
    (CKKS), ASIACRYPT 2017.  Benaissa et al., TenSEAL, 2021.  NVIDIA FLARE homomorphic
    encryption (shared key, no robust rules).  Gram-based robust rules: Blanchard et al. 2017
    (Krum), Cao et al. 2021 (FLTrust).
    """

    name = "ckks"
    reveals = Reveals.GRAM

    def __init__(
        self,
        key_holder: CKKSKeyHolder | None = None,
        *,
        preset: str | CKKSPreset = "stats",
        min_contributors: int = 2,
        policy: DecryptionPolicy | None = None,
        replay_window: int = 8,
        zero_floor: float | None = None,
    ) -> None:
        self.zero_floor = None if zero_floor is None else check_zero_floor(zero_floor)
        if key_holder is None:
            policy = policy or DecryptionPolicy(min_contributors=min_contributors)
            key_holder = CKKSKeyHolder.generate(preset, policy=policy)
        self.key_holder = key_holder
        self.preset = self.key_holder.preset
        public = self._public = self.key_holder.public_context_bytes()
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
        """Also refuse a rule whose output is fewer than ``min_contributors`` clients' updates,
        and a robust rule under a preset without the statistics keys."""
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
        if not defense.is_weighted_mean and not self.preset.statistics:
            raise ConfigError(
                f"defense {defense!r} needs encrypted statistics; preset {self.preset.name!r} has no "
                "relinearization/Galois keys (use preset='stats')"
            )

    def frame_for(self, layout: LayerLayout, layer_sets: Sequence[Sequence[str]]) -> PackingFrame:
        """The round's packing frame: layers announced by at least ``min_contributors`` clients."""
        return packing_frame(layout, layer_sets, self.preset.slots, self.min_contributors)

    # -- the halves ------------------------------------------------------------------------------
    def server_half(
        self, round_idx: int, layout: LayerLayout, cohort: Sequence[int], *, setup: HalvesSetup
    ) -> CKKSServerHalf:
        """The aggregator's half: public context, this protocol's replay memory, the key holder's policy."""
        self.check_defense(setup.defense)
        robust = not setup.defense.is_weighted_mean
        return CKKSServerHalf(
            round_idx, layout, cohort, public_context=self._public, preset=self.preset, policy=self.policy,
            defense=setup.defense, combine=setup.combine, server=self.server,
            reference_party=self._reference_party(setup) if robust else None, zero_floor=self.zero_floor,
        )

    def client_half(self, round_idx: int, layout: LayerLayout, update: ClientUpdate) -> CKKSClientHalf:
        """Client ``update.client_id``'s half, with its enrolled signing key and the public context."""
        return CKKSClientHalf(update, layout, round_idx=round_idx, public_context=self._public, preset=self.preset,
                              signer=self.enroll(update.client_id), client=self.client)

    def service_halves(self, round_idx: int, layout: LayerLayout, *, setup: HalvesSetup) -> dict[int, ClientHalf]:
        """The key holder's half, and in a robust round with a reference the reference party's."""
        out: dict[int, ClientHalf] = {KEY_HOLDER_PARTY: CKKSKeyHolderHalf(self.key_holder, layout, round_idx=round_idx)}
        party = self._reference_party(setup) if not setup.defense.is_weighted_mean else None
        if party is not None and setup.reference is not None:
            out[party] = CKKSReferenceHalf(setup.reference, layout, round_idx=round_idx, public_context=self._public,
                                           preset=self.preset, signer=self.enroll(party), party=party,
                                           client=self.client)
        return out

    def _reference_party(self, setup: HalvesSetup) -> int | None:
        if setup.reference is None:
            return None
        party = self.policy.reference_party
        if party is None:
            raise ConfigError("a reference was given, and the key holder's policy names no reference party")
        return party
