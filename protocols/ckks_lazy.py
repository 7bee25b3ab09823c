"""Encrypted inner products with one relinearization per pair, through SEAL's evaluator.

Why a module of its own
-----------------------
The Gram the key holder computes (``ckks_stats.encrypted_inner_products``) is, per pair of
clients, ``sum_k a_k * b_k`` over the chunks followed by one rotate-and-sum.  Through TenSEAL's
vectors every chunk product is relinearized (a key switch) and rescaled on its own: TenSEAL has
no ``relinearize`` of its own, and its rotate-and-sum refuses the size-3 ciphertext an
unrelinearized product is.  Relinearization is linear in the product's third component, so the
chunk products of a pair can be summed first and relinearized once: ``chunks - 1`` key switches
and rescales fewer per pair, the same value.  SEAL's evaluator, shipped in the TenSEAL wheel as
``tenseal.sealapi``, exposes exactly those operations (multiply without relinearization,
rescale, relinearize, rotations).

Its classes are module-local (no object crosses between the two bindings) and its loaders read
files, so the ciphertexts and the *public* evaluation keys (relinearization and Galois keys) go
across as SEAL's own serialization through a private temporary directory that is removed when
the computation ends.  The secret key never leaves TenSEAL: the results come back as TenSEAL
vectors of the caller's context, and the caller decrypts them as before.  The directory is in memory (``/dev/shm``)
where the system has it, and the ciphertexts are read from the bytes the caller loaded each
vector from when it passes them (``blobs``): re-serializing a loaded vector costs about as much
as loading it (issue 15).

What it computes, and what it does not change
---------------------------------------------
The same values as the TenSEAL path, within CKKS error (tested against it and against the
exact Gram): each pair's result is a size-1 vector whose slots all hold ``<u_i, u_j>`` after
``log2(slots)`` rotations, so nothing but the entry is ever decrypted (no partial sums sit in
other slots).  The key holder's policy checks run before any of this and are untouched.  When
``tenseal.sealapi`` is missing, ``lazy_available`` says so and the caller keeps the TenSEAL path.

One level lower, for the key holder
-----------------------------------
Rotations dominate a pair once its products are summed, and a rotation (a key switch) costs
about half as much one level lower (measured: ``benchmarks/ckks.py``, ``gram.primitives``).
The ``stats`` preset has one level to spare after the product, but at that level the modulus
holds values below about 2**19 at scale 2**40, where the product's level holds 2**59: an
honest pair of large updates would wrap around.  So with a context that holds the secret key
(the key holder's), the squared norms ``||u_i||^2`` are computed first at the product's level
(full headroom) and decrypted, and each other pair gets a power-of-two factor ``c`` with
``c * sqrt(||u_i||^2 ||u_j||^2) <= 2**16`` (``low_level_factor``).  By Cauchy-Schwarz every
partial sum the rotations form, and the entry itself, is at most that in absolute value, so
nothing wraps; the pair is multiplied by the constant 1 encoded at ``c`` times its scale,
rescaled, relinearized and rotated at the lower level, and decrypts to ``<u_i, u_j>`` within
``ckks_stats.inner_product_error_bound`` (tested for norms from 2**-8 to 2**12 per entry).
A pair whose factor would fall below 2**-10 (``sqrt(||u_i||^2 ||u_j||^2) > 2**26``) stays at
the product's level.  The key holder decrypts the norms a little earlier than before; they are
entries of the Gram it returns.

What a client beyond the honest range can do: entries large enough that its squared norm wraps
the product's level (``MAX_ABS`` and ``d <= 2**27`` keep honest clients below it) already give
it an arbitrary decrypted norm today; now its factor, and so its own off-diagonal entries, can
be garbage as well.  The pairs of two other clients use only their own norms: their entries are
unaffected (tested with hypothesis, entries up to 2**44).
"""

from __future__ import annotations

import logging
import math
import os
import struct
import tempfile
from collections.abc import Sequence

import tenseal as ts

from securefml.errors import ConfigError

log = logging.getLogger(__name__)

try:  # shipped with TenSEAL's wheel; absent from some builds
    import tenseal.sealapi as _sa
except ImportError:  # pragma: no cover - depends on the TenSEAL build
    _sa = None

__all__ = ["lazy_inner_products", "lazy_available", "low_level_factor"]

_F64 = struct.Struct("<d")


def lazy_available() -> bool:
    """Whether SEAL's evaluator is importable beside TenSEAL."""
    return _sa is not None


# -- the few protobuf fields TenSEAL's messages carry (proto3 wire format) ----------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if pos >= len(buf):
            raise ConfigError("truncated protobuf varint")
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, pos
        shift += 7


def _fields(buf: bytes) -> dict[int, list[bytes]]:
    """Length-delimited fields by number (other wire types are skipped)."""
    out: dict[int, list[bytes]] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        num, wt = tag >> 3, tag & 7
        if wt == 0:
            _, pos = _varint(buf, pos)
        elif wt == 1:
            pos += 8
        elif wt == 5:
            pos += 4
        elif wt == 2:
            n, pos = _varint(buf, pos)
            out.setdefault(num, []).append(buf[pos : pos + n])
            pos += n
        else:
            raise ConfigError(f"unsupported protobuf wire type {wt}")
    return out


