"""A client's masked input computed by several threads, bit for bit what one thread computes.

Why threads and not processes.  The masked input is ``FixedPoint.encode`` (stochastic rounding
keyed by AES-256-CTR) plus ``k + 1`` AES-256-CTR masks, all added mod ``2**bits``: at L = 1e6 and
k = 15 that is 17 keystreams of 4L bytes, about 12 ms of one core, the floor of a SecAgg+ round
(issue 15).  ``cryptography``'s ``update_into`` releases the GIL while OpenSSL runs (measured in
``benchmarks/secagg.py``, ``gil``: a Python thread keeps running during one 512 MiB call), and
numpy's ufuncs release it too, so threads in one process share the work with no copy of the
vector and no serialization; a process pool would have to ship each 4 MB vector both ways.

How the work splits.  CTR mode is random access: the keystream word ``i`` of a seed is the
keystream of the same key with the initial counter block ``i * itemsize / 16``.  The vector is cut
into contiguous ranges that start on a chunk boundary (a multiple of the 16-byte block); each
thread quantizes and masks its range with every stream started at that counter, so the result
equals the sequential ``run_mask_job`` word for word when the rounding seed is the same
(``tests/unit/test_secagg_masking.py``).  The last range also carries the weight coordinate.

How many threads.  ``mask_workers`` picks them from the work (entries times streams) and the
CPUs this process may use: one (no thread at all) below ``MIN_WORDS_PER_WORKER`` words of
keystream per worker, so small vectors never pay the hand-off.

Threat model: unchanged.  The same seeds, the same words, the same message; the threads live
in the client's own process and see nothing the client does not already hold.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from securefml.errors import ConfigError, InvalidUpdateError
from securefml.protocols.halves import available_cpus, reply_cpus
from securefml.protocols.prg import SEED_BYTES, new_seed
from securefml.protocols.quantize import FixedPoint, RoundingScratch, round_chunk
from securefml.protocols.secagg_client import MaskJob
from securefml.protocols.secagg_messages import KIND, Stage
from securefml.protocols.wire import Envelope, encode

__all__ = ["MIN_WORDS_PER_WORKER", "MaskTimes", "available_cpus", "mask_workers", "run_mask_job_threaded", "unmask_sum"]

CHUNK = 1 << 15  # entries per step: one step's keystream (128 KiB of uint32) stays in L2 while it is added
MIN_WORDS_PER_WORKER = 1 << 22  # ~4M keystream words (~3 ms of one core) before a second thread pays off
_CODES = {2: b"u2", 4: b"u4"}

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_local = threading.local()  # per-thread scratch buffers (fresh 4 MB buffers cost page faults)


def mask_workers(entries: int, streams: int, *, cpus: int | None = None) -> int:
    """Threads for one masked input of ``entries`` words and ``streams`` keystreams (1 = none).

    At most one per CPU (``halves.reply_cpus``: this reply's share when the driver already runs
    several replies at once), one per ``CHUNK`` of entries, and one per ``MIN_WORDS_PER_WORKER``
    keystream words (the rounding stream counts as one more), so more workers are only used
    when each has enough work to cover its hand-off.
    """
    cpus = reply_cpus() if cpus is None else cpus
    words = entries * (streams + 1)
    return max(1, min(cpus, -(-entries // CHUNK), words // MIN_WORDS_PER_WORKER))


def _forget_pool_in_child() -> None:
    """A forked child has none of the parent's threads: its first masked input makes a new pool."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _executor(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < size:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="secagg-mask")
            _pool_size = size
        return _pool


