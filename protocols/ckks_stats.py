"""Dense packing of selected layers into CKKS slots, and server-side homomorphic statistics.

Packing
-------
A ``PackingFrame`` is the public list of layers a round packs (the union of the layers the
clients announced).  The frame's entries are concatenated in layout order and cut into
chunks of ``slots`` entries; a client encrypts only the chunks that hold one of *its* layers,
with zeros in the slots of frame layers it did not select.  When every client uploads the
same layers (a server-dictated plan) the frame is exactly those layers, so each client sends
``ceil(d / slots)`` ciphertexts: the fewest possible.  Every chunk is zero-padded to
``slots`` entries (the last one included): it costs no bytes and keeps chunks aligned.
Chunks line up across clients, so the server can add them slot by slot and still count each
layer only over the clients that sent it.

Encrypted statistics
--------------------
An inner product of two chunked vectors is sum_k sum_slots(a_k * b_k).  The naive way
rotate-and-sums every chunk product (log2(slots) rotations each); here the key holder first
multiply-accumulates over the chunks (one ciphertext multiply and one addition per chunk) and
rotate-and-sums once per pair.  Through SEAL's evaluator (``ckks_lazy``) the chunk products
of a pair are summed before they are relinearized, once per pair instead of once per chunk.
Rotations dominate a dot product (about 15 ms of 18 ms at
n = 8192), so this is what makes the Gram of N clients affordable: N(N+1)/2 rotate-and-sums
instead of N(N+1)/2 * chunks.

Error bounds (n = 8192, scale 2^40, |entries| <= B, checked by the property tests)
-----------------------------------------------------------------------------------
* a sum of m fresh ciphertexts: absolute error per slot <= m * 2^-20 * (1 + B);
* an inner product of two d-entry vectors: absolute error <= 2^-18 * (1 + B)^2 * (d + slots).
These are loose versions of the usual CKKS noise estimates (fresh noise around 2^-25 of the
scale; relinearization/rescale and log2(slots) rotations add a few bits).

Resolution floor (``zero_floor``)
---------------------------------
CKKS decryption is approximate everywhere, also where the plaintext is exactly 0.  Measured on
real TenSEAL ciphertexts (n = 8192, scale 2^40; ``benchmarks/robustness_ckks_diagnosis.py
--part noise``, 24,576 zero entries per row), the decrypted sum of m uploads carries noise of
standard deviation about ``1.2e-9 * sqrt(m)`` per slot (2.5e-9 / 3.5e-9 / 5.0e-9 at m = 4 / 8 /
16), the same on the mean path and on the key holder's coefficient-weighted sum of a robust
round; its tails are heavier than a Gaussian's (the largest magnitude is 6.6-8.9 standard
deviations, at most 4.1e-8).  Plaintext aggregation and SecAgg are exact on an entry that is 0
in every upload (SecAgg's stochastic rounding maps 0 to 0); under CKKS that entry decodes to
noise, and a scale-free consumer (the server's Adam, whose step is ``m / (sqrt(v) + eps)`` with
eps 1e-8) turns noise of 1e-9..1e-8 into a step of a sizeable fraction of its learning rate.

``apply_zero_floor`` therefore sets every decoded entry with ``|x| < tau`` to exactly 0.  The
default ``tau = default_zero_floor(scale_bits) = 2^(17 - scale_bits)`` (2^-23 ~ 1.19e-7 at scale
2^40) is 24-48 noise standard deviations for m = 4..16 and 2.9-7.1 times the largest noise
measured, while it is 2^-3 of the smallest error bound the protocol already documents
(``sum_error_bound(1, 0) = 2^-20``).  Guarantees, for any tau >= 0 (0 disables the floor):

* an entry whose decoded value has ``|x| >= tau`` is returned unchanged (bit for bit);
* every entry stays within the documented error bound plus tau of its plaintext value (a
  floored entry moved by ``|x| < tau``), so the reported ``error_bound`` includes tau;
* an entry that is 0 in every upload decodes to exactly 0 whenever its noise is below tau:
  in every measured case (m <= 16, both paths) with a margin of 2.9x or more.  The noise grows as
  ``sqrt(m)``, so the margin shrinks to about 1 near m ~ 150 uploads: raise tau there.  This is
  a measurement, not a proven tail bound (the tails are not Gaussian).

The cost, stated as measured: a true aggregate entry with ``0 < |x| < tau`` is set to 0 (within
the bound, but a scale-free optimizer amplifies that as it amplifies noise); after one round of
digits-fewshot FOMAML 22 of 8,645 entries are such (``docs/robustness.md``).  CKKS at this scale
does not resolve those entries either way (their decoded value is their value plus noise of
comparable size).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from securefml.errors import ConfigError, MalformedMessageError, ProtocolError
from securefml.protocols.ckks_lazy import lazy_available, lazy_inner_products
from securefml.protocols.wire import Envelope, decode, encode
from securefml.updates import LayerLayout

#: wire kind of a packing frame, and the sender id it carries (the server's)
FRAME_KIND = "ckks-frame"
_SERVER = 0xFFFFFFFF
_FRAME_SLOTS = struct.Struct(">I")
_MAX_FRAME_BYTES = 1 << 20

__all__ = [
    "PackingFrame",
    "sum_error_bound",
    "default_zero_floor",
    "check_zero_floor",
    "apply_zero_floor",
    "inner_product_error_bound",
    "encrypted_inner_products",
    "encrypted_reference_products",
    "weighted_sum",
    "naive_inner_product",
]


def sum_error_bound(n_summands: int, max_abs: float) -> float:
    """Documented per-slot absolute error of a decrypted sum of ``n_summands`` fresh ciphertexts."""
    return max(1, n_summands) * 2.0**-20 * (1.0 + max_abs)


def default_zero_floor(scale_bits: int) -> float:
    """The default resolution floor for a CKKS scale of ``2**scale_bits``: ``2**(17 - scale_bits)``.

    The decryption noise of a fresh ciphertext is a fixed multiple of ``2**-scale_bits`` at a
    given ring dimension (measured about 1.2e-9 ~ 2^-29.6 at scale 2^40, n = 8192), so a floor
    2^17 units above the encoding's resolution is about 100 of those standard deviations at any
    scale (24-48 for sums of 4-16 uploads); see the module docstring for the measurement, the
    guarantee and its cost.
    """
    return 2.0 ** (17 - int(scale_bits))


def check_zero_floor(tau: float) -> float:
    """``tau`` as a float if it is a usable floor (finite, >= 0), else ``ConfigError`` naming it."""
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise ConfigError(f"zero_floor must be a number, got {tau!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"zero_floor must be finite and >= 0 (0 disables it), got {tau!r}")
    return value


def apply_zero_floor(values: np.ndarray, tau: float) -> np.ndarray:
    """Decoded CKKS values with every entry of magnitude below ``tau`` set to exactly 0 (a copy).

    Entries with ``|x| >= tau`` are returned bit-for-bit; ``tau = 0`` returns an unchanged copy.
    Why and what it guarantees: the module docstring (*Resolution floor*).
    """
    out = np.array(values, dtype=np.float64, copy=True)
    if tau > 0:
        out[np.abs(out) < tau] = 0.0
    return out


def inner_product_error_bound(d: int, max_abs: float, *, slots: int = 4096) -> float:
    """Documented absolute error of a decrypted encrypted inner product of two d-entry vectors."""
    return 2.0**-18 * (1.0 + max_abs) ** 2 * (d + slots)


@dataclass(frozen=True)
class PackingFrame:
    """The public packing of a round: which layers, in which slots.

    Parameters
    ----------
    layout:
        The model's layer layout.
    layers:
        The frame layers (any order; stored in layout order).
    slots:
        Slots per ciphertext (``poly_modulus_degree / 2``).
    """

    layout: LayerLayout
    layers: tuple[str, ...]
    slots: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", self.layout.canonical(self.layers))
        if self.slots < 1:
            raise ConfigError(f"slots must be positive, got {self.slots}")
        spans: dict[str, tuple[int, int]] = {}
        pos = 0
        for name in self.layers:
            size = self.layout.layer(name).numel
            spans[name] = (pos, pos + size)
            pos += size
        object.__setattr__(self, "_spans", spans)
        object.__setattr__(self, "_numel", pos)
        layout_fp = self.layout.fingerprint()
        h = hashlib.sha256(layout_fp)
        h.update(str(self.slots).encode() + b"\x00" + "\n".join(self.layers).encode())
        object.__setattr__(self, "_layout_fp", layout_fp)
        object.__setattr__(self, "_fp", h.digest()[:16])

    @property
    def numel(self) -> int:
        return self._numel  # type: ignore[attr-defined]

    @property
    def spans(self) -> Mapping[str, tuple[int, int]]:
        """Where each frame layer sits in the packed frame vector."""
        return self._spans  # type: ignore[attr-defined]

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.numel / self.slots)

    def chunk_len(self, k: int) -> int:
        return min(self.slots, self.numel - k * self.slots)

    def chunk_range(self, k: int) -> tuple[int, int]:
        return k * self.slots, k * self.slots + self.chunk_len(k)

    def chunks_for(self, layers: Iterable[str]) -> tuple[int, ...]:
        """The chunks a client with these (frame) layers sends: those overlapping one of them."""
        out: set[int] = set()
        for name in layers:
            a, b = self.spans[name]
            if b > a:
                out.update(range(a // self.slots, (b - 1) // self.slots + 1))
        return tuple(sorted(out))

    def layers_in_chunk(self, k: int) -> tuple[str, ...]:
        lo, hi = self.chunk_range(k)
        return tuple(n for n, (a, b) in self.spans.items() if a < hi and b > lo)

    def fingerprint(self) -> bytes:
        """16 bytes naming the layout, the slot count and the frame layers."""
        return self._fp  # type: ignore[attr-defined]

    @property
    def layout_fingerprint(self) -> bytes:
        return self._layout_fp  # type: ignore[attr-defined]

    # -- bytes form (for a client on another device) --------------------------------------------
    def to_bytes(self, round_idx: int = 0) -> bytes:
        """The frame as one versioned ``wire`` message for ``round_idx``.

        It carries the layer names, the slot count and the layout's fingerprint, not the layout:
        a remote client rebuilds the frame over its own model's layout (``from_bytes``), and a
        frame made for another model is refused there.  The frame is public.
        """
        if any("\n" in name for name in self.layers):
            raise ConfigError("layer names must not contain newlines")
        fields = {
            "layout": bytes(self.layout_fingerprint),
            "layers": "\n".join(self.layers).encode("utf-8"),
            "slots": _FRAME_SLOTS.pack(self.slots),
            "frame": self.fingerprint(),
        }
        return encode(Envelope(FRAME_KIND, round_idx, _SERVER, fields))

    @classmethod
    def from_bytes(cls, data: bytes, layout: LayerLayout, *, round_idx: int | None = None) -> PackingFrame:
        """Decode ``to_bytes`` output over the client's own ``layout``.

        Raises ``MalformedMessageError`` for bytes that are not a frame, ``ReplayError`` for a frame
        of another round (when ``round_idx`` is given), and ``ProtocolError`` for a frame built for
        another model or whose fingerprint does not match its content.
        """
        env = decode(data, sender=_SERVER, max_bytes=_MAX_FRAME_BYTES)
        env.expect(kind=FRAME_KIND, round=env.round if round_idx is None else round_idx, sender=_SERVER)
        if env.field("layout") != layout.fingerprint():
            raise ProtocolError("the packing frame was built for another model layout", sender=_SERVER)
        raw_slots = env.field("slots")
        if len(raw_slots) != _FRAME_SLOTS.size:
            raise MalformedMessageError("frame slot field has the wrong length", sender=_SERVER)
        try:
            names = env.field("layers").decode("utf-8")
            frame = cls(layout, tuple(names.split("\n")) if names else (), _FRAME_SLOTS.unpack(raw_slots)[0])
        except (UnicodeDecodeError, ValueError, KeyError) as exc:
            raise MalformedMessageError(f"bad packing frame: {exc}", sender=_SERVER) from None
        if frame.fingerprint() != env.field("frame"):
            raise ProtocolError("the packing frame's fingerprint does not match its content", sender=_SERVER)
        return frame

    def pack(self, vector: np.ndarray, layers: Sequence[str]) -> dict[int, np.ndarray]:
        """Place a client's selected-layers vector (layout order) into its frame chunks."""
        chosen = self.layout.canonical(layers)
        missing = [n for n in chosen if n not in self.spans]
        if missing:
            raise ConfigError(f"layers {missing} are not in this round's packing frame")
        frame = np.zeros(self.numel, dtype=np.float64)
        pos = 0
        for name in chosen:
            a, b = self.spans[name]
            frame[a:b] = vector[pos : pos + (b - a)]
            pos += b - a
        if pos != vector.size:
            raise ConfigError(f"vector has {vector.size} entries, layers {chosen} have {pos}")
        return {k: self._padded(frame, k) for k in self.chunks_for(chosen)}

    def _padded(self, frame_vector: np.ndarray, k: int) -> np.ndarray:
        # Every chunk fills all slots (zeros past the frame's end): a ciphertext costs the same
        # bytes whatever its length, and equal lengths let chunks be multiplied and accumulated.
        out = np.zeros(self.slots, dtype=np.float64)
        lo, hi = self.chunk_range(k)
        out[: hi - lo] = frame_vector[lo:hi]
        return out

    def chunk_arrays(self, frame_vector: np.ndarray) -> list[np.ndarray]:
        """Cut a full frame vector into its (zero-padded, ``slots``-long) chunks."""
        return [self._padded(frame_vector, k) for k in range(self.n_chunks)]


