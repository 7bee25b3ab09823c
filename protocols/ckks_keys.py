"""CKKS parameter presets and the key holder, the only party that owns the secret key.

The key holder is either the clients' shared key (NVIDIA FLARE's model) or a separate party
that does not collude with the server.  It hands out a *public* context (public key, plus the
relinearization and Galois keys the statistics need; never the secret key) and decrypts only
what its own ``DecryptionPolicy`` (``ckks_policy``) allows: a linear combination or a Gram that
it computes itself from ciphertexts their authors signed for the round (``ckks_auth``).  It
never decrypts a ciphertext the server made: the server's word on who contributed to a sum,
on Gram entries or on a reference vector is not taken.

Everything that crosses the boundary between the key holder and the server is bytes, so the
secret context never shares a process object with the server's public context.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import tenseal as ts
import torch

from securefml.errors import ConfigError, DecryptionError, PolicyViolation
from securefml.gram import Gram
from securefml.protocols.ckks_auth import SignedUpload, VerifyKeyRegistry
from securefml.protocols.ckks_policy import SKIP_BELOW, AggregateRequest, DecryptionPolicy, GramRequest
from securefml.protocols.ckks_stats import PackingFrame, encrypted_inner_products

__all__ = [
    "CKKSPreset",
    "PRESETS",
    "get_preset",
    "CKKSKeyHolder",
    "load_public_context",
    "context_fingerprint",
]


@dataclass(frozen=True)
class CKKSPreset:
    """CKKS encryption parameters (the explicitly named low-level place to tune them).

    Attributes
    ----------
    name:
        Short name used in specs (``"add-only"``, ``"stats"``).
    poly_modulus_degree:
        Ring dimension n; a ciphertext carries n / 2 real slots.
    coeff_mod_bit_sizes:
        Bit sizes of the modulus chain; the last prime is the special (key-switching) prime.
        Each middle prime allows one rescale, i.e. one multiplication depth.
    scale_bits:
        log2 of the encoding scale; about ``scale_bits - 20`` bits of precision after a few
        additions at n = 8192.
    statistics:
        Whether the public context carries relinearization and Galois keys, needed for
        encrypted inner products (one ciphertext multiply + rotate-and-sum) and for
        plaintext-weighted sums (one scalar multiply).
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    statistics: bool

    def __post_init__(self) -> None:
        if self.poly_modulus_degree not in (4096, 8192, 16384, 32768):
            raise ConfigError(f"poly_modulus_degree must be 4096, 8192, 16384 or 32768, got {self.poly_modulus_degree}")
        if len(self.coeff_mod_bit_sizes) < 2:
            raise ConfigError("coeff_mod_bit_sizes needs at least a data prime and the special prime")
        if self.statistics and len(self.coeff_mod_bit_sizes) < 4:
            raise ConfigError("a statistics preset needs two multiplicative levels (at least 4 primes)")
        if not 20 <= self.scale_bits < self.coeff_mod_bit_sizes[0]:
            raise ConfigError(f"scale_bits must be in [20, {self.coeff_mod_bit_sizes[0]}), got {self.scale_bits}")

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def fresh_primes(self) -> int:
        """Primes in a freshly encrypted ciphertext (the chain minus the special prime)."""
        return len(self.coeff_mod_bit_sizes) - 1

    @property
    def max_ciphertext_bytes(self) -> int:
        """Upper bound on one serialized fresh ciphertext: two polynomials, 8 bytes a coefficient."""
        return 2 * self.poly_modulus_degree * self.fresh_primes * 8 + 4096


PRESETS: Mapping[str, CKKSPreset] = {
    "add-only": CKKSPreset("add-only", 8192, (60, 60), 40, False),
    "stats": CKKSPreset("stats", 8192, (60, 40, 40, 60), 40, True),
}


