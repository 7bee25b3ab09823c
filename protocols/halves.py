"""The contract every protocol's two halves keep, and one generic driver over it.

A deployment runs each half in its own place: the client half on the client's device, the
server half in the aggregator (and, for CKKS, a key-holder half elsewhere).  They exchange only
``bytes``.  The contract is small on purpose, so the same halves run in one process
(``simulate``), over pipes between processes (see ``tests/integration/test_halves_processes.py``)
or over a user's own transport:

- ``ServerHalf.next_stage()`` returns the next stage name and the message the server sends each
  party for it (the first message carries the public round plan as bytes), or ``None`` when the
  round is over;
- each ``ClientHalf.respond(stage, message)`` answers with bytes (or raises a
  ``ProtocolError`` when it catches the server deviating: that client stops, exactly as a
  dropout);
- ``ServerHalf.receive(party, data)`` takes each reply (a bad one raises a typed
  ``ProtocolError`` naming the sender; the driver records the rejection with
  ``ServerHalf.reject`` and the round goes on), ``ServerHalf.close_stage()`` ends the stage;
- ``ServerHalf.revealed()`` returns what the protocol reveals, a typed value from
  ``securefml.reveals``; one aggregation step outside the protocols
  (``securefml.aggregation.aggregate``) runs the defense on it;
- ``ServerHalf.stats`` (optional) is what the server half measured, a typed value with
  ``to_dict()`` (``RoundStats``) that the round record keeps.

A reply that never comes (``Transport.deliver`` returns ``None``) is a dropout: the server half
is simply not given that party's message, as over a real network.

Concurrent replies (issue 15).  ``simulate`` may compute the replies of one stage on a pool of
threads: only the replies whose half says so (``ClientHalf.concurrent(stage)``: its work is
large and spent mostly in calls that release the GIL, such as OpenSSL's AES-CTR and numpy's
ufuncs), only when at least two such replies are due, and on at most ``workers`` threads (by
default the CPUs this process may use, ``available_cpus``).  Everything else keeps its order:
the transport delivers and the server half receives every reply in increasing party order, on
the calling thread, exactly as the sequential loop does, so the round's outcome (messages,
rejections, dropouts, the revealed value) is the sequential one whatever the thread count
(tested with hypothesis in ``tests/property/test_halves_concurrent.py``).  A client half run in
the pool sees ``reply_cpus()`` (its share of the CPUs) so that it does not start threads of its
own on top of the pool's.  Threads, not processes: a process pool would serialize every
message both ways, and the halves' state stays where it is.  The driver keeps no reply once it
is delivered (its future is dropped then, not at the end of the stage): a server half that keeps
only what it needs of a large reply lets its memory be reused by the next one (SecAgg+'s masked
vectors, ``secagg_buffers``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from securefml.errors import ConfigError, InvalidUpdateError, ProtocolError
from securefml.reveals import Revealed, RoundStats
from securefml.rounds import Transport

__all__ = [
    "ClientHalf", "RoundStats", "ServerHalf", "StageMessages", "StageTimes", "Transcript", "available_cpus",
    "reply_cpus", "simulate",
]

log = logging.getLogger(__name__)

_reply = threading.local()  # the CPU share of a reply computed on the driver's pool


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def reply_cpus() -> int:
    """CPUs the reply being computed on this thread may use.

    ``available_cpus()`` outside the driver's pool; inside it, the process's CPUs divided among
    the pool's threads (at least 1), so that a half which threads its own work (SecAgg+'s
    masking) does not oversubscribe the cores the pool already shares out.
    """
    share = getattr(_reply, "cpus", None)
    return available_cpus() if share is None else int(share)


@dataclass(frozen=True)
class StageMessages:
    """One stage as the server half opens it: its name and the bytes it sends each party."""

    stage: str
    messages: Mapping[int, bytes]


@dataclass(frozen=True)
class StageTimes:
    """What one stage cost in the driver's process (public to whoever runs the driver).

    ``busiest_thread_cpu_s`` is the CPU time of the stage's busiest thread: the driver's own
    thread, or the pool thread that computed the most (each of its replies' ``thread_time``).
    ``max(cpu_s / cpus, busiest_thread_cpu_s)`` is a lower bound of the stage's wall time on
    ``cpus`` idle cores, and stays meaningful when other load on the machine inflates ``wall_s``.
    """

    stage: str
    wall_s: float
    cpu_s: float  # process CPU time (every thread)
    busiest_thread_cpu_s: float
    pool_threads: int  # 0: every reply on the driver's thread


@dataclass
class Transcript:
    """What the driver observed: bytes each way, who stopped or was rejected where, stage costs."""

    bytes_to_server: int = 0
    bytes_to_clients: int = 0
    dropped: dict[int, str] = field(default_factory=dict)  # party -> stage it stopped answering at
    client_errors: dict[int, str] = field(default_factory=dict)  # party -> why the client itself stopped
    rejected: dict[int, str] = field(default_factory=dict)  # party -> why the server refused its message
    stages: list[StageTimes] = field(default_factory=list)


class ClientHalf(ABC):
    """A party's half of a protocol: answers each server message with bytes."""

    party: int

    @abstractmethod
    def respond(self, stage: str, message: bytes) -> bytes:
        """The reply to the server's ``message`` at ``stage``.

        Raises
        ------
        ProtocolError
            When the message shows the server deviating (the client stops; nothing is sent).
        """

    def concurrent(self, stage: str) -> bool:
        """Whether ``simulate`` may compute this half's reply to ``stage`` on a pool thread.

        True only for work that is large and spent mostly outside the GIL (so threads overlap
        it) and that touches nothing but this half's own state.  The default is ``False``: the
        reply is computed on the driver's thread, in party order.
        """
        return False


class ServerHalf(ABC):
    """The aggregator's half: opens stages, consumes replies, reveals a typed value."""

    @abstractmethod
    def next_stage(self) -> StageMessages | None:
        """Open the next stage (``None`` when the round is over)."""

    @abstractmethod
    def receive(self, party: int, data: bytes) -> None:
        """Take one reply of the open stage; raise a ``ProtocolError`` naming ``party`` if bad."""

    @abstractmethod
    def reject(self, party: int, error: ProtocolError | InvalidUpdateError) -> None:
        """Exclude ``party`` for the rest of the round (its reply failed ``receive`` with ``error``)."""

    @abstractmethod
    def close_stage(self) -> None:
        """End the open stage (may raise ``ProtocolAbort`` when too few parties are left)."""

    @abstractmethod
    def revealed(self) -> Revealed:
        """What the protocol reveals once the last stage closed."""

    @property
    def stats(self) -> RoundStats | None:
        """What this half measured in the round (public to the server); none by default."""
        return None


_Outcome = tuple[bytes | None, ProtocolError | InvalidUpdateError | None]


def _concurrent(half: ClientHalf, stage: str) -> bool:
    """``half.concurrent(stage)``; a duck-typed half without the method answers on the driver's thread."""
    ask = getattr(half, "concurrent", None)
    return bool(ask(stage)) if callable(ask) else False


def _respond(half: ClientHalf, stage: str, message: bytes) -> _Outcome:
    """One reply, or the typed error that stopped the client (any other exception propagates)."""
    try:
        return half.respond(stage, message), None
    except (ProtocolError, InvalidUpdateError) as exc:
        return None, exc


def _respond_on_pool(half: ClientHalf, stage: str, message: bytes, cpus: int,
                     spent: dict[int, float]) -> _Outcome:
    _reply.cpus = cpus
    c0 = time.thread_time()
    try:
        return _respond(half, stage, message)
    finally:
        _reply.cpus = None
        me = threading.get_ident()
        spent[me] = spent.get(me, 0.0) + time.thread_time() - c0  # one key per pool thread: no race


def simulate(
    server: ServerHalf,
    clients: Mapping[int, ClientHalf],
    *,
    transport: Transport | None = None,
    transcript: Transcript | None = None,
    workers: int | None = None,
) -> Revealed:
    """Run one round of any protocol's halves in this process; every message crosses as bytes.

    Parameters
    ----------
    server:
        The server half (holds the round's plan).
    clients:
        Party id -> client half.  A party the server addresses that is missing here is a dropout.
    transport:
        Carries each reply to the server (drops, tampering and replays are injected there).
    transcript:
        Filled with byte counts, dropouts, client-side stops and rejections, if given.
    workers:
        Threads that may compute one stage's replies at once (``ClientHalf.concurrent``);
        None: ``available_cpus()``; 1: every reply on the calling thread.  The outcome is the
        same for any count; delivery and ``server.receive`` stay in party order on this thread.

    Returns
    -------
    Revealed
        The server half's typed output for the aggregation step.

    Raises
    ------
    ConfigError
        ``workers < 1``.
    """
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    threads = available_cpus() if workers is None else workers
    transport = transport or Transport()
    seen = transcript if transcript is not None else Transcript()
    stopped: set[int] = set()
    while True:
        t0, c0, d0 = time.perf_counter(), time.process_time(), time.thread_time()
        opened = server.next_stage()
        if opened is None:
            break
        stage = opened.stage
        due: list[tuple[int, bytes, ClientHalf]] = []
        for party, message in sorted(opened.messages.items()):
            if party in stopped:
                continue
            seen.bytes_to_clients += len(message)
            half = clients.get(party)
            if half is None:
                stopped.add(party)
                seen.dropped[party] = stage
                continue
            due.append((party, message, half))
        pooled = [d for d in due if _concurrent(d[2], stage)] if threads > 1 else []
        size = min(threads, len(pooled))
        futures: dict[int, Future[_Outcome]] = {}
        spent: dict[int, float] = {}
        pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="halves-reply") if size > 1 else None
        try:
            if pool is not None:
                share = max(1, available_cpus() // size)
                futures = {p: pool.submit(_respond_on_pool, h, stage, m, share, spent) for p, m, h in pooled}
            for party, message, half in due:
                fut = futures.pop(party, None)  # the reply is not kept past its delivery
                reply, err = fut.result() if fut is not None else _respond(half, stage, message)
                _take(server, transport, seen, stopped, stage, party, reply, err)
        finally:
            if pool is not None:
                for fut in futures.values():
                    fut.cancel()
                pool.shutdown(wait=True)  # no reply may still run once the stage is over
        server.close_stage()
        seen.stages.append(StageTimes(stage, time.perf_counter() - t0, time.process_time() - c0,
                                      max([time.thread_time() - d0, *spent.values()]), size if size > 1 else 0))
    return server.revealed()


def _take(server: ServerHalf, transport: Transport, seen: Transcript, stopped: set[int], stage: str, party: int,
          reply: bytes | None, err: ProtocolError | InvalidUpdateError | None) -> None:
    """Deliver one reply (or record why there is none) and hand it to the server half."""
    if err is not None or reply is None:
        log.warning("client %s stopped at %s: %s", party, stage, err)
        stopped.add(party)
        seen.client_errors[party] = f"{type(err).__name__}: {err}"
        return
    delivered = transport.deliver(party, stage, reply)
    if delivered is None:
        stopped.add(party)
        seen.dropped[party] = stage
        return
    seen.bytes_to_server += len(delivered)
    try:
        server.receive(party, delivered)
    except (ProtocolError, InvalidUpdateError) as exc:
        log.warning("rejected %s at %s: %s", party, stage, exc)
        server.reject(party, exc)
        stopped.add(party)
        seen.rejected[party] = f"{type(exc).__name__}: {exc}"
