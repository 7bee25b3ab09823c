"""Protocol attacks against the plaintext reference protocol.

Every attack on the wire must be rejected with a typed error that names the sender, and the
round's aggregate over the honest clients must be exactly what it is without the attackers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml import errors
from securefml.attacks import (
    PROTOCOL_ATTACKS,
    Drop,
    Duplicate,
    LieAboutDropouts,
    Malformed,
    Oversize,
    Replay,
    Tamper,
    TamperingTransport,
    Truncate,
    WrongRound,
    WrongSender,
    make_protocol_attack,
)
from securefml.defenses import CoordinateMedian, Mean
from securefml.errors import ConfigError, MalformedMessageError, ProtocolError, ReplayError
from securefml.protocols import ClientUpdate, Plaintext
from securefml.protocols.wire import Envelope, decode, encode, pack_array, unpack_array
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("a.weight", (3, 2)), ("a.bias", (3,)), ("b.weight", (4,))])

# name -> (factory on the attacker ids, expected error type, rounds to run before the attacked one)
ATTACKS: dict[str, tuple[Callable[[list[int]], TamperingTransport], type[Exception], int]] = {
    "truncate": (lambda s: Truncate(s, keep=0.6), MalformedMessageError, 0),
    "truncate-empty": (lambda s: Truncate(s, keep=0.0), MalformedMessageError, 0),
    "oversize": (lambda s: Oversize(s, extra=17), MalformedMessageError, 0),
    "oversize-huge": (lambda s: Oversize(s, extra=16 * LAYOUT.numel + 70_000), MalformedMessageError, 0),
    "garbage": (lambda s: Malformed(s, mode="garbage"), MalformedMessageError, 0),
    "bad-magic": (lambda s: Malformed(s, mode="magic"), MalformedMessageError, 0),
    "bad-version": (lambda s: Malformed(s, mode="version"), MalformedMessageError, 0),
    "tamper-layout": (lambda s: Tamper(s, field="layout"), ProtocolError, 0),
    "tamper-manifest": (lambda s: Tamper(s, field="layers", n_bytes=2), MalformedMessageError, 0),
    "replay": (lambda s: Replay(s), ReplayError, 1),
    "wrong-sender": (lambda s: WrongSender(s), ReplayError, 0),
    "wrong-round": (lambda s: WrongRound(s, offset=3), ReplayError, 0),
    "duplicate-frame": (lambda s: Duplicate(s), MalformedMessageError, 0),
    "duplicate-copy": (lambda s: Duplicate(s, source=0), ReplayError, 0),
}


def make_updates(n: int, seed: int, *, layers: tuple[str, ...] = ("a", "b")) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    d = LAYOUT.numel_of(layers)
    return [ClientUpdate(i, torch.randn(d, generator=g), layers, weight=float(1 + i % 3)) for i in range(n)]


def honest_round(updates: list[ClientUpdate], attackers: set[int], round_idx: int, defense=None) -> torch.Tensor:
    honest = [u for u in updates if u.client_id not in attackers]
    return Plaintext().run_round(round_idx, honest, LAYOUT, defense=defense or Mean()).aggregate


def attacked_round(updates: list[ClientUpdate], transport: TamperingTransport, warmup: int, defense=None):
    proto = Plaintext()
    for r in range(warmup):
        proto.run_round(r, updates, LAYOUT, defense=defense or Mean(), transport=transport)
    return proto.run_round(warmup, updates, LAYOUT, defense=defense or Mean(), transport=transport)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_protocol_attack_is_rejected_and_the_honest_aggregate_is_unchanged(name: str) -> None:
    factory, error, warmup = ATTACKS[name]
    updates = make_updates(6, seed=1)
    attackers = {2, 5}
    transport = factory(sorted(attackers))
    out = attacked_round(updates, transport, warmup)
    assert {e.sender for e in transport.log} == attackers  # the attack really fired
    assert set(out.rejected) == attackers
    for sender, reason in out.rejected.items():
        assert issubclass(getattr(errors, reason.split(":")[0]), error)  # the typed error expected
        assert f"sender {sender}" in reason  # names the culprit
    assert set(out.accepted) == set(range(6)) - attackers
    assert torch.equal(out.aggregate, honest_round(updates, attackers, warmup))


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_the_decoder_raises_a_typed_error_naming_the_sender(name: str) -> None:
    factory, error, warmup = ATTACKS[name]
    updates = make_updates(3, seed=2)
    transport = factory([1])
    proto = Plaintext()
    msgs: list[bytes | None] = []
    for r in range(warmup + 1):
        msgs = [transport.deliver(u.client_id, "update", proto.encode(r, u, LAYOUT)) for u in updates]
    with pytest.raises(error) as info:
        proto.decode(warmup, 1, msgs[1], LAYOUT)
    assert isinstance(info.value, ProtocolError) and info.value.sender == 1


def test_drop_is_a_dropout_not_a_rejection() -> None:
    updates = make_updates(5, seed=3)
    transport = Drop([0, 4])
    out = Plaintext().run_round(0, updates, LAYOUT, defense=Mean(), transport=transport)
    assert out.rejected == {} and set(out.accepted) == {1, 2, 3}
    assert torch.equal(out.aggregate, honest_round(updates, {0, 4}, 0))


def test_attacks_leave_other_stages_and_senders_alone() -> None:
    data = encode(Envelope("x", 0, 1, {"f": b"abc"}))
    for transport in (Truncate([1], stage="share"), Tamper([2]), WrongRound([1], stage="share")):
        assert transport.deliver(1, "update", data) == data
        assert transport.log == []


def test_chained_transports_compose() -> None:
    updates = make_updates(5, seed=4)
    transport = Truncate([1], inner=Drop([3]))
    out = Plaintext().run_round(0, updates, LAYOUT, defense=Mean(), transport=transport)
    assert set(out.rejected) == {1} and set(out.accepted) == {0, 2, 4}
    assert torch.equal(out.aggregate, honest_round(updates, {1, 3}, 0))


def test_plaintext_does_not_authenticate_payloads() -> None:
    """A documented limit: the reference protocol has no integrity protection on the vector."""
    updates = make_updates(3, seed=5)
    transport = Tamper([1], field="vector", n_bytes=1, seed=7)
    out = Plaintext().run_round(0, updates, LAYOUT, defense=Mean(), transport=transport)
    assert len(transport.log) == 1
    if 1 in out.accepted:  # the flipped float was still finite: accepted, aggregate changed
        assert not torch.equal(out.aggregate, Plaintext().run_round(0, updates, LAYOUT, defense=Mean()).aggregate)
    else:  # the flip produced NaN/Inf or a bad dtype code: rejected, typed
        assert 1 in out.rejected


def test_lie_about_dropouts_rewrites_the_survivor_list() -> None:
    survivors = np.array([0, 1, 2, 3, 4], dtype=np.uint32)
    msg = encode(Envelope("unmask-request", 2, 0, {"survivors": pack_array(survivors), "other": b"keep"}))
    transport = LieAboutDropouts([1, 3], field="survivors", encoding="array", stage="unmask")
    out = decode(transport.deliver(0, "unmask", msg))
    assert unpack_array(out.field("survivors")).tolist() == [0, 2, 4]
    assert out.field("other") == b"keep" and out.round == 2 and out.sender == 0
    assert [e.action for e in transport.log] == ["lie-about-dropouts"]
    assert transport.deliver(0, "update", msg) == msg  # other stages untouched
    with pytest.raises(ConfigError):
        LieAboutDropouts([])


def test_lie_about_dropouts_on_big_endian_id_lists() -> None:
    alive = b"".join(i.to_bytes(4, "big") for i in (2, 5, 7, 9))
    msg = encode(Envelope("secagg/survivors", 0, 0, {"alive": alive}))
    transport = LieAboutDropouts([5, 9], kind="secagg/survivors")
    out = decode(transport.deliver(0, "consistency", msg))
    assert out.field("alive") == (2).to_bytes(4, "big") + (7).to_bytes(4, "big")
    other_kind = encode(Envelope("secagg/keys", 0, 0, {"alive": alive}))
    assert transport.deliver(0, "consistency", other_kind) == other_kind
    assert len(transport.log) == 1


def test_registry_builds_protocol_attacks() -> None:
    assert set(PROTOCOL_ATTACKS.names()) >= {"truncate", "oversize", "malformed", "tamper", "replay", "wrong-sender",
                                             "wrong-round", "duplicate", "drop"}
    t = make_protocol_attack("truncate:keep=0.25", [3])
    assert isinstance(t, Truncate) and t.keep == 0.25 and t.senders == frozenset({3})
    with pytest.raises(ConfigError, match="choose one of"):
        make_protocol_attack("teleport", [1])


@settings(max_examples=20, deadline=None)
@given(
    st.integers(3, 8),
    st.data(),
    st.sampled_from(sorted(ATTACKS)),
    st.integers(0, 2**16),
    st.sampled_from([("a", "b"), ("a",), ("b",)]),
    st.sampled_from(["mean", "median"]),
)
def test_property_any_attack_any_subset_honest_aggregate_intact(n, data, name, seed, layers, rule) -> None:
    defense = Mean() if rule == "mean" else CoordinateMedian()
    attackers = set(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n - 1)))
    factory, error, warmup = ATTACKS[name]
    if name == "duplicate-copy" and 0 in attackers:
        attackers.discard(0)
        if not attackers:
            return
    updates = make_updates(n, seed, layers=layers)
    transport = factory(sorted(attackers))
    out = attacked_round(updates, transport, warmup, defense)
    assert set(out.rejected) == attackers
    assert all(f"sender {s}" in reason for s, reason in out.rejected.items())
    assert torch.equal(out.aggregate, honest_round(updates, attackers, warmup, defense))
