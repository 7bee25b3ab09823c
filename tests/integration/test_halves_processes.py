"""Protocol halves over bytes: one generic driver, and each client half in its own process.

The plaintext, SecAgg+ and CKKS halves are driven by ``securefml.protocols.halves.simulate`` and the
one aggregation step (``securefml.aggregation.aggregate``); the result must equal what the
protocol's own in-process ``run_round`` gives.  Then every client half runs in a separate
process that sees nothing but bytes from a pipe (for CKKS the key holder and the reference party
too), and the round must come out the same.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from multiprocessing.connection import Connection

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefml.aggregation import aggregate
from securefml.defenses import Mean, TrimmedMean
from securefml.errors import ProtocolError
from securefml.protocols import Plaintext, SecAggPlus
from securefml.protocols.base import ClientUpdate, Transport
from securefml.protocols.halves import ClientHalf, Transcript, simulate
from securefml.protocols.plaintext_halves import PlaintextClientHalf, PlaintextServerHalf
from securefml.protocols.secagg_halves import SecAggClientHalf, SecAggServerHalf
from securefml.reveals import RevealedSums, Reveals
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("a", (6,)), ("b", (4,))])
COHORT = (3, 5, 8, 13, 21)
ROUND = 2


def _update(c: int) -> ClientUpdate:
    g = torch.Generator().manual_seed(c)
    return ClientUpdate(c, 0.3 * torch.randn(LAYOUT.numel, generator=g), LAYOUT.layer_names, float(1 + c % 3))


# -- client halves built from plain values (so a child process can build its own) --------------
def _plaintext_half(c: int, _key: bytes | None) -> ClientHalf:
    return PlaintextClientHalf(_update(c), LAYOUT, round_idx=ROUND)


def _secagg_half(c: int, key: bytes | None) -> ClientHalf:
    u = _update(c)
    identity = Ed25519PrivateKey.from_private_bytes(key) if key is not None else None
    return SecAggClientHalf(c, u.vector, u.weight, round_idx=ROUND, identity=identity)


#: how long the server side waits for one reply from a child process
REPLY_TIMEOUT_S = 120.0
#: how long teardown waits for a child to exit on end-of-file before killing it (a forked child
#: holds copies of the earlier children's pipe ends, so it may never see end-of-file)
JOIN_TIMEOUT_S = 2.0


def _serve(build: Callable[[int, bytes | None], ClientHalf], c: int, key: bytes | None, conn: Connection) -> None:
    """A child process: one client half, bytes in and bytes out over ``conn`` until closed."""
    half = build(c, key)
    while True:
        try:
            stage = conn.recv_bytes().decode("ascii")
        except EOFError:
            return
        message = conn.recv_bytes()
        try:
            conn.send_bytes(b"\x00" + half.respond(stage, message))
        except ProtocolError as exc:
            conn.send_bytes(b"\x01" + str(exc).encode("utf-8"))


class PipeClient(ClientHalf):
    """The server side's handle on a client half running in another process."""

    def __init__(self, party: int, conn: Connection) -> None:
        self.party = party
        self.conn = conn

    def respond(self, stage: str, message: bytes) -> bytes:
        self.conn.send_bytes(stage.encode("ascii"))
        self.conn.send_bytes(message)
        if not self.conn.poll(REPLY_TIMEOUT_S):  # a dead or hung child fails the test, never hangs it
            raise AssertionError(f"party {self.party} gave no reply at {stage!r} within {REPLY_TIMEOUT_S} s")
        reply = self.conn.recv_bytes()
        if reply[:1] == b"\x01":
            raise ProtocolError(reply[1:].decode("utf-8"), sender=self.party)
        if reply[:1] == b"\x02":
            raise AssertionError(f"party {self.party} failed at {stage!r}: {reply[1:].decode('utf-8')}")
        return reply[1:]