def get_preset(preset: str | CKKSPreset) -> CKKSPreset:
    """Resolve a preset name (or pass a ``CKKSPreset`` through)."""
    if isinstance(preset, CKKSPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ConfigError(f"unknown CKKS preset {preset!r}; valid presets: {sorted(PRESETS)}") from None


def context_fingerprint(public_context: bytes) -> bytes:
    """16 bytes naming a public context (its serialized keys); binds messages to one key set."""
    return hashlib.sha256(b"securefml-ckks-context\x00" + public_context).digest()[:16]


def load_public_context(public_context: bytes) -> ts.Context:
    """Load a public context and refuse one that carries a secret key.

    Raises
    ------
    ConfigError
        If the bytes do not load or the context is private.
    """
    try:
        ctx = ts.context_from(public_context)
    except Exception as exc:  # TenSEAL raises ValueError/RuntimeError on bad bytes
        raise ConfigError(f"public CKKS context does not load: {exc}") from None
    if ctx.is_private():
        raise ConfigError("refusing a CKKS context that carries the secret key where only the public one belongs")
    return ctx


def _check_types(u: object) -> None:
    """Refuse anything but a ``SignedUpload`` whose fields have their declared types."""
    ok = (
        isinstance(u, SignedUpload)
        and all(isinstance(x, int) and not isinstance(x, bool) for x in (u.sender, u.round_idx))
        and isinstance(u.frame, bytes) and isinstance(u.signature, bytes)
        and isinstance(u.layers, tuple) and all(isinstance(n, str) for n in u.layers)
        and all(isinstance(x, float) for x in (u.weight, u.prescale))
        and isinstance(u.chunks, Mapping)
        and all(isinstance(k, int) and isinstance(v, (bytes, memoryview)) for k, v in u.chunks.items())
    )
    if not ok:
        raise PolicyViolation("the key holder only takes signed uploads with well-typed fields")


@dataclass
class _RoundLedger:
    """What the key holder has already decrypted in one round."""

    frame: bytes
    chunks: set[int] = field(default_factory=set)
    gram: bool = False


class CKKSKeyHolder:
    """Owns the CKKS secret key; decrypts only what its policy allows, computed by itself.

    Build one with ``CKKSKeyHolder.generate(preset=...)``; the constructor is not meant to be
    called with user-made key material.  Enrol clients (and the reference party) by putting
    their Ed25519 verify keys in ``registry`` (out of band).

    Threat model
    ------------
    The server is curious and may send the key holder anything (``ckks_policy`` lists what is
    checked).  The key holder follows its code and does not collude with the server.  It
    receives the clients' individual signed ciphertexts, because it cannot check that a
    ciphertext is a given combination of others without them: it recomputes every sum and
    every Gram entry it decrypts.  So it *could* decrypt a single update: it is trusted to
    follow this policy (run it with the clients, or in an enclave), and it is the server that
    this design protects the clients from.

    Guarantees (tested against a hypothesis-driven curious server in
    ``tests/property/test_ckks_key_holder_adversary.py``)
    -----------------------------------------------------------------------------------------
    * ``decrypt_aggregate`` returns only ``sum_i c_i prescale_i u_i`` over signed uploads of
      the round, each decrypted layer combining at least ``min_contributors`` clients of
      non-negligible share and none above ``max_share``; each chunk once per round.
    * ``decrypt_gram`` returns only the pairwise inner products of the round's signed uploads
      (and of the reference party's signed upload), once per round.
    * Anything else raises ``PolicyViolation`` (bad signature or unloadable ciphertext:
      ``DecryptionError`` naming the sender) before anything is decrypted.

    Parameters
    ----------
    preset:
        The parameters the keys were made for.
    policy:
        What it agrees to decrypt; default ``DecryptionPolicy(min_contributors)``.
    min_contributors:
        Shorthand for ``DecryptionPolicy(min_contributors=...)`` when ``policy`` is omitted.
    """

    def __init__(
        self,
        _secret_context: ts.Context,
        preset: CKKSPreset,
        *,
        policy: DecryptionPolicy | None = None,
        min_contributors: int = 2,
    ) -> None:
        if not _secret_context.is_private():
            raise ConfigError("a key holder needs a context with the secret key")
        self.policy = policy if policy is not None else DecryptionPolicy(min_contributors=min_contributors)
        self._ctx = _secret_context
        self.preset = preset
        self._public = _secret_context.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=preset.statistics,
            save_relin_keys=preset.statistics,
        )
        self.fingerprint = context_fingerprint(self._public)
        self.registry = VerifyKeyRegistry()
        self._ledger: dict[int, _RoundLedger] = {}

    @classmethod
    def generate(
        cls,
        preset: str | CKKSPreset = "stats",
        *,
        min_contributors: int = 2,
        policy: DecryptionPolicy | None = None,
        n_threads: int | None = None,
    ) -> CKKSKeyHolder:
        """Create fresh keys for ``preset`` (``"add-only"`` or ``"stats"``)."""
        p = get_preset(preset)
        kwargs = {} if n_threads is None else {"n_threads": int(n_threads)}
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=p.poly_modulus_degree,
            coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes),
            **kwargs,
        )
        ctx.global_scale = p.scale
        if p.statistics:
            ctx.generate_galois_keys()
        return cls(ctx, p, policy=policy, min_contributors=min_contributors)

    @classmethod
    def from_secret_context(cls, data: bytes, public_context: bytes, preset: str | CKKSPreset, *,
                            policy: DecryptionPolicy | None = None) -> CKKSKeyHolder:
        """Load a provisioned key holder: ``secret_context_bytes`` and the public context handed out with it.

        The key holder keeps ``public_context`` byte for byte (clients sign over its fingerprint;
        TenSEAL does not re-serialize a loaded context identically), after checking that a value
        encrypted under it decrypts under the secret key.  Out-of-band provisioning only.

        Raises ``ConfigError`` if the bytes do not load, hold no secret key, or do not belong together.
        """
        p = get_preset(preset)
        try:
            ctx = ts.context_from(bytes(data))
            probe = ts.ckks_vector(load_public_context(bytes(public_context)), [0.5, -0.25])
            back = ts.ckks_vector_from(ctx, probe.serialize()).decrypt()
        except Exception:
            raise ConfigError("the provisioned secret or public context does not load") from None
        if abs(back[0] - 0.5) > 1e-3 or abs(back[1] + 0.25) > 1e-3:
            raise ConfigError("the provisioned public context does not belong to this secret key")
        holder = cls(ctx, p, policy=policy)
        holder._public = bytes(public_context)
        holder.fingerprint = context_fingerprint(holder._public)
        return holder

    def secret_context_bytes(self) -> bytes:
        """The serialized secret context, for provisioning the key holder's own machine.

        Only ``securefml.flower.provision`` calls this, in its own process, to write the file
        that is copied to the key holder (and nowhere else).
        """
        return bytes(self._ctx.serialize(save_public_key=True, save_secret_key=True,
                                         save_galois_keys=self.preset.statistics,
                                         save_relin_keys=self.preset.statistics))

    @property
    def min_contributors(self) -> int:
        return self.policy.min_contributors

    # -- what the key holder gives out ---------------------------------------------------------
    def public_context_bytes(self) -> bytes:
        """The serialized public context: public key (+ relin/Galois keys for statistics)."""
        return self._public

    # -- checks --------------------------------------------------------------------------------
    def _load(self, blob: bytes, sender: int) -> ts.CKKSVector:
        try:
            vec = ts.ckks_vector_from(self._ctx, blob)
        except Exception:
            raise DecryptionError("a ciphertext sent to the key holder does not load", sender=sender) from None
        if vec.size() != self.preset.slots:
            raise DecryptionError(f"a ciphertext holds {vec.size()} slots, not {self.preset.slots}", sender=sender)
        return vec

    def _verified(
        self, round_idx: int, frame: PackingFrame, uploads: object, *, full: bool
    ) -> dict[int, SignedUpload]:
        """Check every upload's signature, round, frame and chunks; sender -> upload."""
        if not isinstance(frame, PackingFrame) or frame.slots != self.preset.slots:
            raise PolicyViolation("the request's packing frame does not match this key set")
        if not isinstance(uploads, tuple):
            raise PolicyViolation("uploads must be a tuple of SignedUpload")
        fp = frame.fingerprint()
        ledger = self._ledger.get(int(round_idx))
        if ledger is not None and ledger.frame != fp:
            raise PolicyViolation(f"round {round_idx} is bound to another packing frame")
        out: dict[int, SignedUpload] = {}
        for u in uploads:
            _check_types(u)
            if u.sender in out:
                raise PolicyViolation(f"client {u.sender} appears twice in one request")
            if u.sender == self.policy.reference_party:
                raise PolicyViolation("the reference party's upload cannot count as a client's")
            self._check_upload(u, round_idx, frame, full=full)
            out[u.sender] = u
        return out

    def _check_upload(self, u: SignedUpload, round_idx: int, frame: PackingFrame, *, full: bool) -> None:
        _check_types(u)
        self.registry.verify(u, self.fingerprint)
        if u.round_idx != int(round_idx):
            raise PolicyViolation(f"upload of client {u.sender} was signed for round {u.round_idx}, not {round_idx}")
        if u.frame != frame.fingerprint():
            raise PolicyViolation(f"upload of client {u.sender} was signed for another packing frame")
        try:
            layers = frame.layout.canonical(u.layers)
        except (ConfigError, KeyError, ValueError):
            raise PolicyViolation(f"upload of client {u.sender} names layers outside the layout") from None
        if not layers or layers != u.layers or not set(layers) <= set(frame.spans):
            raise PolicyViolation(f"upload of client {u.sender} has a bad layer manifest for this frame")
        if full and layers != frame.layers:
            raise PolicyViolation(f"a Gram needs every frame layer; client {u.sender} filled {layers}")
        if set(u.chunks) != set(frame.chunks_for(layers)):
            raise PolicyViolation(f"upload of client {u.sender} does not carry exactly its layers' chunks")

    def _ledger_for(self, round_idx: int, frame: PackingFrame) -> _RoundLedger:
        return self._ledger.setdefault(int(round_idx), _RoundLedger(frame.fingerprint()))

    # -- what the key holder decrypts ----------------------------------------------------------
    def decrypt_aggregate(self, request: object, *_legacy: object, **_claims: object) -> dict[int, np.ndarray]:
        """Decrypt a signed linear combination, chunk by chunk (chunk -> ``slots`` values).

        Parameters
        ----------
        request:
            An ``AggregateRequest``.  Anything else (bare ciphertexts, a claimed contributor
            count in ``_claims``) is what an unverifiable request looks like and is refused.

        Raises
        ------
        PolicyViolation
            The request is outside the policy (nothing decrypted).
        DecryptionError
            An upload's signature does not verify or a ciphertext does not load (names it).
        """
        if not isinstance(request, AggregateRequest):
            raise PolicyViolation(
                "key holder refuses: it decrypts only combinations it computes itself from signed uploads "
                "(an AggregateRequest); bare ciphertexts and claimed contributor counts are not verifiable"
            )
        frame = request.frame
        _check_round(request.round_idx)
        round_idx = request.round_idx
        try:
            coeffs = {int(c): float(w) for c, w in dict(request.coefficients).items()}
            wanted = None if request.chunks is None else tuple(int(k) for k in request.chunks)
        except (TypeError, ValueError):
            raise PolicyViolation("the request's coefficients or chunks are not numbers") from None
        uploads = self._verified(round_idx, frame, request.uploads, full=False)
        if set(coeffs) != set(uploads):
            raise PolicyViolation("the coefficients must name exactly the senders of the uploads")
        bad = sorted(c for c, w in coeffs.items() if not math.isfinite(w) or w < 0)
        if bad:
            raise PolicyViolation(f"key holder refuses negative or non-finite coefficients (clients {bad})")
        carried = sorted({k for u in uploads.values() for k in u.chunks})
        chunks = tuple(carried) if wanted is None else wanted
        if not chunks or len(set(chunks)) != len(chunks) or not set(chunks) <= set(range(frame.n_chunks)):
            raise PolicyViolation("requested chunks must be distinct chunks of the frame, at least one")
        ledger = self._ledger.get(round_idx)
        done = sorted(set(chunks) & ledger.chunks) if ledger is not None else []
        if done:
            raise PolicyViolation(f"chunks {done} of round {round_idx} were already decrypted")
        for k in chunks:
            checked = 0
            for name in frame.layers_in_chunk(k):
                eff = {c: coeffs[c] * u.prescale for c, u in uploads.items() if name in u.layers}
                if eff:  # a layer no upload filled holds only what its senders put there themselves
                    self.policy.check(eff, what=f"layer {name!r} of round {round_idx}")
                    checked += 1
            if not checked:
                raise PolicyViolation(f"chunk {k} holds no layer of the request's uploads: nothing to decrypt")
        out: dict[int, np.ndarray] = {}
        sums: dict[int, ts.CKKSVector] = {}
        for k in chunks:
            terms = [(c, u) for c, u in uploads.items() if k in u.chunks and coeffs[c] > SKIP_BELOW]
            plain_add = all(coeffs[c] == 1.0 for c, _ in terms)  # add-only keys have no multiply level
            acc = None
            for c, u in terms:
                ct = self._load(bytes(u.chunks[k]), c)
                try:
                    if not plain_add:
                        ct = ct * coeffs[c]
                    acc = ct if acc is None else acc.add_(ct)
                except Exception:
                    raise DecryptionError("a ciphertext cannot enter the combination", sender=c) from None
            if acc is not None:
                sums[k] = acc
        ledger = self._ledger_for(round_idx, frame)
        ledger.chunks.update(chunks)
        for k in chunks:
            if k not in sums:
                out[k] = np.zeros(frame.slots)
                continue
            try:
                out[k] = np.asarray(sums[k].decrypt(), dtype=np.float64)
            except Exception:
                raise DecryptionError("an aggregate chunk does not decrypt") from None
        return out

    def decrypt_gram(self, request: object, *_legacy: object, **_claims: object) -> Gram:
        """Compute and decrypt the Gram of the round's signed uploads (and signed reference).

        Parameters
        ----------
        request:
            A ``GramRequest``; anything else (server-made scalar ciphertexts, a server-chosen
            reference) is refused.

        Raises
        ------
        PolicyViolation
            Outside the policy: too few clients, a second Gram in the round, a reference not
            signed by the policy's reference party, clients that did not fill every layer.
        DecryptionError
            A signature does not verify or a ciphertext does not load (names its sender).
        """
        if not isinstance(request, GramRequest):
            raise PolicyViolation(
                "key holder refuses: it decrypts a Gram only as the pairwise inner products it computes "
                "itself from the round's signed uploads (a GramRequest); server-made ciphertexts are not verifiable"
            )
        frame = request.frame
        _check_round(request.round_idx)
        uploads = self._verified(request.round_idx, frame, request.uploads, full=True)
        n = len(uploads)
        if n < self.policy.min_contributors:
            raise PolicyViolation(
                f"key holder refuses a Gram of {n} client(s) (minimum {self.policy.min_contributors})"
            )
        ledger = self._ledger.get(int(request.round_idx))
        if ledger is not None and ledger.gram:
            raise PolicyViolation(f"a Gram of round {request.round_idx} was already decrypted (one per round)")
        ref = request.reference
        if ref is not None:
            if self.policy.reference_party is None:
                raise PolicyViolation("key holder refuses a reference: its policy names no reference party")
            if not isinstance(ref, SignedUpload) or ref.sender != self.policy.reference_party:
                raise PolicyViolation(
                    f"a reference must be signed by the reference party {self.policy.reference_party}"
                )
            self._check_upload(ref, request.round_idx, frame, full=True)
        order = list(uploads.values()) + ([ref] if ref is not None else [])
        blobs = [[bytes(u.chunks[k]) for k in range(frame.n_chunks)] for u in order]
        vectors = [[self._load(b, u.sender) for b in row] for u, row in zip(order, blobs, strict=True)]
        try:  # the lazy path reads SEAL's ciphertexts from the very bytes loaded and checked here
            inner = encrypted_inner_products(vectors, blobs=blobs)
        except Exception:
            raise DecryptionError("the uploads' inner products cannot be computed") from None
        self._ledger_for(request.round_idx, frame).gram = True
        m = len(order)
        mat = torch.zeros((m, m), dtype=torch.float64)
        for (i, j), ct in inner.items():
            try:
                mat[i, j] = mat[j, i] = float(ct.decrypt()[0])
            except Exception:
                raise DecryptionError("a statistic does not decrypt") from None
        ids = tuple(uploads)
        if ref is None:
            return Gram(ids, mat, None, None)
        return Gram(ids, mat[:n, :n].clone(), mat[:n, n].clone(), float(mat[n, n]))

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """The registry and the per-round ledger (what was decrypted); never the secret key."""
        rounds = {str(r): {"frame": lg.frame.hex(), "chunks": sorted(lg.chunks), "gram": lg.gram}
                  for r, lg in self._ledger.items()}
        return {"registry": self.registry.state_dict(), "rounds": rounds}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        reg = state.get("registry", {})
        rounds = state.get("rounds", {})
        if not isinstance(reg, Mapping) or not isinstance(rounds, Mapping):
            raise ConfigError("key holder state must hold a registry and rounds mapping")
        self.registry.load_state_dict(reg)
        for r, lg in rounds.items():
            if not isinstance(lg, Mapping):
                raise ConfigError("each round's ledger must be a mapping")
            chunks = lg.get("chunks", [])
            self._ledger[int(r)] = _RoundLedger(
                bytes.fromhex(str(lg["frame"])),
                {int(k) for k in chunks} if isinstance(chunks, list) else set(),
                bool(lg.get("gram", False)),
            )

    def __repr__(self) -> str:
        return (
            f"CKKSKeyHolder(preset={self.preset.name!r}, min_contributors={self.policy.min_contributors}, "
            f"max_share={self.policy.max_share_bound}, reference_party={self.policy.reference_party}, "
            f"enrolled={len(self.registry)}, fingerprint={self.fingerprint.hex()})"
        )


def _check_round(round_idx: object) -> None:
    """A request names its round as a plain integer (the ledger is keyed on it)."""
    if isinstance(round_idx, bool) or not isinstance(round_idx, int):
        raise PolicyViolation("the request's round is not an integer")
