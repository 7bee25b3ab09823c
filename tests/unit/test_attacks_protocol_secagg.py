"""Protocol attacks against SecAgg+ (real X25519, AES-GCM sealed shares, Shamir, AES-CTR masks).

An attack at the advertise, share, complaints or masked stage is rejected with a typed error
naming the sender, and the revealed sum is the honest clients' (within the fixed-point bound).  An attack
on the unmask message is rejected too; the attacker's masked input, already committed, stays
in the sum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

from securefml import errors
from securefml.attacks import (
    Drop,
    Duplicate,
    Malformed,
    Oversize,
    Replay,
    Tamper,
    TamperingTransport,
    Truncate,
    WrongRound,
    WrongSender,
)
from securefml.defenses import Mean
from securefml.errors import MalformedMessageError, ProtocolAbort, ProtocolError, ReplayError
from securefml.protocols import ClientUpdate
from securefml.protocols.base import Transport
from securefml.protocols.secagg import SecAggPlus
from securefml.protocols.secagg_messages import pack_ids
from securefml.protocols.wire import decode, encode
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("a.weight", (3, 2)), ("a.bias", (3,)), ("b.weight", (4,))])
N, ATTACKERS = 12, (1, 4)

Factory = Callable[[list[int], str], TamperingTransport]
ATTACKS: dict[str, tuple[Factory, type[Exception], int]] = {
    "truncate": (lambda s, st: Truncate(s, keep=0.6, stage=st), MalformedMessageError, 0),
    "oversize": (lambda s, st: Oversize(s, extra=70_000, stage=st), MalformedMessageError, 0),
    "garbage": (lambda s, st: Malformed(s, stage=st), MalformedMessageError, 0),
    "bad-version": (lambda s, st: Malformed(s, mode="version", stage=st), MalformedMessageError, 0),
    "replay": (lambda s, st: Replay(s, stage=st), ReplayError, 1),
    "wrong-sender": (lambda s, st: WrongSender(s, stage=st), ReplayError, 0),
    "wrong-round": (lambda s, st: WrongRound(s, stage=st), ReplayError, 0),
    "duplicate-copy": (lambda s, st: Duplicate(s, source=0, stage=st), ReplayError, 0),
    "duplicate-frame": (lambda s, st: Duplicate(s, stage=st), MalformedMessageError, 0),
}


def make_updates(seed: int) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [ClientUpdate(i, 0.5 * torch.rand(LAYOUT.numel, generator=g) - 0.25, ("a", "b")) for i in range(N)]


def protocol() -> SecAggPlus:
    return SecAggPlus(dropout_fraction=0.3)


def run(updates: list[ClientUpdate], transport: TamperingTransport | None, warmup: int):
    proto = protocol()
    for r in range(warmup):
        proto.run_round(r, updates, LAYOUT, defense=Mean(), transport=transport)
    return proto.run_round(warmup, updates, LAYOUT, defense=Mean(), transport=transport)


def check_rejected(out, error: type[Exception]) -> None:
    assert set(out.rejected) == set(ATTACKERS)
    for sender, reason in out.rejected.items():
        assert issubclass(getattr(errors, reason.split(":")[0]), error)
        assert f"sender {sender}" in reason


@pytest.mark.parametrize("stage", ["advertise", "share", "complaints", "masked"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_before_unmasking_leave_the_honest_sum(name: str, stage: str) -> None:
    factory, error, warmup = ATTACKS[name]
    updates = make_updates(0)
    transport = factory(list(ATTACKERS), stage)
    out = run(updates, transport, warmup)
    assert {e.sender for e in transport.log} == set(ATTACKERS)
    check_rejected(out, error)
    honest = [u for u in updates if u.client_id not in ATTACKERS]
    assert set(out.accepted) == {u.client_id for u in honest}
    expected = run(honest, None, warmup).aggregate
    assert torch.allclose(out.aggregate, expected, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_on_the_unmask_message_are_rejected_and_the_sum_survives(name: str) -> None:
    factory, error, warmup = ATTACKS[name]
    updates = make_updates(1)
    transport = factory(list(ATTACKERS), "unmask")
    out = run(updates, transport, warmup)
    check_rejected(out, error)
    # Their masked inputs were committed before unmasking: the sum is every client's.
    assert torch.allclose(out.aggregate, run(updates, None, warmup).aggregate, atol=1e-5)


@pytest.mark.parametrize("stage", ["advertise", "share", "complaints", "masked", "unmask"])
def test_dropouts_at_any_stage_leave_the_honest_sum(stage: str) -> None:
    updates = make_updates(2)
    out = run(updates, Drop(list(ATTACKERS), stage=stage), 0)
    assert out.rejected == {}
    committed = stage == "unmask"  # a client that dropped after sending its masked input still counts
    kept = updates if committed else [u for u in updates if u.client_id not in ATTACKERS]
    assert torch.allclose(out.aggregate, run(kept, None, 0).aggregate, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_tampered_revealed_shares_are_rejected_by_name(seed: int) -> None:
    """Revealed shares are checked against the seed commitments: the tamperer is rejected, the
    sum (whose masked inputs were all committed) is every client's."""
    updates = make_updates(3)
    transport = Tamper(list(ATTACKERS), field="shares", stage="unmask", n_bytes=4, seed=seed)
    out = run(updates, transport, 0)
    assert len(transport.log) == len(ATTACKERS)
    check_rejected(out, ProtocolError)
    assert torch.allclose(out.aggregate, run(updates, None, 0).aggregate, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_tampered_sealed_shares_never_give_a_wrong_sum(seed: int) -> None:
    """Sealed shares fail AES-GCM at their recipients: either the tamperers are rejected by name
    and the sum is the honest clients', or the round aborts before anything is unmasked."""
    updates = make_updates(3)
    transport = Tamper(list(ATTACKERS), field="shares", stage="share", n_bytes=4, seed=seed)
    try:
        out = run(updates, transport, 0)
    except ProtocolAbort as exc:
        assert "nothing was unmasked" in str(exc)
        return
    check_rejected(out, ProtocolError)
    honest = [u for u in updates if u.client_id not in ATTACKERS]
    assert torch.allclose(out.aggregate, run(honest, None, 0).aggregate, atol=1e-5)


def test_tampered_sealed_shares_only_cost_the_tamperer() -> None:
    """The share-complaint stage excludes a tamperer before anyone masks: the round goes on."""
    updates = make_updates(3)
    out = run(updates, Tamper(list(ATTACKERS), field="shares", stage="share", n_bytes=4, seed=0), 0)
    check_rejected(out, ProtocolError)
    honest = [u for u in updates if u.client_id not in ATTACKERS]
    assert set(out.accepted) == {u.client_id for u in honest}
    assert torch.allclose(out.aggregate, run(honest, None, 0).aggregate, atol=1e-5)


def test_a_forged_signature_on_a_complaint_rejects_the_complainer() -> None:
    """With ``signatures=True`` the complaint list is signed: a forged one names its sender."""
    updates = make_updates(4)
    proto = SecAggPlus(dropout_fraction=0.3, signatures=True)
    transport = Tamper(list(ATTACKERS), field="sig", stage="complaints", n_bytes=2, seed=0)
    out = proto.run_round(0, updates, LAYOUT, defense=Mean(), transport=transport)
    assert len(transport.log) == len(ATTACKERS)
    check_rejected(out, errors.DecryptionError)
    honest = [u for u in updates if u.client_id not in ATTACKERS]
    assert torch.allclose(out.aggregate, run(honest, None, 0).aggregate, atol=1e-5)


class _FalseAccusation(Transport):
    """``accuser`` reports ``victim``'s (valid) sealed share as failing authentication."""

    def __init__(self, accuser: int, victim: int) -> None:
        self.accuser, self.victim = accuser, victim

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        if sender != self.accuser or stage != "complaints":
            return data
        env = decode(data)
        return encode(replace(env, fields={**env.fields, "accused": pack_ids([self.victim])}))


def test_a_false_accusation_excludes_only_the_accused_for_one_round() -> None:
    """The documented trade-off: a lying client gets one honest neighbour excluded (named, with
    its accuser), the round goes on over everyone else, and the accuser stays in."""
    updates = make_updates(5)
    accuser = 2
    victim = protocol().plan(0, list(range(N)), LAYOUT.numel, max_weight=1.0).neighbours(accuser)[0]
    out = protocol().run_round(0, updates, LAYOUT, defense=Mean(), transport=_FalseAccusation(accuser, victim))
    assert set(out.rejected) == {victim}
    assert out.rejected[victim].startswith("DecryptionError") and f"[{accuser}]" in out.rejected[victim]
    kept = [u for u in updates if u.client_id != victim]
    assert set(out.accepted) == {u.client_id for u in kept}
    assert torch.allclose(out.aggregate, run(kept, None, 0).aggregate, atol=1e-5)
