"""What ``securefml_mod`` needs of a protocol and of a node that hosts a protocol service party.

Two small structural types (``typing.Protocol``), in a module of their own so that the client
mod, the half-state codec and the CKKS parties can all name them without importing each other.
"""

from __future__ import annotations

from typing import Protocol

from flwr.app import Context

from securefml.protocols.halves import ClientHalf
from securefml.rounds import ClientUpdate
from securefml.updates import LayerLayout

__all__ = ["ClientHalves", "ServiceHost"]


class ClientHalves(Protocol):
    """What the client side needs of a protocol: its client half (an ``AggregationProtocol`` has it)."""

    def client_half(self, round_idx: int, layout: LayerLayout, update: ClientUpdate) -> ClientHalf: ...


class ServiceHost(Protocol):
    """A node that may host a protocol's service party (e.g. ``CKKSDeployment``, the CKKS key holder)."""

    def service_party(self, context: Context) -> int | None:
        """The service party this node is (what it announces instead of a client id), or ``None``."""
        ...

    def service_half(self, context: Context, round_idx: int, party: int, layout: LayerLayout) -> ClientHalf | None:
        """The half answering messages addressed to ``party`` on this node, or ``None`` if it hosts none.

        A host whose party keeps state across messages (the key holder's ledger of what it
        decrypted) restores it here from ``context.state``.
        """
        ...

    def save_state(self, context: Context) -> None:
        """Write the service party's state into ``context.state`` after it answered (a fresh process
        per message must find it there)."""
        ...
