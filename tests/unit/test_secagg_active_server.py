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
from securefml.errors import AggregateOutOfRange, ProtocolAbort
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
    return ups, SecAggPlus(**kw).run_round(0, ups, LAYOUT, defense=Mean(), transport=transport)  # type: ignore[arg-type]


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
