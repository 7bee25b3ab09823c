"""A client rejected at the masked stage's close leaves the sum exactly as if it had never sent.

Issue 15 changed what the SecAgg+ server holds between the masked and the unmask stage: a copy
of each accepted vector in a reused buffer (``protocols/secagg_buffers.py``) instead of the
message, and the driver frees each message once delivered.  The mask-list check at the close
(``SecAggServer.close_masked``) can still reject a client after its vector was accepted.
Hypothesis drives the adversary: any client of any round lies about whom it masked with (its
message names a drawn subset of its mask peers; the vector carries the masks of all of them).
The round must then reveal, bit for bit, the sum of the round in which every client the close
rejected dropped before sending its masked input, accept the same clients, and leave the pool's
buffers reusable: the rounds run back to back, so later rounds sum in buffers earlier rounds
returned.  Real X25519, AES-CTR masks and Shamir throughout; the rounding key is fixed so the
two rounds' sums are comparable.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import securefml.protocols.secagg_masking as secagg_masking
import securefml.protocols.secagg_server as secagg_server
from securefml.defenses.mean import Mean
from securefml.errors import ProtocolError
from securefml.protocols.base import ClientUpdate, Transport
from securefml.protocols.secagg import SecAggPlus
from securefml.protocols.secagg_buffers import VectorPool
from securefml.protocols.secagg_messages import pack_ids, unpack_ids
from securefml.protocols.wire import Envelope, decode, encode
from securefml.testing.secagg_strategies import DropAt, secagg_scenarios
from securefml.updates import LayerLayout

FIXED_ROUNDING = b"\x3c" * 32


class _ListsFewerPeers(Transport):
    """``liar``'s masked message names only some of the peers it masked with."""

    def __init__(self, liar: int, keep: frozenset[int] | None, drop_fraction: float) -> None:
        self.liar, self.keep, self.drop_fraction = liar, keep, drop_fraction
        self.omitted: tuple[int, ...] = ()

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        if sender != self.liar or stage != "masked":
            return data
        env = decode(data, max_bytes=1 << 26)
        peers = unpack_ids(env.fields["peers"], sender=sender)
        n_drop = max(1, int(len(peers) * self.drop_fraction))
        told = tuple(p for i, p in enumerate(peers) if i >= n_drop)
        self.omitted = tuple(p for p in peers if p not in told)
        return encode(Envelope(env.kind, env.round, env.sender, {**env.fields, "peers": pack_ids(told)}))


def _round(scn, transport: Transport):  # noqa: ANN001, ANN202
    layout, ups = scn.round_inputs()
    proto = SecAggPlus(neighbours=scn.k, threshold=scn.t, max_weight=128.0)
    try:
        out = proto.run_round(0, ups, layout, defense=Mean(), transport=transport)
    except ProtocolError as exc:  # ProtocolAbort included
        return ("abort", type(exc).__name__), set()
    return ("ok", out.aggregate.numpy().tobytes(), tuple(out.accepted)), set(out.rejected)


@settings(max_examples=15, deadline=None)
@given(secagg_scenarios(min_clients=4, max_clients=9, max_drop_fraction=0.0, slack=1),
       st.integers(0, 8), st.floats(0.0, 1.0))
def test_a_client_rejected_at_the_close_leaves_the_sum_as_if_it_never_sent(scn, liar_index, fraction) -> None:  # noqa: ANN001
    liar = scn.cohort[liar_index % len(scn.cohort)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(secagg_masking, "new_seed", lambda: FIXED_ROUNDING)
        lying = _ListsFewerPeers(liar, None, fraction)
        got, rejected = _round(scn, lying)
        if not lying.omitted:  # the liar stopped before masking (too few peers): nothing to compare
            return
        culprits = {liar, *lying.omitted}  # no client drops here: every omitted peer is live
        if got[0] == "ok":
            assert rejected == culprits
        # the same round in which the liar and the peers it omitted never sent their masked inputs
        never_sent, _ = _round(scn, DropAt(dict.fromkeys(culprits, "masked")))
    assert never_sent == got  # the same sum bit for bit and the same accepted clients, or both abort


def test_the_pool_reuses_returned_buffers_and_respects_its_cap() -> None:
    pool = VectorPool(max_bytes=3 * 40)
    a = pool.take(10, np.dtype(np.uint32))
    pool.give([a])
    assert pool.held_bytes == 40
    b = pool.take(10, np.dtype(np.uint32))
    assert b is a and pool.held_bytes == 0
    pool.give([pool.take(10, np.dtype(np.uint32)) for _ in range(5)])
    assert pool.held_bytes == 3 * 40  # the cap: the rest were freed
    pool.give([np.arange(10, dtype=np.uint32)[::2]])  # a view is never kept
    assert pool.held_bytes == 3 * 40
    assert pool.take(11, np.dtype(np.uint32)).shape == (11,)  # another length: a new buffer
    pool.clear()
    assert pool.held_bytes == 0


def test_the_server_keeps_no_masked_vector_after_the_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the unmask the held vectors are back in the pool and the server's state shows none."""
    pool = VectorPool()
    monkeypatch.setattr(secagg_server, "POOL", pool)
    rng = np.random.default_rng(1)
    layout = LayerLayout([("w.weight", (64,))])
    ups = [ClientUpdate(c, torch.from_numpy(rng.normal(0, 0.05, 64).astype(np.float32)), ("w",), 1.0)
           for c in range(5)]
    proto = SecAggPlus(neighbours=4, threshold=3)
    first = proto.run_round(0, ups, layout, defense=Mean())
    assert pool.held_bytes == 5 * 65 * 4  # the five held vectors (64 entries and the weight word)
    again = proto.run_round(1, ups, layout, defense=Mean())  # sums in the returned buffers
    assert pool.held_bytes == 5 * 65 * 4
    assert len(first.accepted) == len(again.accepted) == 5
    bound = float(first.extras["error_bound"]) + float(again.extras["error_bound"])  # two roundings
    assert float((first.aggregate.double() - again.aggregate.double()).abs().max()) <= bound
