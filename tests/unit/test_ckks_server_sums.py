"""The server's running sums: a rejected message leaves them exactly as they were.

``CKKSServer.decode(..., into=sums)`` adds each ciphertext as soon as it is loaded and keeps no
loaded ciphertext (issue 15: holding them cost fresh memory); when the message is refused after
some additions, the undo loads those ciphertexts again from the message and subtracts them.
The sums must then serialize to the same bytes as if the message had never arrived.
"""

from __future__ import annotations

import pytest
import torch

from securefml.errors import MalformedMessageError, ReplayError
from securefml.protocols.base import ClientUpdate
from securefml.protocols.ckks import CKKS, CKKSServer
from securefml.protocols.ckks_keys import CKKSKeyHolder
from securefml.protocols.ckks_stats import PackingFrame
from securefml.protocols.wire import Envelope, decode, encode
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("a.weight", (40, 150)), ("b.weight", (10, 40))])  # 6,400 floats: 2 chunks at 4,096 slots


@pytest.fixture(scope="module")
def proto() -> CKKS:
    return CKKS(CKKSKeyHolder.generate("add-only"))


def _messages(proto: CKKS, n: int, round_idx: int) -> tuple[PackingFrame, list[bytes]]:
    frame = PackingFrame(LAYOUT, LAYOUT.layer_names, proto.preset.slots)
    g = torch.Generator().manual_seed(round_idx)
    msgs = [proto.client.encode(round_idx, ClientUpdate(i, torch.randn(LAYOUT.numel, generator=g), LAYOUT.layer_names,
                                                        1.0), frame, signer=proto.enroll(i), prescale=1.0)
            for i in range(n)]
    return frame, msgs


def _snapshot(sums: dict[int, list]) -> dict[int, tuple[bytes, int]]:
    return {k: (slot[0].serialize(), slot[1]) for k, slot in sums.items()}


def test_replayed_message_is_undone_exactly(proto: CKKS) -> None:
    frame, msgs = _messages(proto, 3, 5)
    server = CKKSServer(proto.key_holder.public_context_bytes(), proto.preset)
    sums: dict[int, list] = {}
    for i, m in enumerate(msgs[:2]):
        server.decode(5, i, m, frame, strict=False, into=sums)
    before = _snapshot(sums)
    assert frame.n_chunks >= 2 and all(c == 2 for _, c in before.values())
    # client 2 resends client 0's ciphertexts under its own id: every chunk is added, then the
    # replay check at the end refuses the message and the additions are taken out again
    env0 = decode(msgs[0])
    env2 = decode(msgs[2])
    fields = dict(env2.fields)
    fields.update({k: v for k, v in env0.fields.items() if k.startswith("ct.")})
    forged = encode(Envelope(env2.kind, env2.round, env2.sender, fields))
    with pytest.raises(ReplayError):
        server.decode(5, 2, forged, frame, strict=False, into=sums)
    assert _snapshot(sums) == before


def test_message_rejected_on_its_first_chunk_seeds_nothing(proto: CKKS) -> None:
    frame, msgs = _messages(proto, 1, 6)
    server = CKKSServer(proto.key_holder.public_context_bytes(), proto.preset)
    env = decode(msgs[0])
    fields = dict(env.fields)
    fields["ct.1"] = b"\x00" * 64  # the second chunk does not load: the first one's seeding is undone
    sums: dict[int, list] = {}
    with pytest.raises(MalformedMessageError):
        server.decode(6, 0, encode(Envelope(env.kind, env.round, env.sender, fields)), frame, strict=False, into=sums)
    assert sums == {}
    server.decode(6, 0, msgs[0], frame, strict=False, into=sums)  # the genuine message still adds
    assert sorted(sums) == list(range(frame.n_chunks))


def test_native_running_sums_equal_the_wrapper_path(proto: CKKS, monkeypatch: pytest.MonkeyPatch) -> None:
    """The native load-and-add (issue 15) gives the sums TenSEAL's public API gives, byte for byte."""
    import securefml.protocols.ckks_server as ckks_server

    assert ckks_server._NATIVE_VECTOR is not None  # this TenSEAL has it: the fast path is what runs
    frame, msgs = _messages(proto, 4, 7)
    public = proto.key_holder.public_context_bytes()

    def sums_of(native: object) -> dict[int, tuple[bytes, int]]:
        monkeypatch.setattr(ckks_server, "_NATIVE_VECTOR", native)
        server = CKKSServer(public, proto.preset)
        sums: dict[int, list] = {}
        for i, m in enumerate(msgs):
            server.decode(7, i, m, frame, strict=False, into=sums)
        return _snapshot(sums)

    assert sums_of(ckks_server._NATIVE_VECTOR) == sums_of(None)


@pytest.mark.parametrize("bad", ["garbage", "truncated", "other_preset"])
def test_a_bad_later_ciphertext_is_refused_by_name_and_undone(proto: CKKS, bad: str) -> None:
    frame, msgs = _messages(proto, 2, 8)
    server = CKKSServer(proto.key_holder.public_context_bytes(), proto.preset)
    sums: dict[int, list] = {}
    server.decode(8, 0, msgs[0], frame, strict=False, into=sums)  # seeds every chunk: the rest go the native way
    before = _snapshot(sums)
    env = decode(msgs[1])
    fields = dict(env.fields)
    if bad == "garbage":
        fields["ct.1"] = bytes(range(256)) * 8
    elif bad == "truncated":
        fields["ct.1"] = bytes(fields["ct.1"])[:-100]
    else:  # a ciphertext made under other parameters (the stats preset)
        other = CKKS(CKKSKeyHolder.generate("stats"))
        oframe = PackingFrame(LAYOUT, LAYOUT.layer_names, other.preset.slots)
        omsg = other.client.encode(8, ClientUpdate(1, torch.zeros(LAYOUT.numel), LAYOUT.layer_names, 1.0), oframe,
                                   signer=other.enroll(1), prescale=1.0)
        fields["ct.1"] = decode(omsg).fields["ct.0"]
    with pytest.raises(MalformedMessageError) as err:
        server.decode(8, 1, encode(Envelope(env.kind, env.round, env.sender, fields)), frame, strict=False, into=sums)
    assert err.value.sender == 1
    assert _snapshot(sums) == before  # chunk 0 was added, then taken out again