def encrypted_inner_products(
    chunks: Sequence[Sequence[ts.CKKSVector]], *, lazy: bool | None = None,
    blobs: Sequence[Sequence[bytes]] | None = None,
) -> dict[tuple[int, int], ts.CKKSVector]:
    """<u_i, u_j> for all i <= j: multiply-accumulate over chunks, one rotate-and-sum per pair.

    ``chunks[i]`` is client i's list of chunk ciphertexts (all clients aligned).  Needs a
    context with relinearization and Galois keys; returns size-1 (summed) ciphertexts.

    ``lazy`` (default: whenever SEAL's evaluator is importable and there are two chunks or
    more) sums each pair's chunk products before relinearizing them once
    (``ckks_lazy.lazy_inner_products``: same values within CKKS error, same level and
    headroom); ``False`` keeps TenSEAL's vectors, which relinearize every product.  ``blobs``
    (the bytes each chunk was loaded from) spare the lazy path a re-serialization of every chunk.
    """
    n = len(chunks)
    if n and len({len(c) for c in chunks}) != 1:
        raise ConfigError("encrypted inner products need every client to send the same chunks")
    if lazy is None:
        lazy = lazy_available() and n > 0 and len(chunks[0]) >= 2
    if lazy:
        return lazy_inner_products(chunks, blobs=blobs)
    out: dict[tuple[int, int], ts.CKKSVector] = {}
    for i in range(n):
        for j in range(i, n):
            acc = None
            for a, b in zip(chunks[i], chunks[j]):
                prod = a.square() if i == j else a * b
                if acc is None:
                    acc = prod
                else:
                    acc.add_(prod)
            if acc is None:
                raise ConfigError("cannot take an inner product of empty vectors")
            out[(i, j)] = _rotate_sum(acc)
    return out


