"""The plaintext protocol as two halves over bytes (the contract of ``securefml.protocols.halves``).

One stage, ``"update"``: the server sends each cohort member the public round plan (round and
layout fingerprint), the client checks it was built for the same model and answers with its
update in the plaintext wire format (``PlaintextCodec.encode``); the server decodes each reply
with every check of ``PlaintextCodec.decode`` and reveals every accepted update.

>>> import torch
>>> from securefml.protocols.halves import simulate
>>> from securefml.rounds import ClientUpdate
>>> from securefml.updates import LayerLayout
>>> layout = LayerLayout([("w", (2,))])
>>> server = PlaintextServerHalf(0, layout, cohort=(1, 2))
>>> clients = {c: PlaintextClientHalf(ClientUpdate(c, torch.full((2,), float(c)), ("w",)), layout, round_idx=0)
...            for c in (1, 2)}
>>> simulate(server, clients).client_ids
(1, 2)
"""

from __future__ import annotations

from collections.abc import Sequence

from securefml.errors import ConfigError, InvalidUpdateError, ProtocolError, ReplayError
from securefml.protocols.halves import ClientHalf, ServerHalf, StageMessages
from securefml.protocols.plaintext_codec import PlaintextCodec
from securefml.protocols.wire import Envelope, decode, encode
from securefml.reveals import RevealedUpdates
from securefml.rounds import ClientUpdate
from securefml.updates import LayerLayout

__all__ = ["PlaintextClientHalf", "PlaintextServerHalf", "PLAN_KIND", "STAGE"]

PLAN_KIND = "plain-plan"
STAGE = "update"
SERVER = 0xFFFFFFFF  # the sender id the server signs its plan envelopes with
_MAX_PLAN_BYTES = 4096


def _plan_bytes(round_idx: int, layout: LayerLayout) -> bytes:
    return encode(Envelope(PLAN_KIND, round_idx, SERVER, {"layout": layout.fingerprint()}))


class PlaintextServerHalf(ServerHalf):
    """Collects each cohort member's plaintext update; reveals them all (``Reveals.UPDATES``)."""

    def __init__(self, round_idx: int, layout: LayerLayout, cohort: Sequence[int]) -> None:
        if len(set(cohort)) != len(cohort):
            raise ConfigError("client ids in one round must be distinct")
        self.round_idx = round_idx
        self.layout = layout
        self.cohort = tuple(sorted(cohort))
        self._codec = PlaintextCodec()
        self._opened = False
        self._received: dict[int, ClientUpdate] = {}
        self._rejected: dict[int, str] = {}

    def next_stage(self) -> StageMessages | None:
        if self._opened:
            return None
        self._opened = True
        plan = _plan_bytes(self.round_idx, self.layout)
        return StageMessages(STAGE, dict.fromkeys(self.cohort, plan))

    def receive(self, party: int, data: bytes) -> None:
        if party not in self.cohort:
            raise ReplayError("sender is not in this round's cohort", sender=party)
        if party in self._received:
            raise ReplayError("duplicate message in this round", sender=party)
        self._received[party] = self._codec.decode(self.round_idx, party, data, self.layout)

    def reject(self, party: int, error: ProtocolError | InvalidUpdateError) -> None:
        self._received.pop(party, None)
        self._rejected[party] = f"{type(error).__name__}: {error}"

    def close_stage(self) -> None:
        """Nothing to settle: plaintext has no threshold."""

    def revealed(self) -> RevealedUpdates:
        got = [self._received[c] for c in sorted(self._received)]
        return RevealedUpdates(
            client_ids=tuple(u.client_id for u in got),
            vectors=tuple(u.vector for u in got),
            layer_sets=tuple(u.layers for u in got),
            weights=tuple(float(u.weight) for u in got),
            rejected=dict(self._rejected),
        )


class PlaintextClientHalf(ClientHalf):
    """Answers the plan with the client's update, after checking the plan fits its model."""

    def __init__(self, update: ClientUpdate, layout: LayerLayout, *, round_idx: int) -> None:
        self.party = update.client_id
        self.update = update
        self.layout = layout
        self.round_idx = round_idx
        self._codec = PlaintextCodec()

    def respond(self, stage: str, message: bytes) -> bytes:
        if stage != STAGE:
            raise ProtocolError(f"plaintext has one stage ({STAGE!r}), the server opened {stage!r}", sender=SERVER)
        plan = decode(message, sender=SERVER, max_bytes=_MAX_PLAN_BYTES)
        plan.expect(kind=PLAN_KIND, round=self.round_idx, sender=SERVER)
        if plan.field("layout") != self.layout.fingerprint():
            raise ProtocolError("the round plan is for another model layout", sender=SERVER)
        return self._codec.encode(self.round_idx, self.update, self.layout)