def _ctr(seed: bytes, word: int, item: int):  # noqa: ANN202 - cryptography's context type is private
    """The AES-256-CTR keystream of ``seed`` from word ``word`` on (``word * item`` bytes in)."""
    if len(seed) != SEED_BYTES:
        raise ConfigError(f"a mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
    offset = word * item
    if offset % 16:
        raise ConfigError("a keystream range must start on a 16-byte block")
    return Cipher(algorithms.AES(seed), modes.CTR((offset // 16).to_bytes(16, "big"))).encryptor()


@dataclass(frozen=True)
class MaskTimes:
    """CPU seconds each thread spent on one masked input (``time.thread_time``), range by range.

    ``max(per_range)`` is the input's critical path on idle cores; ``sum(per_range)`` its total
    cost.  Both are CPU times, so they stay interpretable on a loaded machine.
    """

    per_range: tuple[float, ...]
    clipped_entries: int = 0  # entries of the input outside [-clip, clip] (the masked input's own count)


@dataclass
class _Range:
    start: int
    stop: int
    last: bool


def _scratch(name: str, size: int, dtype: np.dtype | type) -> np.ndarray:
    key = (name, size, np.dtype(dtype).str)
    buf = cast("dict[tuple[str, int, str], np.ndarray]", getattr(_local, "bufs", None))
    if buf is None:
        buf = _local.bufs = {}
    arr = buf.get(key)
    if arr is None:
        arr = buf[key] = np.empty(size, dtype=dtype)
    return arr


def _rounding_scratch() -> RoundingScratch:
    scratch = cast("RoundingScratch | None", getattr(_local, "rounding", None))
    if scratch is None:
        scratch = _local.rounding = RoundingScratch(CHUNK)
    return scratch


def _quantize_and_mask(job: MaskJob, rounding_seed: bytes, part: _Range, out: np.ndarray,
                       noise: np.ndarray | None) -> tuple[float, int]:
    """Entries ``[part.start, part.stop)`` of the masked input (and the weight word if ``part.last``).

    Returns the thread's CPU seconds and how many entries of the range were clipped.  The
    rounding is ``quantize.round_chunk``, the kernel of ``FixedPoint.encode`` (four numpy passes
    per chunk), started at the range's counter of the rounding stream; then every mask stream
    is added to the chunk while it is in cache.
    """
    c0 = time.thread_time()
    fp: FixedPoint = job.fixed_point
    dt = fp.dtype
    item = dt.itemsize
    x = job.vector
    w = min(float(job.weight), fp.max_weight)
    factor, hi = fp.rounding_factors(w)
    lim = fp.clip
    rnd_enc = _ctr(rounding_seed, part.start, 4)  # 32 random bits per entry, as FixedPoint.encode
    streams: list[tuple[Callable[..., object], np.ufunc]] = [(_ctr(s, part.start, item).update_into, np.add)
                                                             for s in job.plus]
    streams += [(_ctr(s, part.start, item).update_into, np.subtract) for s in job.minus]
    scratch = _rounding_scratch()
    zeros = scratch.zeros
    ks = _scratch("ks", CHUNK * item + 16, np.uint8)
    ksw = ks[: CHUNK * item].view(dt)
    signed = out.view(np.int16 if item == 2 else np.int32)
    clipped = 0
    for start in range(part.start, part.stop, CHUNK):
        stop = min(start + CHUNK, part.stop)
        m = stop - start
        clipped += round_chunk(x[start:stop], factor, hi, lim, rnd_enc.update_into, scratch, signed[start:stop],
                               sender=job.client_id)
        sub = out[start:stop]
        if noise is not None:
            sub += noise[start:stop]
        nb = m * item
        src = zeros[:nb]
        words = ksw[:m]
        for update_into, op in streams:
            update_into(src, ks)
            op(sub, words, out=sub)
    if part.last:
        sub = out[-1:]
        sub[:] = int(round(w * fp.weight_scale)) & fp.mask
        if noise is not None:
            sub += noise[-1:]
        for update_into, op in streams:
            update_into(zeros[:item], ks)
            op(sub, ksw[:1], out=sub)
    if fp.bits != 8 * item:
        region = out[part.start : part.stop + (1 if part.last else 0)]
        region &= fp.dtype.type(fp.mask)
    return time.thread_time() - c0, clipped


def _ranges(entries: int, workers: int) -> list[_Range]:
    chunks = -(-entries // CHUNK)
    per = -(-chunks // workers)
    bounds = list(range(0, entries, per * CHUNK)) + [entries]
    if entries == 0:
        bounds = [0, 0]
    return [_Range(a, b, i == len(bounds) - 2) for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))]


def run_mask_job_threaded(
    job: MaskJob, workers: int | None = None, *, rounding_seed: bytes | None = None,
    times: list[MaskTimes] | None = None,
) -> bytes:
    """The stage-3 message of ``job``: quantize, add every mask mod 2^bits, encode; on ``workers`` threads.

    Parameters
    ----------
    job:
        The client's mask job (``SecAggClient.prepare_masked``).
    workers:
        Threads to use (the calling thread is one of them); None picks them with
        ``mask_workers``.  1 runs everything in the calling thread.
    rounding_seed:
        Key of the stochastic rounding (a fresh one by default; given only by tests, to compare
        against ``FixedPoint.encode(..., seed=...)``).
    times:
        If given, one ``MaskTimes`` is appended (the CPU time of each range).

    Raises
    ------
    InvalidUpdateError
        A non-positive or non-finite weight (before any work), or a NaN/Inf entry.
    """
    fp = job.fixed_point
    if not np.isfinite(job.weight) or job.weight <= 0:
        raise InvalidUpdateError(f"weight must be positive and finite, got {job.weight}", sender=job.client_id)
    x = np.ascontiguousarray(np.asarray(job.vector).reshape(-1))
    job = MaskJob(x, job.weight, fp, job.plus, job.minus, job.client_id, job.round_idx, job.fields, job.ring_noise)
    item = fp.dtype.itemsize
    n = x.size
    if workers is None:
        workers = mask_workers(n, len(job.plus) + len(job.minus))
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    noise = None
    if job.ring_noise is not None:
        if job.ring_noise.shape != (n + 1,):
            raise ConfigError(f"ring noise must have {n + 1} entries, got {job.ring_noise.shape}")
        noise = job.ring_noise.astype(fp.dtype)
    raw = _scratch("raw", 4 + item * (n + 1), np.uint8)  # reused: ``encode`` copies it into the message
    raw[2:4] = np.frombuffer(_CODES[item], dtype=np.uint8)
    out = raw[4:].view(fp.dtype)
    seed = rounding_seed or new_seed()
    parts = _ranges(n, workers)
    futures: list[Future[tuple[float, int]]] = []
    if len(parts) > 1:
        pool = _executor(len(parts) - 1)
        futures = [pool.submit(_quantize_and_mask, job, seed, p, out, noise) for p in parts[1:]]
    try:
        first = _quantize_and_mask(job, seed, parts[0], out, noise)
    except BaseException:
        for f in futures:  # no range may still write into the buffer once this call returns
            f.exception()
        raise
    done = [first, *(f.result() for f in futures)]  # re-raises a range's error
    if times is not None:
        times.append(MaskTimes(tuple(c for c, _ in done), sum(k for _, k in done)))
    if sys.byteorder != "little":  # pragma: no cover - the wire is little-endian
        out.byteswap(inplace=True)
    fields = dict(job.fields)
    # a zero-copy view, which ``encode`` writes as is; numpy declares the buffer protocol only for 3.12+
    fields["vector"] = cast(bytes, memoryview(raw)[2:])  # type: ignore[arg-type]
    return encode(Envelope(KIND[Stage.MASKED], job.round_idx, job.client_id, fields))


def _sum_range(vectors: Sequence[np.ndarray], plus: Sequence[bytes], minus: Sequence[bytes], total: np.ndarray,
               start: int, stop: int) -> float:
    c0 = time.thread_time()
    dt = total.dtype
    item = dt.itemsize
    streams: list[tuple[Callable[..., object], np.ufunc]] = [(_ctr(s, start, item).update_into, np.add)
                                                             for s in plus]
    streams += [(_ctr(s, start, item).update_into, np.subtract) for s in minus]
    zeros = memoryview(bytes(CHUNK * item))
    ks = _scratch("ks", CHUNK * item + 16, np.uint8)
    ksw = ks[: CHUNK * item].view(dt)
    for a in range(start, stop, CHUNK):
        b = min(a + CHUNK, stop)
        sub = total[a:b]
        for v in vectors:  # the chunk stays in cache across the clients and the masks
            np.add(sub, v[a:b], out=sub)
        src = zeros[: (b - a) * item]
        words = ksw[: b - a]
        for update_into, op in streams:
            update_into(src, ks)
            op(sub, words, out=sub)
    return time.thread_time() - c0


def unmask_sum(
    vectors: Sequence[np.ndarray], plus: Sequence[bytes] = (), minus: Sequence[bytes] = (), *,
    workers: int | None = None, times: list[MaskTimes] | None = None,
) -> np.ndarray:
    """The server's ``sum(vectors) + masks(plus) - masks(minus)`` mod 2^w, over ``workers`` threads.

    Equal word for word to ``np.add`` over the vectors followed by ``prg.apply_masks(total,
    plus, minus)`` (tested); each thread owns a contiguous range of entries and sums it chunk
    by chunk, so a chunk is read from memory once per vector and stays in cache while every
    mask is added.  ``workers`` None picks them with ``mask_workers`` (vectors and masks both
    count as streams).
    """
    if not vectors:
        raise ConfigError("nothing to sum")
    n = vectors[0].size
    dt = vectors[0].dtype
    if dt.kind != "u" or any(v.shape != (n,) or v.dtype != dt for v in vectors):
        raise ConfigError("the vectors of a sum must be 1-D unsigned arrays of one length and dtype")
    total = np.zeros(n, dtype=dt)
    if workers is None:
        workers = mask_workers(n, len(vectors) // 4 + len(plus) + len(minus))  # a vector add costs ~1/4 of a stream
    parts = _ranges(n, max(1, workers))
    futures: list[Future[float]] = []
    if len(parts) > 1:
        pool = _executor(len(parts) - 1)
        futures = [pool.submit(_sum_range, vectors, plus, minus, total, p.start, p.stop) for p in parts[1:]]
    try:
        first = _sum_range(vectors, plus, minus, total, parts[0].start, parts[0].stop)
    except BaseException:
        for f in futures:
            f.exception()
        raise
    rest = [f.result() for f in futures]
    if times is not None:
        times.append(MaskTimes((first, *rest)))
    return total