def _in_processes(build: Callable[[int, bytes | None], ClientHalf], keys: dict[int, bytes | None],
                  run: Callable[[dict[int, ClientHalf]], object]) -> object:
    """Each cohort member's half built inside its own child process from plain values."""
    return _run_children({c: (_serve, (build, c, keys.get(c))) for c in COHORT}, run)


def _run_children(children: dict[int, tuple[Callable[..., None], tuple[object, ...]]],
                  run: Callable[[dict[int, ClientHalf]], object]) -> object:
    """Fork one child per party (``target(*args, conn)``), run the round against pipe handles, tear down."""
    ctx = mp.get_context("fork")
    procs, handles = [], {}
    try:
        for party, (target, args) in children.items():
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(*args, child), daemon=True)
            proc.start()
            child.close()
            procs.append(proc)
            handles[party] = PipeClient(party, parent)
        return run(handles)
    finally:
        for h in handles.values():
            h.conn.close()
        for proc in procs:
            proc.join(timeout=JOIN_TIMEOUT_S)
            if proc.is_alive():  # pragma: no cover - a hung child must not hang the suite
                proc.kill()


# -- plaintext -------------------------------------------------------------------------------
def _plaintext_round(clients: dict[int, ClientHalf], defense=None):  # type: ignore[no-untyped-def]
    revealed = simulate(PlaintextServerHalf(ROUND, LAYOUT, COHORT), clients)
    return aggregate(revealed, defense or TrimmedMean(f=1), LAYOUT)


def test_plaintext_halves_match_run_round() -> None:
    expected = Plaintext().run_round(ROUND, [_update(c) for c in COHORT], LAYOUT, defense=TrimmedMean(f=1))
    got = _plaintext_round({c: _plaintext_half(c, None) for c in COHORT})
    torch.testing.assert_close(got.aggregate, expected.aggregate)
    assert got.accepted == expected.accepted == COHORT


def test_plaintext_halves_in_separate_processes() -> None:
    expected = _plaintext_round({c: _plaintext_half(c, None) for c in COHORT})
    got = _in_processes(_plaintext_half, {}, _plaintext_round)
    torch.testing.assert_close(got.aggregate, expected.aggregate)  # type: ignore[attr-defined]


def test_plaintext_halves_reject_a_malformed_reply_and_go_on() -> None:
    class Truncate(Transport):  # plaintext has no MAC: a cut message is what it can detect
        def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
            return data[:-5] if sender == 8 else data

    seen = Transcript()
    revealed = simulate(PlaintextServerHalf(ROUND, LAYOUT, COHORT), {c: _plaintext_half(c, None) for c in COHORT},
                        transport=Truncate(), transcript=seen)
    assert 8 not in revealed.client_ids and 8 in seen.rejected and len(revealed.client_ids) == 4


def test_plaintext_client_refuses_a_plan_for_another_layout() -> None:
    other = LayerLayout([("a", (7,))])
    seen = Transcript()
    revealed = simulate(PlaintextServerHalf(ROUND, other, (3,)), {3: _plaintext_half(3, None)}, transcript=seen)
    assert revealed.client_ids == () and 3 in seen.client_errors


# -- SecAgg+ ---------------------------------------------------------------------------------
def _secagg(signatures: bool) -> tuple[SecAggPlus, object]:
    proto = SecAggPlus(signatures=signatures, clip_range=2.0)
    plan = proto.plan(ROUND, COHORT, LAYOUT.numel, max_weight=4.0, layout=LAYOUT, layers=LAYOUT.layer_names)
    return proto, plan


def _keys(proto: SecAggPlus, signatures: bool) -> dict[int, bytes | None]:
    return {c: proto.identity(c).private_bytes_raw() if signatures else None for c in COHORT}


