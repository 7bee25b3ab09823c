"""Warm buffers for the masked vectors a SecAgg+ server holds until the unmask stage.

Why.  A server holds every contributor's masked vector from the masked stage to the unmask
stage: at N=100 and L=1e6, 400 MB.  Held as the messages themselves, each message is fresh
memory: the client's ``bytes.join`` faults in about a thousand new 4 KiB pages per 4 MB message,
measured at 1-2.5 ms per message here, more than a mask stream costs (``docs/performance.md``,
"Where it stands").  So ``SecAggServer.receive_masked`` copies the vector, once every check has
passed, into a buffer of this pool (memory already faulted in by an earlier round) and keeps
no reference to the message; the driver drops the message after delivering it, so the next
client's message reuses its memory, and ``SecAggServer.finish`` gives the buffers back after the
unmask.  The copy is ~0.3 ms per 4 MB of warm memory, on the driver's thread.

What it does not change.  The server still holds every accepted vector until the stage closes,
so a client that the mask-list check rejects at the close is taken out of the sum exactly as
before (its vector is simply not summed); the values summed are the same words.

Threat model: the buffers live in the server's own process and hold only what the server was
sent.  A buffer is handed out again only after ``give``; its previous contents are overwritten
by the copy before anything reads it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np

__all__ = ["VectorPool", "POOL"]


class VectorPool:
    """A thread-safe free list of 1-D numpy buffers, keyed by length and dtype.

    Parameters
    ----------
    max_bytes:
        Most bytes the pool keeps between rounds; buffers given back beyond it are dropped
        (freed).  The default, 1 GiB, holds a round of N=250 vectors of 1e6 uint32 words.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._free: dict[tuple[int, str], list[np.ndarray]] = {}
        self._bytes = 0

    @property
    def held_bytes(self) -> int:
        """Bytes currently kept for reuse."""
        return self._bytes

    def take(self, size: int, dtype: np.dtype) -> np.ndarray:
        """A buffer of ``size`` entries of ``dtype`` (contents undefined): a reused one if any."""
        key = (size, np.dtype(dtype).str)
        with self._lock:
            free = self._free.get(key)
            if free:
                buf = free.pop()
                self._bytes -= buf.nbytes
                return buf
        return np.empty(size, dtype=dtype)

    def give(self, buffers: Iterable[np.ndarray]) -> None:
        """Return buffers for reuse; the caller must not touch them afterwards."""
        with self._lock:
            for buf in buffers:
                if buf.ndim != 1 or not buf.flags.c_contiguous or not buf.flags.owndata or buf.size == 0:
                    continue  # only whole buffers this pool could have handed out
                if self._bytes + buf.nbytes > self.max_bytes:
                    continue
                self._free.setdefault((buf.size, buf.dtype.str), []).append(buf)
                self._bytes += buf.nbytes

    def clear(self) -> None:
        """Drop every kept buffer (their memory goes back to the allocator)."""
        with self._lock:
            self._free.clear()
            self._bytes = 0


#: the pool every ``SecAggServer`` of this process uses
POOL = VectorPool()
