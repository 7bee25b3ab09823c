"""Protocol attacks against the CKKS protocol (real TenSEAL ciphertexts, add-only preset).

Every attack is rejected with a typed error naming the sender, and the decrypted aggregate over
the honest clients equals the honest-only round within CKKS precision.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch

from securefml import errors
from securefml.attacks import (
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
from securefml.errors import MalformedMessageError, ProtocolError, ReplayError
from securefml.protocols import ClientUpdate
from securefml.protocols.ckks import CKKS
from securefml.protocols.ckks_keys import CKKSKeyHolder
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("a.weight", (3, 2)), ("a.bias", (3,)), ("b.weight", (4,))])

ATTACKS: dict[str, tuple[Callable[[list[int]], TamperingTransport], type[Exception], int]] = {
    "truncate": (lambda s: Truncate(s, keep=0.7), MalformedMessageError, 0),
    "oversize": (lambda s: Oversize(s, extra=70_000), MalformedMessageError, 0),
    "garbage": (lambda s: Malformed(s, mode="garbage"), MalformedMessageError, 0),
    "bad-version": (lambda s: Malformed(s, mode="version"), MalformedMessageError, 0),
    "tamper-context": (lambda s: Tamper(s, field="ctx"), ProtocolError, 0),
    # a damaged ciphertext that still loads fails its sender's signature (DecryptionError)
    "tamper-ciphertext": (lambda s: Tamper(s, field="ct.0", n_bytes=64), ProtocolError, 0),
    "replay": (lambda s: Replay(s), ReplayError, 1),
    "wrong-sender": (lambda s: WrongSender(s), ReplayError, 0),
    "wrong-round": (lambda s: WrongRound(s), ReplayError, 0),
    "duplicate-copy": (lambda s: Duplicate(s, source=0), ReplayError, 0),
}


@pytest.fixture(scope="module")
def key_holder() -> CKKSKeyHolder:
    return CKKSKeyHolder.generate("add-only")


@pytest.fixture(scope="module")
def proto(key_holder: CKKSKeyHolder) -> CKKS:
    """One driver per key holder: it plays the clients, whose signing keys are enrolled once."""
    return CKKS(key_holder)


ROUNDS = itertools.count(0, 1000)  # the key holder decrypts each round once: each test gets its own rounds


def make_updates(n: int, seed: int) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    d = LAYOUT.numel
    return [ClientUpdate(i, torch.randn(d, generator=g), ("a", "b"), weight=float(1 + i % 2)) for i in range(n)]


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_protocol_attacks_against_ckks(name: str, proto: CKKS) -> None:
    factory, error, warmup = ATTACKS[name]
    updates = make_updates(5, seed=3)
    attackers = {1, 3}
    transport = factory(sorted(attackers))
    base = next(ROUNDS)
    for r in range(warmup):
        proto.run_round(base + r, updates, LAYOUT, defense=Mean(), transport=transport)
    out = proto.run_round(base + warmup, updates, LAYOUT, defense=Mean(), transport=transport)
    assert {e.sender for e in transport.log} == attackers
    assert set(out.rejected) == attackers
    for sender, reason in out.rejected.items():
        assert issubclass(getattr(errors, reason.split(":")[0]), error)
        assert f"sender {sender}" in reason
    honest = [u for u in updates if u.client_id not in attackers]
    expected = proto.run_round(base + warmup + 100, honest, LAYOUT, defense=Mean()).aggregate
    assert torch.allclose(out.aggregate, expected, atol=1e-4)


def test_a_flipped_ciphertext_byte_is_always_rejected_by_name(proto: CKKS) -> None:
    """CKKS ciphertexts are malleable: a flipped byte often still loads as a valid ciphertext.

    The sender's Ed25519 signature covers every ciphertext's SHA-256, so such a ciphertext is
    rejected (``DecryptionError``) and structural damage as before (``MalformedMessageError``);
    either way the sender is named and the others' aggregate is unchanged.
    """
    updates = make_updates(4, seed=0)
    base = next(ROUNDS)
    expected = proto.run_round(base + 99, [u for u in updates if u.client_id != 1], LAYOUT, defense=Mean()).aggregate
    for seed in range(6):
        transport = Tamper([1], field="ct.0", n_bytes=1, seed=seed)
        out = proto.run_round(base + 100 + seed, updates, LAYOUT, defense=Mean(), transport=transport)
        assert len(transport.log) == 1
        assert set(out.rejected) == {1}
        assert out.rejected[1].split(":")[0] in ("MalformedMessageError", "DecryptionError")
        assert "sender 1" in out.rejected[1]
        assert torch.allclose(out.aggregate, expected, atol=1e-4)
