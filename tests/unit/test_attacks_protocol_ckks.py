"""Protocol attacks against the CKKS protocol (real TenSEAL ciphertexts, add-only preset).

Every attack is rejected with a typed error naming the sender, and the decrypted aggregate over
the honest clients equals the honest-only round within CKKS precision.
"""

from __future__ import annotations

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
    "tamper-ciphertext": (lambda s: Tamper(s, field="ct.0", n_bytes=64), MalformedMessageError, 0),
    "replay": (lambda s: Replay(s), ReplayError, 1),
    "wrong-sender": (lambda s: WrongSender(s), ReplayError, 0),
    "wrong-round": (lambda s: WrongRound(s), ReplayError, 0),
    "duplicate-copy": (lambda s: Duplicate(s, source=0), ReplayError, 0),
}


@pytest.fixture(scope="module")
def key_holder() -> CKKSKeyHolder:
    return CKKSKeyHolder.generate("add-only")


def make_updates(n: int, seed: int) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    d = LAYOUT.numel
    return [ClientUpdate(i, torch.randn(d, generator=g), ("a", "b"), weight=float(1 + i % 2)) for i in range(n)]


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_protocol_attacks_against_ckks(name: str, key_holder: CKKSKeyHolder) -> None:
    factory, error, warmup = ATTACKS[name]
    updates = make_updates(5, seed=3)
    attackers = {1, 3}
    transport = factory(sorted(attackers))
    proto = CKKS(key_holder)
    for r in range(warmup):
        proto.run_round(r, updates, LAYOUT, defense=Mean(), transport=transport)
    out = proto.run_round(warmup, updates, LAYOUT, defense=Mean(), transport=transport)
    assert {e.sender for e in transport.log} == attackers
    assert set(out.rejected) == attackers
    for sender, reason in out.rejected.items():
        assert issubclass(getattr(errors, reason.split(":")[0]), error)
        assert f"sender {sender}" in reason
    honest = [u for u in updates if u.client_id not in attackers]
    expected = CKKS(key_holder).run_round(warmup, honest, LAYOUT, defense=Mean()).aggregate
    assert torch.allclose(out.aggregate, expected, atol=1e-4)


def test_ckks_ciphertexts_are_malleable(key_holder: CKKSKeyHolder) -> None:
    """A documented limit: a CKKS ciphertext carries no authentication tag.

    A single flipped byte often still loads as a valid ciphertext (then it decrypts to noise
    inside the aggregate, a Byzantine update); structural damage is rejected.  Integrity of
    the payload needs signatures or a MAC on the envelope, which this protocol does not claim.
    """
    updates = make_updates(4, seed=0)
    for seed in range(6):
        transport = Tamper([1], field="ct.0", n_bytes=1, seed=seed)
        out = CKKS(key_holder).run_round(0, updates, LAYOUT, defense=Mean(), transport=transport)
        assert len(transport.log) == 1
        if 1 in out.rejected:
            assert out.rejected[1].startswith("MalformedMessageError: sender 1")
        else:  # loaded as a valid ciphertext: counted as the client's (Byzantine) contribution
            assert 1 in out.accepted
