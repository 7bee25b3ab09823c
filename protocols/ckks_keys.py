"""CKKS parameter presets and the key holder, the only party that owns the secret key.

The key holder is either the clients' shared key (NVIDIA FLARE's model) or a separate party
that does not collude with the server.  It hands out a *public* context (public key, plus the
relinearization and Galois keys the statistics need; never the secret key) and decrypts only
what the server asks it to: aggregates of at least ``min_contributors`` clients, and the
scalar inner products that make up a ``Gram``.  It never receives an individual update.

Everything that crosses the boundary between the key holder and the server is bytes, so the
secret context never shares a process object with the server's public context.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts
import torch

from securefml.errors import ConfigError, DecryptionError, ProtocolError
from securefml.gram import Gram

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


class CKKSKeyHolder:
    """Owns the CKKS secret key; decrypts only aggregates and Gram statistics.

    Build one with ``CKKSKeyHolder.generate(preset=...)``; the constructor is not meant to be
    called with user-made key material.

    Threat model
    ------------
    Honest-but-curious and non-colluding with the server (or: the clients themselves, who
    share the key).  It sees the decrypted aggregate and the decrypted ``Gram`` (the declared
    leakage of robust CKKS aggregation), never a single client's ciphertext: the server only
    sends it sums over at least ``min_contributors`` clients and rotate-and-summed scalars.
    The guard on ``min_contributors`` is a policy check on what the server claims; it cannot
    prove that a ciphertext is a sum (nothing in CKKS can), hence the non-collusion assumption.

    Parameters
    ----------
    preset:
        The parameters the keys were made for.
    min_contributors:
        Refuse to decrypt an aggregate the server says covers fewer clients than this.
    """

    def __init__(self, _secret_context: ts.Context, preset: CKKSPreset, *, min_contributors: int = 2) -> None:
        if not _secret_context.is_private():
            raise ConfigError("a key holder needs a context with the secret key")
        if min_contributors < 1:
            raise ConfigError(f"min_contributors must be >= 1, got {min_contributors}")
        self._ctx = _secret_context
        self.preset = preset
        self.min_contributors = int(min_contributors)
        self._public = _secret_context.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=preset.statistics,
            save_relin_keys=preset.statistics,
        )
        self.fingerprint = context_fingerprint(self._public)

    @classmethod
    def generate(
        cls, preset: str | CKKSPreset = "stats", *, min_contributors: int = 2, n_threads: int | None = None
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
        return cls(ctx, p, min_contributors=min_contributors)

    # -- what the key holder gives out ---------------------------------------------------------
    def public_context_bytes(self) -> bytes:
        """The serialized public context: public key (+ relin/Galois keys for statistics)."""
        return self._public

    # -- what the key holder decrypts ----------------------------------------------------------
    def _load(self, blob: bytes) -> ts.CKKSVector:
        try:
            return ts.ckks_vector_from(self._ctx, blob)
        except Exception:
            raise DecryptionError("a ciphertext sent to the key holder does not decrypt") from None

    def decrypt_aggregate(self, blobs: Sequence[bytes], *, contributors: int) -> np.ndarray:
        """Decrypt the chunks of one aggregate (a sum over ``contributors`` clients), concatenated.

        Raises
        ------
        ProtocolError
            If ``contributors`` is below ``min_contributors``: that would reveal too few updates.
        DecryptionError
            If a chunk does not decrypt under this key.
        """
        if contributors < self.min_contributors:
            raise ProtocolError(
                f"key holder refuses to decrypt a sum over {contributors} client(s) "
                f"(minimum {self.min_contributors})"
            )
        parts = []
        for blob in blobs:
            vec = self._load(blob)
            try:
                parts.append(np.asarray(vec.decrypt(), dtype=np.float64))
            except Exception:
                raise DecryptionError("an aggregate chunk does not decrypt") from None
        return np.concatenate(parts) if parts else np.zeros(0)

    def _scalar(self, blob: bytes) -> float:
        vec = self._load(blob)
        if vec.size() != 1:
            raise ProtocolError(f"a statistic must be a rotate-and-summed scalar, got {vec.size()} slots")
        try:
            return float(vec.decrypt()[0])
        except Exception:
            raise DecryptionError("a statistic does not decrypt") from None

    def decrypt_gram(
        self,
        client_ids: Sequence[int],
        inner: Mapping[tuple[int, int], bytes],
        reference: Sequence[bytes | None] | None = None,
        reference_sq_norm: float | None = None,
    ) -> Gram:
        """Decrypt the encrypted statistics into a ``Gram``.

        Parameters
        ----------
        client_ids:
            The clients the rows refer to, in order.
        inner:
            ``(i, j) -> scalar ciphertext`` of <u_i, u_j> for every ``i <= j`` (positions).
        reference:
            Scalar ciphertexts of <u_i, r>, one per client (an entry is None where the server
            knows the product is exactly 0), or None for no reference.
        reference_sq_norm:
            ||r||^2, computed by the server in the clear (it knows r).
        """
        n = len(client_ids)
        expected = {(i, j) for i in range(n) for j in range(i, n)}
        if set(inner) != expected:
            raise ProtocolError("the encrypted Gram must hold exactly the pairs i <= j")
        mat = torch.zeros((n, n), dtype=torch.float64)
        for (i, j), blob in inner.items():
            mat[i, j] = mat[j, i] = self._scalar(blob)
        ref = None
        ref_sq: float | None = None
        if reference is not None:
            if len(reference) != n:
                raise ProtocolError("one reference inner product per client expected")
            ref = torch.tensor([0.0 if b is None else self._scalar(b) for b in reference], dtype=torch.float64)
            if reference_sq_norm is None or not math.isfinite(reference_sq_norm):
                raise ProtocolError("reference inner products need the reference's squared norm")
            ref_sq = float(reference_sq_norm)
        return Gram(tuple(int(c) for c in client_ids), mat, ref, ref_sq)

    def __repr__(self) -> str:
        return (
            f"CKKSKeyHolder(preset={self.preset.name!r}, min_contributors={self.min_contributors}, "
            f"fingerprint={self.fingerprint.hex()})"
        )