def _enc_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _vector_proto(seal_ct: bytes, scale: float) -> bytes:
    """A one-slot ``CKKSVectorProto`` (sizes=[1], one ciphertext, scale)."""
    sizes = _enc_varint(1)
    return (
        b"\x0a" + _enc_varint(len(sizes)) + sizes
        + b"\x12" + _enc_varint(len(seal_ct)) + seal_ct
        + b"\x19" + _F64.pack(scale)
    )


class _Engine:
    """SEAL objects for one TenSEAL context: parameters, evaluator, public evaluation keys.

    Built once per context (about 0.8 s: the Galois keys are tens of MB) and cached; the key
    files live only while they are loaded.
    """

    def __init__(self, context: ts.Context) -> None:
        if _sa is None:  # pragma: no cover
            raise ConfigError("tenseal.sealapi is not available")
        proto = _fields(
            context.serialize(
                save_public_key=False, save_secret_key=False, save_galois_keys=True, save_relin_keys=True
            )
        )
        public = _fields(proto[2][0]) if 2 in proto else {}
        if 1 not in proto or 4 not in public or 5 not in public:
            raise ConfigError("the context carries no relinearization or Galois keys")
        with tempfile.TemporaryDirectory(prefix="securefml-keys-", dir=_scratch_dir()) as keydir:
            parms = _sa.EncryptionParameters(_sa.SCHEME_TYPE.CKKS)
            parms.load(_write(keydir, "parms", proto[1][0]))
            self.ctx = _sa.SEALContext(parms, True, _sa.SEC_LEVEL_TYPE.TC128)
            self.relin = _sa.RelinKeys()
            self.relin.load(self.ctx, _write(keydir, "relin", public[4][0]))
            self.galois = _sa.GaloisKeys()
            self.galois.load(self.ctx, _write(keydir, "galois", public[5][0]))
        self.ev = _sa.Evaluator(self.ctx)
        self.encoder = _sa.CKKSEncoder(self.ctx)
        self.slots = parms.poly_modulus_degree() // 2

    def load(self, vec: ts.CKKSVector, workdir: str, blob: bytes | None = None) -> object:
        """SEAL's ciphertext of ``vec``; from ``blob``, the TenSEAL bytes ``vec`` was loaded from, if given.

        Re-serializing a loaded vector costs about as much as loading it (SEAL compresses what it
        saves); the bytes it came from hold the same SEAL ciphertext, and SEAL's loader is
        deterministic, so the caller that loaded (and checked) ``vec`` from ``blob`` may pass it.
        """
        cts = _fields(vec.serialize() if blob is None else blob).get(2, [])
        if len(cts) != 1:
            raise ConfigError("a chunk must be one ciphertext")
        ct = _sa.Ciphertext()
        ct.load(self.ctx, _write(workdir, "ct", cts[0]))
        return ct

    def dump(self, ct: object, workdir: str) -> bytes:
        path = os.path.join(workdir, "out")
        ct.save(path)  # type: ignore[attr-defined]
        with open(path, "rb") as fh:
            return fh.read()

    def pair(
        self, xs: Sequence[object], ys: Sequence[object] | None, factor: float | None = None
    ) -> object:
        """sum_k x_k * y_k (``ys`` None: squares), one rescale, one relinearization, rotate-and-sum.

        With ``factor`` c, the sum is first multiplied by the constant 1 encoded at c times the
        ciphertext's scale and rescaled once more: the payload is c * value at the lowest level,
        declared at c times the scale, so it decrypts to the value; relinearization and the
        rotations then run at that level (about half the cost; see the module docstring for
        the headroom this needs).
        """
        ev = self.ev
        acc = None
        for k, x in enumerate(xs):
            prod = _sa.Ciphertext()
            if ys is None:
                ev.square(x, prod)
            else:
                ev.multiply(x, ys[k], prod)
            if acc is None:
                acc = prod
            else:
                ev.add_inplace(acc, prod)
        if acc is None:
            raise ConfigError("cannot take an inner product of empty vectors")
        ev.rescale_to_next_inplace(acc)
        if factor is not None:
            one = _sa.Plaintext()
            self.encoder.encode(1.0, acc.parms_id(), acc.scale * factor, one)
            ev.multiply_plain_inplace(acc, one)
            ev.rescale_to_next_inplace(acc)
        ev.relinearize_inplace(acc, self.relin)
        tmp = _sa.Ciphertext()
        step = self.slots // 2
        while step >= 1:  # TenSEAL's sum_vector order: strides slots/2 ... 1
            ev.rotate_vector(acc, step, self.galois, tmp)
            ev.add_inplace(acc, tmp)
            step //= 2
        return acc


