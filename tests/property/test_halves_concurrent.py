"""The driver's concurrent replies give the sequential round, whatever the clients and transport do.

``halves.simulate`` may compute one stage's replies on a thread pool (issue 15).  Hypothesis
drives every party of a toy protocol (which stages it answers, raises a ``ProtocolError`` or an
``InvalidUpdateError`` at, sends a reply the server refuses at; how long each reply takes, so
replies finish out of order) and a transport that drops replies; the server, the transport and
the transcript must see exactly what the sequential driver gives them, in the same order.  Then
real SecAgg+ rounds (real X25519, AES-CTR masks, Shamir) under dropouts and a tampered masked
input: the threaded round reveals the same sum, bit for bit, and rejects the same clients.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import securefml.protocols.base as protocols_base
import securefml.protocols.secagg_halves as secagg_halves
import securefml.protocols.secagg_masking as secagg_masking
from securefml.defenses.mean import Mean
from securefml.errors import ConfigError, InvalidUpdateError, ProtocolError
from securefml.protocols import halves
from securefml.protocols.base import ClientUpdate, Transport
from securefml.protocols.halves import ClientHalf, ServerHalf, StageMessages, Transcript, simulate
from securefml.protocols.secagg import SecAggPlus
from securefml.reveals import Revealed
from securefml.testing.secagg_strategies import DropAt, secagg_scenarios
from securefml.updates import LayerLayout

STAGES = ("a", "b", "c")
ACTIONS = ("ok", "ok", "ok", "protocol_error", "invalid_update", "refused", "runtime_error_never")


class _Log:
    """What the toy server saw, in order (the toy protocol's revealed value)."""

    def __init__(self, events: tuple[tuple[str, int, bytes], ...]) -> None:
        self.events = events


class _Server(ServerHalf):
    def __init__(self, parties: tuple[int, ...]) -> None:
        self.parties = parties
        self.at = -1
        self.live = set(parties)
        self.events: list[tuple[str, int, bytes]] = []

    def next_stage(self) -> StageMessages | None:
        self.at += 1
        if self.at >= len(STAGES):
            return None
        stage = STAGES[self.at]
        return StageMessages(stage, {p: f"{stage}:{p}".encode() for p in sorted(self.live)})

    def receive(self, party: int, data: bytes) -> None:
        self.events.append(("receive", party, data))
        if data.endswith(b"!refused"):
            raise ProtocolError("refused by the server", sender=party)

    def reject(self, party: int, error: ProtocolError | InvalidUpdateError) -> None:
        self.events.append(("reject", party, str(error).encode()))
        self.live.discard(party)

    def close_stage(self) -> None:
        self.events.append(("close", -1, STAGES[self.at].encode()))

    def revealed(self) -> Revealed:
        return _Log(tuple(self.events))  # type: ignore[return-value]


class _Client(ClientHalf):
    def __init__(self, party: int, plan: Mapping[str, tuple[str, bool, float]]) -> None:
        self.party = party
        self.plan = plan  # stage -> (action, concurrent, seconds)
        self.threads: set[str] = set()
        self.cpus: list[int] = []

    def concurrent(self, stage: str) -> bool:
        return self.plan[stage][1]

    def respond(self, stage: str, message: bytes) -> bytes:
        action, _, seconds = self.plan[stage]
        self.threads.add(threading.current_thread().name)
        self.cpus.append(halves.reply_cpus())
        time.sleep(seconds)  # releases the GIL: replies finish out of party order
        if action == "protocol_error":
            raise ProtocolError("the server deviated", sender=-1)
        if action == "invalid_update":
            raise InvalidUpdateError("bad update", sender=self.party)
        return message + (b"!refused" if action == "refused" else b"!ok")


class _RecordingTransport(Transport):
    def __init__(self, drops: frozenset[tuple[int, str]]) -> None:
        self.drops = drops
        self.calls: list[tuple[int, str, bytes]] = []

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        self.calls.append((sender, stage, data))
        return None if (sender, stage) in self.drops else data


@st.composite
def _rounds(draw: st.DrawFn) -> tuple[dict[int, dict[str, tuple[str, bool, float]]], frozenset, frozenset]:
    parties = draw(st.lists(st.integers(0, 40), min_size=1, max_size=8, unique=True))
    plans = {
        p: {s: (draw(st.sampled_from(ACTIONS[:-1])), draw(st.booleans()), draw(st.sampled_from((0.0, 0.001, 0.003))))
            for s in STAGES}
        for p in parties
    }
    missing = frozenset(draw(st.sets(st.sampled_from(parties), max_size=2)))
    drops = frozenset(draw(st.sets(st.tuples(st.sampled_from(parties), st.sampled_from(STAGES)), max_size=3)))
    return plans, missing, drops


def _drive(plans, missing, drops, workers):  # noqa: ANN001, ANN202
    server = _Server(tuple(sorted(plans)))
    clients = {p: _Client(p, plan) for p, plan in plans.items() if p not in missing}
    transport = _RecordingTransport(drops)
    seen = Transcript()
    log = simulate(server, clients, transport=transport, transcript=seen, workers=workers)
    assert isinstance(log, _Log)
    return log.events, transport.calls, seen, clients


@settings(max_examples=60, deadline=None)
@given(_rounds(), st.sampled_from((2, 3, 8)))
def test_concurrent_replies_give_the_sequential_round(rnd, workers) -> None:  # noqa: ANN001
    plans, missing, drops = rnd
    events1, calls1, seen1, _ = _drive(plans, missing, drops, 1)
    events_n, calls_n, seen_n, clients = _drive(plans, missing, drops, workers)
    assert events_n == events1  # every receive, rejection and close, in the same order
    assert calls_n == calls1  # the transport is called in the same order with the same bytes
    for name in ("bytes_to_server", "bytes_to_clients", "dropped", "client_errors", "rejected"):
        assert getattr(seen_n, name) == getattr(seen1, name), name
    assert [s.stage for s in seen_n.stages] == [s.stage for s in seen1.stages]
    assert all(s.pool_threads == 0 for s in seen1.stages)
    for stage_times in seen_n.stages:
        assert stage_times.pool_threads <= workers
        assert stage_times.cpu_s >= 0 and stage_times.busiest_thread_cpu_s >= 0
    for c in clients.values():  # only replies whose half allows it ran off the driver's thread
        if not any(conc for _, conc, _ in c.plan.values()):
            assert all(not name.startswith("halves-reply") for name in c.threads)
        assert all(1 <= cpus <= halves.available_cpus() for cpus in c.cpus)


def test_a_stage_with_two_concurrent_replies_uses_the_pool_and_shares_the_cpus() -> None:
    plans = {p: dict.fromkeys(STAGES, ("ok", True, 0.002)) for p in range(4)}
    _, _, seen, clients = _drive(plans, frozenset(), frozenset(), 2)
    assert [s.pool_threads for s in seen.stages] == [2, 2, 2]
    assert any(name.startswith("halves-reply") for c in clients.values() for name in c.threads)
    assert all(cpus == max(1, halves.available_cpus() // 2) for c in clients.values() for cpus in c.cpus)
    assert halves.reply_cpus() == halves.available_cpus()  # outside the pool: the whole process


def test_an_unexpected_error_propagates_after_every_reply_stopped() -> None:
    running: set[int] = set()

    class Boom(_Client):
        def respond(self, stage: str, message: bytes) -> bytes:
            running.add(self.party)
            try:
                time.sleep(0.01)
                if self.party == 1:
                    raise RuntimeError("a bug, not a protocol error")
                return message
            finally:
                running.discard(self.party)

    clients = {p: Boom(p, dict.fromkeys(STAGES, ("ok", True, 0.0))) for p in range(5)}
    with pytest.raises(RuntimeError, match="a bug"):
        simulate(_Server(tuple(range(5))), clients, workers=3)
    assert not running  # the pool was shut down before the error left the driver


def test_workers_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="workers"):
        simulate(_Server((0,)), {}, workers=0)


# -- real SecAgg+ rounds -------------------------------------------------------------------------------
FIXED_ROUNDING = b"\x5a" * 32  # the same rounding key in both runs: the revealed sums are comparable bit for bit


def _secagg_round(scn, transport, workers, monkeypatch):  # noqa: ANN001, ANN202
    monkeypatch.setattr(secagg_masking, "new_seed", lambda: FIXED_ROUNDING)
    monkeypatch.setattr(secagg_halves, "MIN_WORDS_PER_WORKER", 0)  # small test vectors: run concurrently anyway
    monkeypatch.setattr(protocols_base, "simulate", functools.partial(simulate, workers=workers))
    layout, ups = scn.round_inputs()
    proto = SecAggPlus(neighbours=scn.k, threshold=scn.t, max_weight=128.0)
    try:
        out = proto.run_round(0, ups, layout, defense=Mean(), transport=transport)
    except ProtocolError as exc:  # ProtocolAbort included: compared by type and text
        return ("abort", type(exc).__name__, str(exc))
    return ("ok", out.aggregate.numpy().tobytes(), tuple(out.accepted), dict(out.rejected))


class _FlipHeader(Transport):
    """Drops as ``DropAt``, and flips one header byte of ``victim``'s message at ``stage``."""

    def __init__(self, drops: Mapping[int, str], victim: int | None, stage: str, byte: int) -> None:
        self.drops = DropAt(drops)
        self.victim, self.stage, self.byte = victim, stage, byte

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        got = self.drops.deliver(sender, stage, data)
        if got is None or sender != self.victim or stage != self.stage:
            return got
        buf = bytearray(got)
        buf[self.byte] ^= 0x01
        return bytes(buf)


@settings(max_examples=12, deadline=None)
@given(secagg_scenarios(min_clients=4, max_clients=9, max_drop_fraction=0.3, slack=2),
       st.one_of(st.none(), st.integers(0, 8)), st.sampled_from(("share", "complaints", "masked", "unmask")),
       st.integers(0, 7))
def test_threaded_secagg_round_equals_the_sequential_round(scn, victim_index, stage, byte) -> None:  # noqa: ANN001
    victim = None if victim_index is None else scn.cohort[victim_index % len(scn.cohort)]
    with pytest.MonkeyPatch.context() as mp:
        seq = _secagg_round(scn, _FlipHeader(scn.drops, victim, stage, byte), 1, mp)
        threaded = _secagg_round(scn, _FlipHeader(scn.drops, victim, stage, byte), 3, mp)
    assert threaded == seq


def test_secagg_masked_stage_runs_on_the_pool_for_large_vectors() -> None:
    """The default rule: the masked stage of a large vector is pooled, small vectors are not."""
    rng = np.random.default_rng(0)
    for length, pooled in ((secagg_masking.MIN_WORDS_PER_WORKER // 5 + 1, True), (1000, False)):
        layout = LayerLayout([("w.weight", (length,))])
        ups = [ClientUpdate(c, torch.from_numpy(rng.normal(0, 0.05, length).astype(np.float32)), ("w",), 1.0)
               for c in range(4)]
        proto = SecAggPlus(neighbours=3, threshold=2)
        setup = proto.halves_setup(Mean())
        _, transcript, _ = proto.collect(0, ups, layout, setup=setup)
        masked = [s for s in transcript.stages if s.stage == "masked"]
        assert len(masked) == 1
        assert (masked[0].pool_threads > 0) == (pooled and halves.available_cpus() > 1)


def test_secagg_halves_with_a_noise_hook_answer_on_the_drivers_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A distributed-DP hook may share one noise source among clients: never run it concurrently."""
    monkeypatch.setattr(secagg_halves, "MIN_WORDS_PER_WORKER", 0)
    rng = np.random.default_rng(1)
    layout = LayerLayout([("w.weight", (64,))])
    ups = [ClientUpdate(c, torch.from_numpy(rng.normal(0, 0.05, 64).astype(np.float32)), ("w",), 1.0)
           for c in range(4)]
    for hooked in (False, True):
        proto = SecAggPlus(neighbours=3, threshold=2)
        if hooked:
            proto.ring_noise = lambda job: np.zeros(job.vector.size + 1, dtype=np.int64)
        _, transcript, _ = proto.collect(0, ups, layout, setup=proto.halves_setup(Mean()))
        masked = next(s for s in transcript.stages if s.stage == "masked")
        assert (masked.pool_threads == 0) == (hooked or halves.available_cpus() == 1)
