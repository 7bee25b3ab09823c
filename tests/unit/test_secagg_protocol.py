"""SecAgg+ end to end over the in-memory driver and by hand over the two halves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.defenses.base import AggregationResult, Defense
from securefml.defenses.mean import Mean
from securefml.errors import ConfigError, DecryptionError, ProtocolAbort, ProtocolError, ReplayError
from securefml.protocols import shamir
from securefml.protocols.base import ClientUpdate, Reveals, Transport
from securefml.protocols.secagg import SecAggPlus
from securefml.protocols.secagg_client import SecAggClient
from securefml.protocols.secagg_messages import SERVER_ID
from securefml.protocols.secagg_server import SecAggServer
from securefml.protocols.wire import Envelope, decode, encode
from securefml.testing.secagg_strategies import DropAt, Replay, Tamper
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("a.weight", (4, 3)), ("a.bias", (4,)), ("b.weight", (5,))])


def updates(n: int, seed: int = 0, layers: tuple[str, ...] = ("a", "b")) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    m = LAYOUT.numel_of(layers)
    return [ClientUpdate(i, torch.rand(m, generator=g) - 0.5, layers, float(1 + i % 4)) for i in range(n)]


def plain_mean(ups: list[ClientUpdate], ids: set[int]) -> torch.Tensor:
    chosen = [u for u in ups if u.client_id in ids]
    w = sum(u.weight for u in chosen)
    return (sum(u.weight * u.vector.double() for u in chosen) / w).float()


class CoordinateMedian(Defense):
    """A coordinate-wise rule (needs coordinates: plaintext or buckets)."""

    name = "median"

    def aggregate(self, updates, weights, client_ids, *, context):  # noqa: ANN001, ANN201
        return AggregationResult(updates.median(0).values, client_ids)


def test_plain_sum_equals_the_weighted_mean_within_the_bound() -> None:
    ups = updates(9)
    proto = SecAggPlus()
    out = proto.run_round(0, ups, LAYOUT, defense=Mean())
    assert out.accepted == tuple(range(9)) and out.rejected == {}
    bound = out.extras["error_bound"]
    assert 0 < bound < 1e-6
    assert torch.allclose(out.aggregate, plain_mean(ups, set(range(9))), atol=bound + 1e-7)
    assert out.layer_weight["a"] == pytest.approx(sum(u.weight for u in ups), rel=1e-8)
    assert proto.reveals == Reveals.SUM


def test_upload_is_close_to_four_bytes_per_entry() -> None:
    big = LayerLayout([("w.weight", (20_000,))])
    g = torch.Generator().manual_seed(1)
    ups = [ClientUpdate(i, torch.rand(20_000, generator=g), ("w",)) for i in range(6)]
    out = SecAggPlus().run_round(0, ups, big, defense=Mean())
    assert out.bytes_uploaded / (6 * 4 * 20_000) < 1.02
    out16 = SecAggPlus(bits=16).run_round(0, ups, big, defense=Mean())
    assert out16.bytes_uploaded / (6 * 2 * 20_000) < 1.04
    assert torch.allclose(out16.aggregate, plain_mean(ups, set(range(6))), atol=out16.extras["error_bound"] + 1e-6)


def test_partial_layers_are_scattered_into_the_full_layout() -> None:
    ups = updates(5, layers=("b",))
    out = SecAggPlus().run_round(0, ups, LAYOUT, defense=Mean())
    assert out.aggregate.shape == (LAYOUT.numel,)
    assert out.layer_weight["a"] == 0.0 and out.layer_weight["b"] > 0
    assert torch.all(LAYOUT.gather(out.aggregate, ("a",)) == 0)


def test_a_client_naming_other_layers_is_rejected_by_name_and_the_round_goes_on() -> None:
    """The server sees no update before the round, so clients name their layers (``layers``
    stage); a client naming another set than most is rejected by name (it used to be a
    ``ConfigError`` raised by a driver that read every update)."""
    ups = updates(5)
    ups[2] = ClientUpdate(2, torch.zeros(LAYOUT.numel_of(("a",))), ("a",))
    out = SecAggPlus().run_round(0, ups, LAYOUT, defense=Mean())
    assert set(out.rejected) == {2} and "same layers" in out.rejected[2] and "sender 2" in out.rejected[2]
    kept = set(range(5)) - {2}
    assert set(out.accepted) == kept
    assert torch.allclose(out.aggregate, plain_mean(ups, kept), atol=out.extras["error_bound"] + 1e-7)


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="cannot run under protocol"):
        SecAggPlus().run_round(0, updates(5), LAYOUT, defense=CoordinateMedian())
    with pytest.raises(ConfigError):
        SecAggPlus(bits=4)
    with pytest.raises(ConfigError):
        SecAggPlus(neighbours=4, threshold=2).graph_params(10)


@pytest.mark.parametrize("stage", ["advertise", "share", "masked", "unmask"])
def test_dropouts_at_every_stage(stage: str) -> None:
    ups = updates(10, seed=2)
    proto = SecAggPlus(dropout_fraction=0.2)
    out = proto.run_round(1, ups, LAYOUT, defense=Mean(), transport=DropAt({3: stage, 7: stage}))
    kept = set(range(10)) if stage == "unmask" else set(range(10)) - {3, 7}
    assert set(out.accepted) == kept and out.rejected == {}
    assert torch.allclose(out.aggregate, plain_mean(ups, kept), atol=out.extras["error_bound"] + 1e-7)


def test_below_threshold_aborts_before_reconstructing_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = shamir.reconstruct
    monkeypatch.setattr(shamir, "reconstruct", lambda *a, **k: calls.append(1) or real(*a, **k))
    ups = updates(6)
    drops = dict.fromkeys(range(1, 6), "unmask")  # only client 0 answers: every secret lacks t shares
    with pytest.raises(ProtocolAbort, match="nothing was unmasked"):
        SecAggPlus(neighbours=5, threshold=3).run_round(0, ups, LAYOUT, defense=Mean(), transport=DropAt(drops))
    assert calls == []


def test_tampered_sealed_share_rejects_its_sender_by_name() -> None:
    ups = updates(10, seed=4)
    # flip the last byte of client 5's share message: the tag of its last sealed share
    out = SecAggPlus(dropout_fraction=0.2).run_round(0, ups, LAYOUT, defense=Mean(), transport=Tamper(5, "share"))
    assert set(out.rejected) == {5}
    assert out.rejected[5].startswith("DecryptionError") and "sender 5" in out.rejected[5]
    kept = set(range(10)) - {5}
    assert set(out.accepted) == kept
    assert torch.allclose(out.aggregate, plain_mean(ups, kept), atol=out.extras["error_bound"] + 1e-7)


def test_replay_from_another_round_names_the_sender() -> None:
    ups = updates(8, seed=5)
    proto = SecAggPlus(dropout_fraction=0.2)
    transport = Replay()
    proto.run_round(0, ups, LAYOUT, defense=Mean(), transport=transport)
    transport.arm(6, "masked")
    out = proto.run_round(1, ups, LAYOUT, defense=Mean(), transport=transport)
    assert out.rejected[6].startswith("ReplayError") and "sender 6" in out.rejected[6]
    assert 6 not in out.accepted


def test_noise_hook_runs_on_the_client_before_masking() -> None:
    ups = updates(6, seed=6)
    out = SecAggPlus(noise_fn=lambda x: x + 0.25).run_round(0, ups, LAYOUT, defense=Mean())
    assert torch.allclose(out.aggregate, plain_mean(ups, set(range(6))) + 0.25, atol=out.extras["error_bound"] + 1e-6)


def test_bucketed_mode_runs_the_rule_on_bucket_means() -> None:
    ups = updates(12, seed=7)
    proto = SecAggPlus(buckets=3)
    assert proto.reveals == Reveals.BUCKETS
    out = proto.run_round(2, ups, LAYOUT, defense=CoordinateMedian())
    buckets = out.extras["buckets"]
    assert sorted(c for b in buckets.values() for c in b) == list(range(12)) and len(buckets) == 4
    means = torch.stack([plain_mean(ups, set(b)) for b in buckets.values()])
    assert torch.allclose(out.aggregate, means.median(0).values, atol=out.extras["error_bound"] + 1e-6)
    again = SecAggPlus(buckets=3).run_round(2, ups, LAYOUT, defense=Mean())
    assert again.extras["buckets"] == buckets  # public, per-round partition


def test_signatures_and_consistency_round() -> None:
    ups = updates(8, seed=8)
    out = SecAggPlus(signatures=True, dropout_fraction=0.2).run_round(
        0, ups, LAYOUT, defense=Mean(), transport=DropAt({2: "consistency", 4: "masked"})
    )
    assert set(out.accepted) == set(range(8)) - {4}
    assert torch.allclose(out.aggregate, plain_mean(ups, set(out.accepted)), atol=out.extras["error_bound"] + 1e-7)


def test_forged_advertisement_is_caught_by_its_signature() -> None:
    class SwapKey(Transport):
        def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
            if sender == 3 and stage == "advertise":
                env = decode(data)
                fields = dict(env.fields)
                fields["s_pk"] = bytes(32 - 1) + b"\x09"  # a server-chosen key
                return encode(Envelope(env.kind, env.round, env.sender, fields))
            return data

    out = SecAggPlus(signatures=True).run_round(0, updates(6), LAYOUT, defense=Mean(), transport=SwapKey())
    assert out.rejected[3].startswith("DecryptionError") and "sender 3" in out.rejected[3]


def _drive_to_masked(proto: SecAggPlus, n: int) -> tuple[SecAggServer, dict[int, SecAggClient]]:
    plan = proto.plan(0, list(range(n)), 3, max_weight=1.0)
    server = SecAggServer(plan)
    clients = {c: SecAggClient(c, plan, identity=proto.identity(c)) for c in plan.cohort}
    for c, cl in clients.items():
        server.receive_advertise(c, cl.advertise())
    for c, cl in clients.items():
        server.receive_share(c, cl.share(server.keys_for(c)))
    for c, cl in clients.items():
        server.receive_complaints(c, cl.complain(server.shares_for(c)))
    server.close_complaints()
    for c, cl in clients.items():
        server.receive_masked(c, cl.masked(server.exclusions_for(c), np.ones(3, np.float32), 1.0))
    server.close_masked()
    return server, clients


def test_a_server_lying_about_who_dropped_is_caught() -> None:
    """The server tells clients 0 and 1 that client 5 dropped (to get its key shares from them
    while the others reveal its seed shares).  The signed consistency round exposes the lie."""
    proto = SecAggPlus(signatures=True, neighbours=5, threshold=3)
    server, clients = _drive_to_masked(proto, 6)
    honest = server.survivors_for(0)
    ids = b"".join(i.to_bytes(4, "big") for i in [0, 1, 2, 3, 4])
    lie = encode(Envelope("secagg/survivors", 0, SERVER_ID, {"alive": ids}))
    for c, cl in clients.items():
        sig = decode(cl.consistency(lie if c in (0, 1) else honest)).field("sig")
        server.state.sigs[c] = sig  # a lying server forwards whatever it got
    with pytest.raises(DecryptionError) as info:
        clients[2].unmask(server.request_for(2))
    assert info.value.sender in (0, 1)
    with pytest.raises(ProtocolError):  # client 0 sees the honest list, not the one it signed
        clients[0].unmask(server.request_for(0))


def test_client_refuses_stages_out_of_order() -> None:
    proto = SecAggPlus()
    plan = proto.plan(0, [0, 1, 2], 2, max_weight=1.0)
    cl = SecAggClient(0, plan)
    with pytest.raises(ProtocolError, match="out of order"):
        cl.share(b"")
    cl.advertise()
    with pytest.raises(ReplayError):
        other = SecAggServer(proto.plan(1, [0, 1, 2], 2, max_weight=1.0))
        cl.share(other.keys_for(0))


def test_secure_sum_drives_the_same_halves_and_reports_dropouts() -> None:
    """``secure_sum`` (kept for code that needs the raw weighted sum) is the halves + ``simulate``."""
    ups = updates(6, seed=9)
    proto = SecAggPlus(dropout_fraction=0.3)
    plan = proto.plan(0, range(6), LAYOUT.numel_of(("a", "b")), max_weight=4.0)
    res = proto.secure_sum(plan, {u.client_id: (u.vector, u.weight) for u in ups}, transport=DropAt({4: "masked"}))
    assert res.aborted is None and res.contributors == (0, 1, 2, 3, 5) and res.weighted_sum is not None
    mean = torch.from_numpy(res.weighted_sum / res.total_weight).float()
    assert torch.allclose(mean, plain_mean(ups, set(res.contributors)), atol=res.error_bound + 1e-7)
    assert res.total_weight == sum(u.weight for u in ups if u.client_id != 4)  # integer weights decode exactly
    assert res.bytes_uploaded > 5 * 4 * plan.length and res.rejected == {}
    short = proto.secure_sum(plan, {u.client_id: (u.vector, u.weight) for u in ups},
                             transport=DropAt(dict.fromkeys(range(1, 6), "unmask")))
    assert short.weighted_sum is None and short.aborted is not None and "nothing was unmasked" in short.aborted


def test_round_stats_reach_the_record_as_plain_values() -> None:
    out = SecAggPlus(buckets=3).run_round(0, updates(12, seed=3), LAYOUT, defense=CoordinateMedian())
    for key in ("params", "buckets", "aborted_buckets", "bucket_index", "clipped_fraction", "timings",
                "weights_clipped", "flagged_buckets"):
        assert key in out.extras, key
    assert out.extras["params"] == [list(p) for p in out.extras["params"]] and len(out.extras["params"]) == 4
    assert out.extras["bucket_index"] == [0, 1, 2, 3] and out.extras["aborted_buckets"] == {}
    assert out.extras["weights_clipped"] == 0 and out.extras["timings"]["server_s"] > 0


def test_masked_vector_of_zeros_looks_uniform() -> None:
    """Chi-square over byte values of a masked all-zero input (255 dof; p > 1e-4 threshold)."""
    proto = SecAggPlus()
    plan = proto.plan(0, [0, 1, 2, 3], 50_000, max_weight=1.0)
    server = SecAggServer(plan)
    clients = {c: SecAggClient(c, plan) for c in plan.cohort}
    for c, cl in clients.items():
        server.receive_advertise(c, cl.advertise())
    for c, cl in clients.items():
        server.receive_share(c, cl.share(server.keys_for(c)))
    for c, cl in clients.items():
        server.receive_complaints(c, cl.complain(server.shares_for(c)))
    server.close_complaints()
    msg = clients[0].masked(server.exclusions_for(0), np.zeros(50_000, np.float32), 1.0)
    payload = np.frombuffer(decode(msg).field("vector")[2:], np.uint8)
    counts = np.bincount(payload, minlength=256)
    expected = payload.size / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 350.0  # 255 dof: P[chi2 > 350] < 1e-4
    assert math.isfinite(chi2)


class _GarbleLayers(Transport):
    def __init__(self, victim: int, junk: bytes) -> None:
        self.victim, self.junk = victim, junk

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        return self.junk if (sender == self.victim and stage == "layers") else data


@settings(max_examples=15, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 5))
def test_any_bytes_at_the_layers_stage_reject_only_their_sender(junk: bytes, victim: int) -> None:
    ups = updates(6, seed=11)
    out = SecAggPlus(dropout_fraction=0.3).run_round(0, ups, LAYOUT, defense=Mean(),
                                                     transport=_GarbleLayers(victim, junk))
    assert set(out.rejected) == {victim} and f"sender {victim}" in out.rejected[victim]
    kept = set(range(6)) - {victim}
    assert set(out.accepted) == kept
    assert torch.allclose(out.aggregate, plain_mean(ups, kept), atol=out.extras["error_bound"] + 1e-7)


def test_a_client_refuses_a_plan_for_other_layers_than_it_uploads() -> None:
    from securefml.protocols.secagg_halves import SecAggClientHalf

    proto = SecAggPlus()
    half = proto.client_half(0, LAYOUT, updates(3)[0])
    other = proto.plan(0, [0, 1, 2], LAYOUT.numel_of(("b",)), max_weight=4.0, layout=LAYOUT, layers=("b",))
    assert isinstance(half, SecAggClientHalf)
    with pytest.raises(ProtocolError, match="other layers"):
        half.respond("advertise", other.to_bytes())