def _rotate_sum(acc: ts.CKKSVector) -> ts.CKKSVector:
    return acc.sum()


def encrypted_reference_products(
    chunks: Sequence[Sequence[ts.CKKSVector]], reference_chunks: Sequence[np.ndarray]
) -> list[ts.CKKSVector | None]:
    """<u_i, r> for a plaintext reference r (chunked like the updates): one rotate-and-sum each.

    A chunk where r is (numerically) zero is skipped: multiplying by an all-zero plaintext
    would give a transparent ciphertext.  An entry is None when r is zero on every chunk, i.e.
    the inner product is exactly 0 and nothing needs decrypting.
    """
    live = [k for k, r in enumerate(reference_chunks) if np.max(np.abs(r), initial=0.0) > 1e-12]
    out: list[ts.CKKSVector | None] = []
    for cts in chunks:
        if len(cts) != len(reference_chunks):
            raise ConfigError("the reference must be chunked like the updates")
        acc = None
        for k in live:
            prod = cts[k].mul(reference_chunks[k].tolist())
            if acc is None:
                acc = prod
            else:
                acc.add_(prod)
        out.append(None if acc is None else _rotate_sum(acc))
    return out


def weighted_sum(
    chunks: Sequence[Sequence[ts.CKKSVector]], coefficients: Sequence[float], *, tol: float = 1e-9
) -> tuple[list[ts.CKKSVector] | None, int]:
    """sum_i c_i * u_i, chunk by chunk, with the coefficients as plaintext scalars.

    Coefficients with ``|c_i| <= tol`` are skipped (CKKS cannot encode a scalar that rounds to
    zero at the scale without producing a transparent ciphertext; their contribution would be
    below the encryption noise anyway).  Returns the chunk ciphertexts (None if every
    coefficient was skipped) and how many clients entered the sum.
    """
    acc: list[ts.CKKSVector] | None = None
    used = 0
    for cts, c in zip(chunks, coefficients):
        if abs(c) <= tol:
            continue
        used += 1
        scaled = [ct * float(c) for ct in cts]
        if acc is None:
            acc = scaled
        else:
            for a, s in zip(acc, scaled):
                a.add_(s)
    return acc, used


def naive_inner_product(a: Sequence[ts.CKKSVector], b: Sequence[ts.CKKSVector]) -> ts.CKKSVector:
    """The baseline the benchmark compares with: a rotate-and-summed dot product per chunk."""
    acc = None
    for x, y in zip(a, b):
        d = x.dot(y)
        acc = d if acc is None else acc + d
    if acc is None:
        raise ConfigError("cannot take an inner product of empty vectors")
    return acc
