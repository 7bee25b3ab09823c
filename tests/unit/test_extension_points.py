"""Adding a protocol or an attack is one file: both defined here, outside the package, and run.

The toy protocol is a "trusted summer": clients send plaintext updates, the server half reveals
only their weighted sum (``Reveals.SUM``), so coordinate-wise rules are refused and the mean
runs through the one aggregation step.  It is registered in ``PROTOCOLS`` and a whole experiment
runs on it with a toy attack registered in ``ATTACKS``; nothing in the library is edited.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch

from securefml.attacks import ATTACKS
from securefml.attacks.base import Attack, AttackContext
from securefml.errors import ConfigError, InvalidUpdateError, ProtocolError, ReplayError
from securefml.experiment import RunConfig, run_experiment
from securefml.protocols import PROTOCOLS
from securefml.protocols.base import AggregationProtocol, HalvesSetup
from securefml.protocols.halves import ClientHalf, ServerHalf, StageMessages
from securefml.protocols.plaintext_codec import PlaintextCodec
from securefml.reveals import RevealedSums, Reveals
from securefml.rounds import ClientUpdate
from securefml.updates import LayerLayout

STAGE = "upload"


class SumServer(ServerHalf):
    """Decodes each plaintext update and keeps only the running weighted sum."""

    def __init__(self, round_idx: int, layout: LayerLayout, cohort: Sequence[int]) -> None:
        self.round_idx, self.layout, self.cohort = round_idx, layout, tuple(sorted(cohort))
        self.codec = PlaintextCodec()
        self.opened = False
        self.total: torch.Tensor | None = None
        self.weight = 0.0
        self.layers: tuple[str, ...] | None = None
        self.contributors: list[int] = []
        self.rejected: dict[int, str] = {}

    def next_stage(self) -> StageMessages | None:
        if self.opened:
            return None
        self.opened = True
        return StageMessages(STAGE, dict.fromkeys(self.cohort, self.round_idx.to_bytes(4, "big")))

    def receive(self, party: int, data: bytes) -> None:
        if party in self.contributors:
            raise ReplayError("duplicate message", sender=party)
        upd = self.codec.decode(self.round_idx, party, data, self.layout)
        if self.layers is not None and upd.layers != self.layers:
            raise ProtocolError("every client must send the same layers", sender=party)
        self.layers = upd.layers
        term = upd.weight * upd.vector.to(torch.float64)
        self.total = term if self.total is None else self.total + term
        self.weight += upd.weight
        self.contributors.append(party)

    def reject(self, party: int, error: ProtocolError | InvalidUpdateError) -> None:
        self.rejected[party] = f"{type(error).__name__}: {error}"

    def close_stage(self) -> None:
        """No threshold."""

    def revealed(self) -> RevealedSums:
        sums = () if self.total is None else (self.total,)
        return RevealedSums(Reveals.SUM, self.layers or (), sums, (self.weight,) if sums else (),
                            (tuple(sorted(self.contributors)),) if sums else (), 0.0, self.rejected)


class SumClient(ClientHalf):
    def __init__(self, round_idx: int, layout: LayerLayout, update: ClientUpdate) -> None:
        self.party, self.round_idx, self.layout, self.update = update.client_id, round_idx, layout, update

    def respond(self, stage: str, message: bytes) -> bytes:
        if stage != STAGE or int.from_bytes(message, "big") != self.round_idx:
            raise ProtocolError("unexpected stage or round", sender=None)
        return PlaintextCodec().encode(self.round_idx, self.update, self.layout)


class TrustedSum(AggregationProtocol):
    """A toy protocol: the server sees only the weighted sum (a stand-in for a trusted summer)."""

    name = "toy-sum"
    reveals = Reveals.SUM

    def server_half(self, round_idx: int, layout: LayerLayout, cohort: Sequence[int], *,
                    setup: HalvesSetup) -> ServerHalf:
        return SumServer(round_idx, layout, cohort)

    def client_half(self, round_idx: int, layout: LayerLayout, update: ClientUpdate) -> ClientHalf:
        return SumClient(round_idx, layout, update)


class Zero(Attack):
    """A toy attack: the malicious clients send zeros and say so."""

    name = "toy-zero"

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        context.attack_info[self.name] = {"rows": int(own.shape[0])}
        return torch.zeros_like(own)


@pytest.fixture(scope="module", autouse=True)
def _registered() -> Iterator[None]:
    """Registered for this module's tests only (the support page lists what is registered)."""
    PROTOCOLS.register("toy-sum")(TrustedSum)
    ATTACKS.register("toy-zero")(Zero)
    yield
    PROTOCOLS.unregister("toy-sum")
    ATTACKS.unregister("toy-zero")


def test_a_protocol_and_an_attack_from_outside_run_a_whole_experiment() -> None:
    config = RunConfig(dataset="sine", algorithm="fomaml", rounds=2, clients_per_round=4, protocol="toy-sum",
                       attack="toy-zero", malicious=0.25, seed=0)
    result = run_experiment(config)
    rounds = result.history
    assert len(rounds) == 2 and all(r["accepted"] for r in rounds)
    assert all(r["bytes_uploaded"] > 0 for r in rounds)
    for r in rounds:  # whenever a malicious client was drawn, the toy attack acted and said so
        if r["malicious"]:
            info = r["extras"]["adversary"]["attack_info"]["toy-zero"]
            assert info["rows"] == len(r["malicious"])
    assert '"toy-sum"' in result.to_json()


def test_the_toy_protocol_refuses_rules_it_cannot_serve_before_work() -> None:
    config = RunConfig(dataset="sine", algorithm="fomaml", rounds=1, clients_per_round=4, protocol="toy-sum",
                       defense="median")
    with pytest.raises(ConfigError, match="cannot run under protocol 'toy-sum'"):
        run_experiment(config)
