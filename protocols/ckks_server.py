"""The CKKS server's receive path: validate each upload, load it under the public context, add.

The server holds the public context only (``is_private()`` is False by construction).  A
message is rejected with a ``ProtocolError`` subclass naming its sender when it is for another
round, sender, context, layout or packing frame; when its blob is oversized or truncated; when
a ciphertext does not load under the context (other parameters) or has the wrong size, scale
or level; or when a ciphertext repeats one already received (replay window).  Under a weighted
mean each ciphertext is added to the running per-chunk sum as soon as it is loaded (so the
server knows it adds to the others), and a rejected message's additions are undone exactly.

Speed (issue 15): ciphertext fields stay views into the message until they are loaded, and
each one is loaded once.  On the running-sum path every ciphertext after a chunk's first is
loaded and added through TenSEAL's native vector type (``tenseal._ts_cpp.CKKSVector``, the
object TenSEAL's own ``CKKSVector`` wraps): the same SEAL deserialization and addition, without
the Python wrapper's type dispatch on each of the ~5,000 ciphertexts of a 20-client round.  The
wrapper is used when the native type is not there (another TenSEAL build).  The checks stay as
they were: SEAL refuses to add a ciphertext of another size, scale or form to the sum.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import tenseal as ts

from securefml.errors import ConfigError, MalformedMessageError, ProtocolError, ReplayError
from securefml.protocols.ckks_auth import SIGNATURE_BYTES, SignedUpload, VerifyKeyRegistry
from securefml.protocols.ckks_keys import CKKSPreset, context_fingerprint, get_preset, load_public_context
from securefml.protocols.ckks_params import ENVELOPE_OVERHEAD, HEADER_FIELDS, KIND, ct_field, ct_fields, wire_id
from securefml.protocols.ckks_stats import PackingFrame
from securefml.protocols.plaintext_codec import decode_manifest
from securefml.protocols.wire import decode, unpack_array

__all__ = ["CKKSServer", "ReceivedCiphertexts"]

# TenSEAL's native vector type (what ``ts.CKKSVector`` wraps): loading and adding through it skips
# the wrapper's per-call type dispatch; None on a TenSEAL without it (the wrapper is used then)
_NATIVE_VECTOR = getattr(getattr(ts, "_ts_cpp", None), "CKKSVector", None)


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


def _load_native(native: object, ctx: object, blob: bytes | memoryview, sender: int) -> object:
    """One ciphertext as TenSEAL's native vector (the bytes copy TenSEAL needs made here)."""
    try:
        return native(ctx, blob if type(blob) is bytes else bytes(blob))  # type: ignore[operator]
    except Exception:
        raise MalformedMessageError(
            "ciphertext does not load under this context (truncated, corrupt or other parameters)", sender=sender
        ) from None


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
        self._pruned_below: int | None = None  # every digest of a round below this is forgotten
        self._max_ct = self.preset.max_ciphertext_bytes

    def is_private(self) -> bool:
        """False by construction: the server's context never holds the secret key."""
        return bool(self.context.is_private())

    def max_message_bytes(self, frame: PackingFrame) -> int:
        return frame.n_chunks * self.preset.max_ciphertext_bytes + ENVELOPE_OVERHEAD

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
        env = decode(data, sender=sender, max_bytes=self.max_message_bytes(frame), views=ct_fields(frame.n_chunks))
        env.expect(kind=KIND, round=round_idx, sender=wire_id(sender))
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
        got = tuple(map(int, unpack_array(env.field("chunks"), expected_len=len(expected), sender=sender).tolist()))
        if got != expected:
            raise MalformedMessageError(f"chunk list {got} does not match the layers' chunks {expected}", sender=sender)
        if set(env.fields) != HEADER_FIELDS | {ct_field(k) for k in got}:
            raise MalformedMessageError("unexpected or missing ciphertext fields", sender=sender)
        chunks: dict[int, ts.CKKSVector] = {}
        blobs: dict[int, bytes | memoryview] = {}
        added: list[int] = []  # chunks already added into the running sums
        seeded: set[int] = set()  # ... of which this message started the sum
        digests = []
        fields = env.fields
        max_ct = self._max_ct
        load = self._load
        digest = self._digest
        native, native_ctx, add_native, load_native = _NATIVE_VECTOR, self.context.data, self._add_native, _load_native
        try:
            for k in got:
                blob = fields[ct_field(k)]  # a view into ``data``: copied only to load it (TenSEAL takes bytes)
                if len(blob) > max_ct:
                    raise MalformedMessageError(f"ciphertext of {len(blob)} bytes is oversized", sender=sender)
                digests.append(digest(blob))
                blobs[k] = blob
                if into is None:
                    chunks[k] = load(blob, frame.slots, sender, strict=strict)
                    continue
                # not kept: holding every loaded ciphertext (4x its wire size) until the message is
                # accepted costs fresh memory; an undo loads the few it needs again
                slot = into.get(k)
                if slot is not None and native is not None:
                    add_native(slot, load_native(native, native_ctx, blob, sender), sender)
                elif self._add(into, k, load(blob, frame.slots, sender, strict=strict), sender):
                    seeded.add(k)
                added.append(k)
            upload = SignedUpload(sender, round_idx, frame.fingerprint(), layers, float(weight), float(prescale),
                                  blobs, bytes(sig))
            if self.verify_keys is not None:
                self.verify_keys.verify(upload, self.fingerprint)
            self._check_replay(round_idx, sender, digests)
        except Exception:
            if into is not None:
                self._undo(into, added, seeded, blobs, frame.slots, sender)
            raise
        kept = {} if into is not None else chunks
        return ReceivedCiphertexts(sender, float(weight), layers, kept, len(data), tuple(digests), upload)

    def _add(self, sums: dict[int, list], k: int, vec: ts.CKKSVector, sender: int) -> bool:
        """Add ``vec`` into chunk ``k``'s running sum; True if it started that sum."""
        slot = sums.get(k)
        if slot is None:  # this ciphertext seeds the sum: every later one is added to it
            self.check_fresh(vec, self.preset.slots, sender)
            sums[k] = [vec, 1]
            return True
        try:
            slot[0].add_(vec)  # SEAL refuses a size / scale / form mismatch before writing
        except Exception:
            raise MalformedMessageError(
                "a ciphertext cannot be added to the others (size, scale or form mismatch)", sender=sender
            ) from None
        slot[1] += 1
        return False

    @staticmethod
    def _add_native(slot: list, vec: object, sender: int) -> None:
        """``_add`` for a loaded native ciphertext and a chunk whose sum is already seeded."""
        try:
            slot[0].data += vec  # SEAL refuses a size / scale / form mismatch before writing
        except Exception:
            raise MalformedMessageError(
                "a ciphertext cannot be added to the others (size, scale or form mismatch)", sender=sender
            ) from None
        slot[1] += 1

    def _undo(self, sums: dict[int, list], added: Sequence[int], seeded: set[int],
              blobs: Mapping[int, bytes | memoryview], slots: int, sender: int) -> None:
        """Take a rejected message's additions out again, exactly (CKKS addition is modular).

        Loading the same bytes again gives the same ciphertext, so subtracting the reloaded one
        restores the sum word for word.
        """
        for k in added:
            slot = sums[k]
            if k in seeded:
                del sums[k]
            else:
                slot[0].sub_(self._load(blobs[k], slots, sender, strict=False))
                slot[1] -= 1

    def _load(self, blob: bytes | memoryview, size: int, sender: int, *, strict: bool = True) -> ts.CKKSVector:
        if len(blob) > self._max_ct:
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
        if self._pruned_below is None or horizon > self._pruned_below:  # once per round, not once per message
            self._seen = {d: rs for d, rs in self._seen.items() if rs[0] >= horizon}
            self._pruned_below = horizon
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
        self._pruned_below = None