def _scratch_dir() -> str | None:
    """Where the bridge's temporary files go: memory (``/dev/shm``) when this system has it.

    The files are SEAL serializations of ciphertexts and of the public evaluation keys (never
    the secret key), in a private directory (mode 0700) removed when the computation ends.  On a
    disk-backed ``/tmp`` each 0.4 MB write blocked for about 5 ms here (0.6 ms in memory).
    """
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


def _write(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


# (the context's native object, its engine): the native object is held so its id stays unique
_ENGINES: list[tuple[object, _Engine]] = []
_MAX_ENGINES = 2


def _engine_for(context: ts.Context) -> _Engine:
    native = context.data
    for held, eng in _ENGINES:
        if held is native:
            return eng
    eng = _Engine(context)
    _ENGINES.insert(0, (native, eng))
    del _ENGINES[_MAX_ENGINES:]
    return eng


#: target bound of |c * <u_i, u_j>| at the lowest level (its modulus holds values below 2**19)
_LOW_LEVEL_BOUND = 2.0**16
#: the factors c the lowest level uses; a pair that would need a smaller one stays one level up
_MIN_FACTOR, _MAX_FACTOR = 2.0**-10, 2.0**10


def low_level_factor(sq_norm_i: float, sq_norm_j: float) -> float | None:
    """The power-of-two factor c for pair (i, j) at the lowest level, or None to stay a level up.

    By Cauchy-Schwarz every partial sum the rotations form, and the inner product itself, is at
    most ``sqrt(||u_i||^2 ||u_j||^2)`` in absolute value; the decrypted squared norms are
    widened by 2**-10 relative plus 2**-10 absolute (far above their CKKS error) before the
    bound is taken, and c keeps ``c * bound <= 2**16``, eight times inside the lowest level's
    headroom.
    """
    a, b = abs(sq_norm_i), abs(sq_norm_j)
    if not (math.isfinite(a) and math.isfinite(b)):
        return None
    bound = math.sqrt(a * (1 + 2.0**-10) + 2.0**-10) * math.sqrt(b * (1 + 2.0**-10) + 2.0**-10)
    if not math.isfinite(bound) or bound > _LOW_LEVEL_BOUND / _MIN_FACTOR:
        return None
    c = 2.0 ** math.floor(math.log2(_LOW_LEVEL_BOUND / bound))
    if c < _MIN_FACTOR:
        return None
    return min(c, _MAX_FACTOR)


def lazy_inner_products(
    chunks: Sequence[Sequence[ts.CKKSVector]], *, low_level: bool = True,
    blobs: Sequence[Sequence[bytes]] | None = None,
) -> dict[tuple[int, int], ts.CKKSVector]:
    """<u_i, u_j> for all i <= j with one relinearization per pair (see the module docstring).

    Same contract as ``ckks_stats.encrypted_inner_products``: ``chunks[i]`` is client i's list
    of full-slot chunk ciphertexts under one context with relinearization and Galois keys;
    returns size-1 TenSEAL vectors of that context.

    With ``low_level`` and a context holding the secret key (the key holder's), the squared
    norms are computed and decrypted first, and every other pair runs its relinearization and
    rotations one level lower with the factor ``low_level_factor`` picks from the two norms.

    ``blobs[i][k]``, when given, are the TenSEAL bytes ``chunks[i][k]`` was loaded from (the
    key holder's signed uploads): SEAL's ciphertexts are read from them instead of from a
    re-serialization of each vector (same ciphertexts; see ``_Engine.load``).

    Raises
    ------
    ConfigError
        Unequal chunk lists, empty vectors, or a context whose keys cannot be carried over.
    """
    n = len(chunks)
    if n and len({len(c) for c in chunks}) != 1:
        raise ConfigError("encrypted inner products need every client to send the same chunks")
    if not n:
        return {}
    if not chunks[0]:
        raise ConfigError("cannot take an inner product of empty vectors")
    context = chunks[0][0].context()
    scale = float(context.global_scale)
    eng = _engine_for(context)
    private = context.is_private()
    if blobs is not None and [len(b) for b in blobs] != [len(c) for c in chunks]:
        raise ConfigError("blobs must match the chunks one to one")
    with tempfile.TemporaryDirectory(prefix="securefml-gram-", dir=_scratch_dir()) as workdir:
        loaded = [[eng.load(v, workdir, None if blobs is None else blobs[i][k]) for k, v in enumerate(row)]
                  for i, row in enumerate(chunks)]

        def back(ct: object) -> ts.CKKSVector:
            return ts.ckks_vector_from(context, _vector_proto(eng.dump(ct, workdir), scale))

        out: dict[tuple[int, int], ts.CKKSVector] = {}
        for i in range(n):
            out[(i, i)] = back(eng.pair(loaded[i], None))
        norms = [float(out[(i, i)].decrypt()[0]) for i in range(n)] if private and low_level else None
        for i in range(n):
            for j in range(i + 1, n):
                c = None if norms is None else low_level_factor(norms[i], norms[j])
                out[(i, j)] = back(eng.pair(loaded[i], loaded[j], c))
    log.debug("lazy Gram of %d clients x %d chunks", n, len(chunks[0]))
    return out
