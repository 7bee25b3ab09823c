"""Issue 11, SecAgg+ findings 1-3, reproduced on the public API (they failed before the fix).

1. A lying server tells one victim that all of its neighbours are excluded, so the victim
   masks with its self mask only; the victim's self-mask seed is then revealed as a survivor's
   and ``y - PRG(b) = x``.  Now the victim aborts (``ProtocolAbort``) before masking.
2. A client adds an arbitrary ring element to its masked vector (masks are additive, so this
   is what a malicious client can always do): an out-of-range decoded sum is never returned.
3. A client sends a wrong seed commitment: it is blamed by name and the round goes on.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from securefml.defenses import Mean
from securefml.errors import AggregateOutOfRange, ProtocolAbort, ProtocolError
from securefml.protocols import ClientUpdate, shamir
from securefml.protocols.base import Transport
from securefml.protocols.prg import keystream
from securefml.protocols.secagg import SecAggPlus
from securefml.protocols.secagg_client import B_SHARE, SecAggClient
from securefml.protocols.secagg_messages import SERVER_ID, pack_ids
from securefml.protocols.secagg_server import SecAggServer
from securefml.protocols.wire import Envelope, decode, encode, pack_array, unpack_array
from securefml.updates import LayerLayout

LENGTH = 6
LAYOUT = LayerLayout([("w.weight", (LENGTH,))])


def _strip_all_masks(signatures: bool) -> tuple[np.ndarray | None, np.ndarray, Exception | None]:
    """Finding 1 on the two protocol halves; returns (what the server recovered, the victim's x, victim error)."""
    proto = SecAggPlus(signatures=signatures, neighbours=5, threshold=3)
    plan = proto.plan(0, list(range(6)), LENGTH, max_weight=1.0)
    server = SecAggServer(plan)
    clients = {c: SecAggClient(c, plan, identity=proto.identity(c) if signatures else None) for c in plan.cohort}
    for c, cl in clients.items():
        server.receive_advertise(c, cl.advertise())
    for c, cl in clients.items():
        server.receive_share(c, cl.share(server.keys_for(c)))
    for c, cl in clients.items():
        server.receive_complaints(c, cl.complain(server.shares_for(c)))
    server.close_complaints()
    victim = 0
    x = np.linspace(-0.5, 0.5, LENGTH).astype(np.float32)
    # the lie: "all of your neighbours are excluded" (no complaint backs it)
    honest_excl = decode(server.exclusions_for(victim))
    lie = encode(replace(honest_excl, fields={**honest_excl.fields, "excluded": pack_ids(plan.neighbours(victim))}))
    try:
        masked_v = clients[victim].masked(lie, x, 1.0)
    except ProtocolAbort as exc:
        return None, x, exc
    server.receive_masked(victim, masked_v)
    for c, cl in clients.items():
        if c != victim:
            server.receive_masked(c, cl.masked(server.exclusions_for(c), np.zeros(LENGTH, np.float32), 1.0))
    # a lying server skips its own mask-list check and announces everybody alive
    server.state.closed, server.state.contributors, server.state.dropped = True, plan.cohort, ()
    if signatures:
        for c, cl in clients.items():
            server.receive_consistency(c, cl.consistency(server.survivors_for(c)))
    for c, cl in clients.items():
        if c != victim:
            server.receive_unmask(c, cl.unmask(server.request_for(c)))
    pts = [(r + 1, int.from_bytes(s, "big")) for r, recs in server.state.shares.items()
           for about, kind, s in recs if about == victim and kind == B_SHARE]
    seed = shamir.reconstruct(pts, plan.t).to_bytes(32, "big")
    y = server.state.masked[victim].vector.copy()
    y -= keystream(seed, y.size, y.dtype)
    ws, _ = plan.fixed_point.decode_sum(y)
    return ws.astype(np.float32), x, None


@pytest.mark.parametrize("signatures", [False, True])
def test_finding1_server_cannot_strip_every_pairwise_mask_of_a_victim(signatures: bool) -> None:
    recovered, x, error = _strip_all_masks(signatures)
    assert recovered is None or not np.allclose(recovered, x, atol=1e-3)
    assert isinstance(error, ProtocolAbort)
    assert error.sender == SERVER_ID


def _round(n: int, transport: Transport | None, **kw: object):  # noqa: ANN202
    g = torch.Generator().manual_seed(n)
    ups = [ClientUpdate(i, 0.2 * torch.rand(LENGTH, generator=g) - 0.1, ("w",), 1.0) for i in range(n)]
    # the public weight bound is 1 (every weight is 1); it is no longer derived from the clients' weights
    return ups, SecAggPlus(max_weight=1.0, **kw).run_round(0, ups, LAYOUT, defense=Mean(),  # type: ignore[arg-type]
                                                           transport=transport)


class AddToMasked(Transport):
    """Client ``culprit`` adds ``delta`` (mod 2^32) to coordinate ``index`` of its masked vector.

    Masks are additive, so this is exactly a client that encoded any ring element it liked."""

    def __init__(self, culprit: int, index: int, delta: int) -> None:
        self.culprit, self.index, self.delta = culprit, index, delta

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        if sender != self.culprit or stage != "masked":
            return data
        env = decode(data)
        vec = unpack_array(env.field("vector")).copy()
        vec[self.index] = (int(vec[self.index]) + self.delta) % 2**32
        return encode(replace(env, fields={**env.fields, "vector": pack_array(vec)}))


@pytest.mark.parametrize(
    ("index", "delta"),
    [(-1, 2**30), (-1, 2**31), (-1, -(2**30)), (0, 2**31), (2, 3 * 2**29 + 12345)],
    ids=["weight-up", "weight-wrap", "weight-down", "entry-wrap", "entry-far"],
)
def test_finding2_an_out_of_range_sum_is_never_returned(index: int, delta: int) -> None:
    with pytest.raises(ProtocolAbort) as info:
        _round(8, AddToMasked(3, index, delta))
    assert "AggregateOutOfRange" in str(info.value) or isinstance(info.value, AggregateOutOfRange)


def test_a_shift_within_the_range_is_not_detected() -> None:
    """The documented residual: a client may still move the sum inside the code's range
    (here +4 on entry 2 of the weighted sum of 8 unit-weight clients: +0.5 on the mean)."""
    ups, out = _round(8, AddToMasked(3, 2, 2**29))
    ref = sum(u.vector.double() for u in ups) / len(ups)
    shift = out.aggregate.double() - ref
    assert abs(float(shift[2]) - 0.5) < 1e-5 and float(shift.abs().sum() - shift[2].abs()) < 1e-5


def test_finding2_a_bad_bucket_aborts_alone() -> None:
    ups, out = _round(12, AddToMasked(3, 0, 2**31), buckets=4)
    bad = next(i for i, members in out.extras["buckets"].items() if 3 in members)
    assert set(out.extras["aborted_buckets"]) == {bad}
    assert "AggregateOutOfRange" in out.extras["aborted_buckets"][bad]
    assert 3 not in out.accepted and len(out.accepted) == 12 - len(out.extras["buckets"][bad])


class BadCommit(Transport):
    def __init__(self, culprit: int) -> None:
        self.culprit = culprit

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        if sender != self.culprit or stage != "masked":
            return data
        env: Envelope = decode(data)
        return encode(replace(env, fields={**env.fields, "commit": bytes(32)}))


@pytest.mark.parametrize("signatures", [False, True])
def test_finding3_a_wrong_commitment_is_blamed_and_the_round_goes_on(signatures: bool) -> None:
    ups, out = _round(8, BadCommit(5), signatures=signatures)
    assert set(out.rejected) == {5}
    assert out.rejected[5].startswith("DecryptionError") and "sender 5" in out.rejected[5]
    assert "commitment" in out.rejected[5]
    # its seed is fixed by its consistent shares, so its (committed) input is in the sum
    ref = sum(u.vector.double() for u in ups) / len(ups)
    assert torch.allclose(out.aggregate.double(), ref, atol=out.extras["error_bound"] + 1e-7)


def _to_exclusions(signatures: bool):  # noqa: ANN202
    proto = SecAggPlus(signatures=signatures, neighbours=5, threshold=3)
    plan = proto.plan(0, list(range(6)), LENGTH, max_weight=1.0)
    server = SecAggServer(plan)
    clients = {c: SecAggClient(c, plan, identity=proto.identity(c) if signatures else None) for c in plan.cohort}
    for c, cl in clients.items():
        server.receive_advertise(c, cl.advertise())
    for c, cl in clients.items():
        server.receive_share(c, cl.share(server.keys_for(c)))
    return proto, plan, server, clients


def test_an_exclusion_needs_a_signed_complaint_that_names_the_peer() -> None:
    from securefml.protocols.secagg_crypto import complaints_payload, sign
    from securefml.protocols.secagg_messages import Complaint, pack_complaints

    proto, plan, server, clients = _to_exclusions(True)
    for c, cl in clients.items():
        server.receive_complaints(c, cl.complain(server.shares_for(c)))
    server.close_complaints()
    x = np.zeros(LENGTH, np.float32)

    def excl(ids, proofs):  # noqa: ANN001, ANN202
        return encode(Envelope("secagg/exclusions", 0, SERVER_ID, {"excluded": pack_ids(ids),
                                                                   "proofs": pack_complaints(proofs)}))

    genuine = Complaint(2, (1,), sign(proto.identity(2), complaints_payload(0, 2, (1,))))
    other_round = Complaint(2, (1,), sign(proto.identity(2), complaints_payload(1, 2, (1,))))
    forged = Complaint(2, (1,), bytes(64))
    self_accused = Complaint(1, (1,), sign(proto.identity(1), complaints_payload(0, 1, (1,))))
    for proofs in ([], [forged], [other_round], [self_accused]):
        cl = SecAggClient(0, plan, identity=proto.identity(0))
        cl.state = replace(clients[0].state)
        with pytest.raises(ProtocolAbort, match="complaint|signed"):
            cl.masked(excl([1], proofs), x, 1.0)
    # with the accuser's genuine signature over (round, accuser, accused) the exclusion stands
    msg = clients[0].masked(excl([1], [genuine]), x, 1.0)
    from securefml.protocols.secagg_messages import unpack_ids

    peers = unpack_ids(decode(msg).field("peers"), sender=None)
    assert 1 not in peers and len(peers) == 4


def test_a_client_never_reveals_both_secrets_of_a_peer() -> None:
    proto, plan, server, clients = _to_exclusions(False)
    for c, cl in clients.items():
        server.receive_complaints(c, cl.complain(server.shares_for(c)))
    server.close_complaints()
    for c, cl in clients.items():
        server.receive_masked(c, cl.masked(server.exclusions_for(c), np.zeros(LENGTH, np.float32), 1.0))
    server.close_masked()
    both = encode(Envelope("secagg/unmask-request", 0, SERVER_ID,
                           {"alive": pack_ids(plan.cohort), "dropped": pack_ids([3])}))
    with pytest.raises(ProtocolError, match="both alive and dropped"):
        clients[0].unmask(both)
    first = clients[1].unmask(server.request_for(1))
    assert first  # then a replayed request (asking for the other shares) is refused
    again = encode(Envelope("secagg/unmask-request", 0, SERVER_ID,
                            {"alive": pack_ids([c for c in plan.cohort if c != 3]), "dropped": pack_ids([3])}))
    with pytest.raises(ProtocolError, match="out of order"):
        clients[1].unmask(again)


def test_unsigned_mode_does_not_claim_active_security() -> None:
    """Documented limitation: without signatures nothing authenticates the advertised keys, so an
    active server substitutes its own keys for every neighbour of a victim, opens every share the
    victim sends, plays those neighbours and recovers the victim's input.  With
    ``signatures=True`` the substituted keys fail their signatures and the victim aborts."""
    from securefml.protocols.prg import apply_masks
    from securefml.protocols.secagg_client import KEY_RECORD_BYTES
    from securefml.protocols.secagg_crypto import SEALED_BYTES, generate_keypair, open_share, pair_key, seal_share
    from securefml.protocols.secagg_messages import pack_records, unpack_records

    assert SecAggPlus().active_server_secure is False
    assert SecAggPlus(signatures=True).active_server_secure is True
    for signatures in (False, True):
        proto = SecAggPlus(signatures=signatures, neighbours=5, threshold=3)
        plan = proto.plan(0, list(range(6)), LENGTH, max_weight=1.0)
        victim = SecAggClient(0, plan, identity=proto.identity(0) if signatures else None)
        adv = decode(victim.advertise())
        fake = {p: (generate_keypair(), generate_keypair()) for p in plan.neighbours(0)}
        recs = [(p, c.public + s.public + bytes(64)) for p, (c, s) in fake.items()]
        keys_msg = encode(Envelope("secagg/keys", 0, SERVER_ID, {"keys": pack_records(recs, KEY_RECORD_BYTES)}))
        if signatures:
            with pytest.raises(ProtocolAbort):
                victim.share(keys_msg)
            continue
        sealed = unpack_records(decode(victim.share(keys_msg)).field("shares"), SEALED_BYTES, sender=None)
        b_pts = []
        for p, box in sealed:
            ck = pair_key(fake[p][0].private, adv.field("c_pk"), purpose=b"share", round_idx=0, a=p, b=0)
            b_pts.append((p + 1, int.from_bytes(open_share(ck, box, round_idx=0, sender=0, receiver=p)[:33], "big")))
        seed = shamir.reconstruct(b_pts, plan.t).to_bytes(32, "big")
        # the server plays the fake neighbours: sealed shares for the victim under keys it knows
        mine = [(p, seal_share(pair_key(c.private, adv.field("c_pk"), purpose=b"share", round_idx=0, a=p, b=0),
                               bytes(66), round_idx=0, sender=p, receiver=0)) for p, (c, _) in fake.items()]
        victim.complain(encode(Envelope("secagg/shares", 0, SERVER_ID,
                                        {"shares": pack_records(mine, SEALED_BYTES)})))
        x = np.linspace(-0.4, 0.4, LENGTH).astype(np.float32)
        msg = victim.masked(encode(Envelope("secagg/exclusions", 0, SERVER_ID, {"excluded": b""})), x, 1.0)
        y = unpack_array(decode(msg).field("vector")).copy()
        apply_masks(y, minus=[seed])
        for p, (_, s_keys) in fake.items():
            m = pair_key(s_keys.private, adv.field("s_pk"), purpose=b"mask", round_idx=0, a=0, b=p)
            apply_masks(y, minus=[m]) if p > 0 else apply_masks(y, plus=[m])
        recovered, _ = plan.fixed_point.decode_sum(y)
        assert np.allclose(recovered, x, atol=1e-6)  # the documented break of unsigned mode
