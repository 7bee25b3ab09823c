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
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

from securefml.errors import InvalidUpdateError, ProtocolError
from securefml.reveals import Revealed, RoundStats
from securefml.rounds import Transport

__all__ = ["ClientHalf", "RoundStats", "ServerHalf", "StageMessages", "Transcript", "simulate"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageMessages:
    """One stage as the server half opens it: its name and the bytes it sends each party."""

    stage: str
    messages: Mapping[int, bytes]


@dataclass
class Transcript:
    """What the driver observed: bytes each way, and who stopped or was rejected where."""

    bytes_to_server: int = 0
    bytes_to_clients: int = 0
    dropped: dict[int, str] = field(default_factory=dict)  # party -> stage it stopped answering at
    client_errors: dict[int, str] = field(default_factory=dict)  # party -> why the client itself stopped
    rejected: dict[int, str] = field(default_factory=dict)  # party -> why the server refused its message


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


def simulate(
    server: ServerHalf,
    clients: Mapping[int, ClientHalf],
    *,
    transport: Transport | None = None,
    transcript: Transcript | None = None,
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

    Returns
    -------
    Revealed
        The server half's typed output for the aggregation step.
    """
    transport = transport or Transport()
    seen = transcript if transcript is not None else Transcript()
    stopped: set[int] = set()
    while (opened := server.next_stage()) is not None:
        for party, message in sorted(opened.messages.items()):
            if party in stopped:
                continue
            seen.bytes_to_clients += len(message)
            half = clients.get(party)
            if half is None:
                stopped.add(party)
                seen.dropped[party] = opened.stage
                continue
            try:
                reply = half.respond(opened.stage, message)
            except (ProtocolError, InvalidUpdateError) as exc:
                log.warning("client %s stopped at %s: %s", party, opened.stage, exc)
                stopped.add(party)
                seen.client_errors[party] = f"{type(exc).__name__}: {exc}"
                continue
            delivered = transport.deliver(party, opened.stage, reply)
            if delivered is None:
                stopped.add(party)
                seen.dropped[party] = opened.stage
                continue
            seen.bytes_to_server += len(delivered)
            try:
                server.receive(party, delivered)
            except (ProtocolError, InvalidUpdateError) as exc:
                log.warning("rejected %s at %s: %s", party, opened.stage, exc)
                server.reject(party, exc)
                stopped.add(party)
                seen.rejected[party] = f"{type(exc).__name__}: {exc}"
        server.close_stage()
    return server.revealed()