@pytest.mark.parametrize("signatures", [False, True])
def test_secagg_halves_match_the_plain_weighted_mean(signatures: bool) -> None:
    proto, plan = _secagg(signatures)
    keys = _keys(proto, signatures)
    revealed = simulate(SecAggServerHalf(plan), {c: _secagg_half(c, keys[c]) for c in COHORT})  # type: ignore[arg-type]
    assert isinstance(revealed, RevealedSums) and revealed.kind is Reveals.SUM
    out = aggregate(revealed, Mean(), LAYOUT)
    ups = [_update(c) for c in COHORT]
    w = torch.tensor([u.weight for u in ups], dtype=torch.float64)
    expected = (torch.stack([u.vector.double() for u in ups]) * w[:, None]).sum(0) / w.sum()
    assert float((out.aggregate.double() - expected).abs().max()) <= revealed.error_bound
    assert out.accepted == COHORT


def test_secagg_halves_survive_a_dropout_after_sharing() -> None:
    proto, plan = _secagg(False)

    class DropAtMasked(Transport):
        def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
            return None if (sender == 13 and stage == "masked") else data

    seen = Transcript()
    revealed = simulate(SecAggServerHalf(plan), {c: _secagg_half(c, None) for c in COHORT},  # type: ignore[arg-type]
                        transport=DropAtMasked(), transcript=seen)
    assert isinstance(revealed, RevealedSums)
    assert revealed.contributors == (tuple(c for c in COHORT if c != 13),)
    assert seen.dropped == {13: "masked"}


def test_secagg_halves_in_separate_processes() -> None:
    proto, plan = _secagg(True)
    keys = _keys(proto, True)

    def run(clients: dict[int, ClientHalf]) -> RevealedSums:
        revealed = simulate(SecAggServerHalf(plan), clients)  # type: ignore[arg-type]
        assert isinstance(revealed, RevealedSums)
        return revealed

    in_process = run({c: _secagg_half(c, keys[c]) for c in COHORT})
    remote = _in_processes(_secagg_half, keys, run)
    assert isinstance(remote, RevealedSums)
    # fresh keys and masks each run, the same sum: equal within the quantization bound
    assert np.allclose(remote.sums[0].numpy(), in_process.sums[0].numpy(), atol=2 * in_process.error_bound * 8)
    assert remote.total_weights == pytest.approx(in_process.total_weights, abs=1e-6)
    assert remote.contributors == in_process.contributors == (COHORT,)


def test_the_aggregation_step_refuses_a_rule_the_reveal_cannot_serve() -> None:
    from securefml.errors import ConfigError

    proto, plan = _secagg(False)
    revealed = simulate(SecAggServerHalf(plan), {c: _secagg_half(c, None) for c in COHORT})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cannot run on what the protocol revealed"):
        aggregate(revealed, TrimmedMean(f=1), LAYOUT)


# -- CKKS: clients, key holder and reference party each in its own process ----------------------
def _serve_half(half: ClientHalf, conn: Connection) -> None:
    """A child process holding one already-built half (fork: nothing is pickled), bytes over ``conn``."""
    while True:
        try:
            stage = conn.recv_bytes().decode("ascii")
        except EOFError:
            return
        message = conn.recv_bytes()
        try:
            conn.send_bytes(b"\x00" + half.respond(stage, message))
        except ProtocolError as exc:
            conn.send_bytes(b"\x01" + str(exc).encode("utf-8"))
        except Exception as exc:  # any other failure is reported, never a silent dead child
            conn.send_bytes(b"\x02" + f"{type(exc).__name__}: {exc}".encode())
            return


def _halves_in_processes(parties: dict[int, ClientHalf], run: Callable[[dict[int, ClientHalf]], object]) -> object:
    """Each already-built half in its own forked child (fork: nothing is pickled)."""
    return _run_children({party: (_serve_half, (half,)) for party, half in parties.items()}, run)


