"""The CKKS key holder's decryption policy, and the requests a server may send it.

Threat model
------------
The server is curious and may deviate arbitrarily in what it asks the key holder to decrypt:
any ciphertext, any claimed set of contributors, any linear combination, any Gram entries,
any reference vector.  The key holder follows its code and does not collude with the server.
Clients that collude with the server count as contributors (the usual secure-aggregation
caveat: with ``m`` contributors of which ``m - 1`` collude, the last one's update is revealed).

Policy (``DecryptionPolicy``)
----------------------------
* An aggregate is decrypted only when the key holder computed it itself, as
  ``sum_i c_i * prescale_i * u_i`` over ciphertexts whose authors signed them for this round and
  frame (``ckks_auth``), with ``c_i >= 0`` and, for every frame layer in a decrypted chunk, at
  least ``min_contributors`` distinct clients whose share of that layer's total effective weight
  ``c_i * prescale_i`` is at least ``negligible_share``, and no client's share above
  ``max_share``.  Each chunk of a round is decrypted at most once, and a round is bound to one
  packing frame: differences of two combinations of one round cannot be formed.
* A Gram is decrypted only as exactly the pairwise inner products of the round's signed
  ciphertexts, computed by the key holder, over at least ``min_contributors`` clients that all
  filled every frame layer; one Gram per round.
* A reference (FLTrust) enters a Gram only as an upload signed by ``reference_party``, the
  party the policy names (e.g. the holder of the server's root data); without one, references
  are refused.  If the reference party colludes with the server, it can choose the reference
  and learn <u_i, r> for that r: one chosen projection per client per round.

``PolicyViolation`` is raised for anything outside the policy; a bad signature or a
ciphertext that does not load is a ``DecryptionError`` naming its sender.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from securefml.errors import ConfigError, PolicyViolation
from securefml.protocols.ckks_auth import SignedUpload
from securefml.protocols.ckks_stats import PackingFrame

__all__ = ["DecryptionPolicy", "AggregateRequest", "GramRequest", "SKIP_BELOW", "REFERENCE_PARTY"]

#: Coefficients at or below this are left out of a homomorphic weighted sum (a plaintext scalar
#: that rounds to zero at the CKKS scale would give a transparent ciphertext).
SKIP_BELOW = 1e-9
#: The default reference party id (not a client id).  Naming it grants nothing by itself: a
#: reference is accepted only with a valid signature under the key enrolled for this id.
REFERENCE_PARTY = -1


@dataclass(frozen=True)
class DecryptionPolicy:
    """What the key holder agrees to decrypt (see the module docstring).

    Parameters
    ----------
    min_contributors:
        Distinct clients of non-negligible weight that every decrypted layer must combine.
    max_share:
        Largest share of a layer's total effective weight one client may have; ``None`` means
        0.5 when ``min_contributors >= 2`` (no client more than half) and 1.0 otherwise.
    negligible_share:
        A client whose share is below this does not count as a contributor.
    reference_party:
        Party id whose signed upload may serve as the FLTrust reference (``REFERENCE_PARTY``
        by default; accepted only under the key enrolled for it); ``None``: no references.
        It must not be a client id.
    """

    min_contributors: int = 2
    max_share: float | None = None
    negligible_share: float = 1e-3
    reference_party: int | None = REFERENCE_PARTY

    def __post_init__(self) -> None:
        if isinstance(self.min_contributors, bool) or not isinstance(self.min_contributors, int) \
                or self.min_contributors < 1:
            raise ConfigError(f"min_contributors must be a positive integer, got {self.min_contributors!r}")
        share = self.max_share_bound
        if not (0.0 < share <= 1.0) or not math.isfinite(share):
            raise ConfigError(f"max_share must be in (0, 1], got {self.max_share}")
        if not 0.0 <= self.negligible_share < share:
            raise ConfigError(f"negligible_share must be in [0, max_share), got {self.negligible_share}")

    @property
    def max_share_bound(self) -> float:
        if self.max_share is not None:
            return float(self.max_share)
        return 0.5 if self.min_contributors >= 2 else 1.0

    def violation(self, weights: Mapping[int, float]) -> str | None:
        """Why a combination with these effective weights (client -> weight) is refused, or None."""
        bad = [c for c, w in weights.items() if not math.isfinite(w) or w < 0]
        if bad:
            return f"coefficients must be finite and non-negative (clients {sorted(bad)})"
        live = {c: w for c, w in weights.items() if w > SKIP_BELOW}
        total = sum(live.values())
        if total <= 0:
            return "the combination has no client with positive weight"
        shares = {c: w / total for c, w in live.items()}
        counted = sum(s >= self.negligible_share for s in shares.values())
        if counted < self.min_contributors:
            return (f"it combines {counted} client(s) of non-negligible weight, "
                    f"the policy needs at least {self.min_contributors}")
        top = max(shares, key=shares.__getitem__)
        if shares[top] > self.max_share_bound + 1e-12:
            return (f"client {top} would carry {shares[top]:.3f} of the weight, "
                    f"above the policy's bound {self.max_share_bound:.3f}")
        return None

    def check(self, weights: Mapping[int, float], *, what: str) -> None:
        """Raise ``PolicyViolation`` unless the combination is allowed."""
        reason = self.violation(weights)
        if reason is not None:
            raise PolicyViolation(f"key holder refuses to decrypt {what}: {reason}")


@dataclass(frozen=True)
class AggregateRequest:
    """The server asks for ``sum_i coefficients[i] * (client i's signed ciphertexts)``.

    Attributes
    ----------
    round_idx, frame:
        The round and its packing frame (the key holder checks the frame's fingerprint against
        the one every upload signed, and reads the layers' slot spans from it).
    uploads:
        The signed uploads the combination is over (one per client).
    coefficients:
        Client id -> plaintext coefficient; exactly the uploads' senders.  Under a weighted
        mean every coefficient is 1 (the clients prescaled by ``weight / W``).
    chunks:
        The frame chunks to decrypt; ``None``: every chunk some upload carries.
    """

    round_idx: int
    frame: PackingFrame
    uploads: tuple[SignedUpload, ...]
    coefficients: Mapping[int, float]
    chunks: tuple[int, ...] | None = None


@dataclass(frozen=True)
class GramRequest:
    """The server asks for the Gram of the round's signed uploads (and the signed reference)."""

    round_idx: int
    frame: PackingFrame
    uploads: tuple[SignedUpload, ...]
    reference: SignedUpload | None = None