@pytest.mark.parametrize("robust", [False, True])
def test_ckks_clients_and_key_holder_in_separate_processes(robust: bool) -> None:
    from securefml.aggregation import gram_combiner
    from securefml.defenses import FLTrust
    from securefml.protocols import CKKS
    from securefml.protocols.base import HalvesSetup
    from securefml.protocols.ckks import KEY_HOLDER_PARTY, REFERENCE_PARTY
    from securefml.protocols.ckks_stats import inner_product_error_bound, sum_error_bound

    proto = CKKS(preset="stats")
    ups = [_update(c) for c in COHORT]
    reference = 0.3 * torch.randn(LAYOUT.numel, generator=torch.Generator().manual_seed(99)) if robust else None
    defense = FLTrust() if robust else Mean()
    setup = HalvesSetup(defense, combine=gram_combiner(defense) if robust else None, reference=reference)
    halves = proto.round_halves(ROUND, ups, LAYOUT, setup=setup)
    assert KEY_HOLDER_PARTY in halves.services and (REFERENCE_PARTY in halves.services) is robust
    seen = Transcript()

    def run(parties: dict[int, ClientHalf]):  # type: ignore[no-untyped-def]
        return aggregate(simulate(halves.server, parties, transcript=seen), defense, LAYOUT)

    remote = _halves_in_processes(halves.parties(), run)
    assert not seen.client_errors and not seen.rejected and not seen.dropped
    # the same round in this process (next round: the key holder in the child kept its ledger)
    local = proto.run_round(ROUND + 1, ups, LAYOUT, defense=defense, reference=reference)
    assert remote.accepted == local.accepted == COHORT  # type: ignore[attr-defined]
    tol = 10 * sum_error_bound(len(COHORT), 1.0)
    assert float((remote.aggregate - local.aggregate).abs().max()) <= tol  # type: ignore[attr-defined]
    if not robust:
        w = torch.tensor([u.weight for u in ups], dtype=torch.float64)
        expected = (torch.stack([u.vector.double() for u in ups]) * w[:, None]).sum(0) / w.sum()
        assert float((remote.aggregate.double() - expected).abs().max()) <= tol  # type: ignore[attr-defined]
    else:
        bound = inner_product_error_bound(LAYOUT.numel, 2.0)
        g_remote, g_local = remote.extras["gram"], local.extras["gram"]  # type: ignore[attr-defined]
        assert torch.allclose(g_remote.inner, g_local.inner, atol=2 * bound)
        assert torch.allclose(g_remote.reference, g_local.reference, atol=2 * bound)
        torch.testing.assert_close(remote.defense.weights, local.defense.weights, atol=1e-3, rtol=0)  # type: ignore[attr-defined]


# -- SecAgg+ halves from the factory: the layers stage and buckets side by side ------------------
def _factory_half(c: int, _key: bytes | None) -> ClientHalf:
    return SecAggPlus(buckets=2, clip_range=2.0).client_half(ROUND, LAYOUT, _update(c))


def _factory_round(clients: dict[int, ClientHalf]) -> RevealedSums:
    from securefml.protocols.base import HalvesSetup

    server = SecAggPlus(buckets=2, clip_range=2.0).server_half(ROUND, LAYOUT, COHORT,
                                                               setup=HalvesSetup(defense=Mean(), max_weight=4.0))
    revealed = simulate(server, clients)
    assert isinstance(revealed, RevealedSums)
    return revealed


def test_secagg_factory_halves_with_buckets_in_separate_processes() -> None:
    """The factory's halves (``layers`` stage, then both buckets' sums in one server half) over pipes."""
    in_process = _factory_round({c: _factory_half(c, None) for c in COHORT})
    remote = _in_processes(_factory_half, {}, _factory_round)
    assert isinstance(remote, RevealedSums) and remote.kind is Reveals.BUCKETS
    assert remote.contributors == in_process.contributors and len(remote.contributors) == 2
    assert sorted(c for g in remote.contributors for c in g) == list(COHORT)
    by_id = {c: _update(c) for c in COHORT}
    for members, s, w in zip(remote.contributors, remote.sums, remote.total_weights):
        exact = sum(by_id[c].weight * by_id[c].vector.double().clamp(-2, 2) for c in members)
        assert w == sum(by_id[c].weight for c in members)  # integer weights decode exactly
        assert float((s / w - exact / w).abs().max()) <= remote.error_bound
