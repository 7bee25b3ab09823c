"""SecureStrategy + securefml_mod over an in-process Grid: same aggregates as the in-process driver."""

from __future__ import annotations

import pytest  # noqa: I001

pytest.importorskip("flwr", reason="Flower is the optional extra: pip install 'securefml[flower]'")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from flwr.app import ConfigRecord, Message  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from securefml.defenses import make_defense  # noqa: E402
from securefml.flower import SecureStrategy, StrategyConfig, forget_halves  # noqa: E402
from securefml.flower.records import GLOBAL_KEY, PROTOCOL_KEY, read_stage, read_vector  # noqa: E402
from securefml.protocols.plaintext import Plaintext  # noqa: E402
from securefml.rounds import ClientUpdate, Transport  # noqa: E402
from tests.flower.halves_adapters import SecAggHalves  # noqa: E402
from tests.flower.helpers import LAYOUT, fixed_app, known_updates, local_grid  # noqa: E402


def _drive(strategy: SecureStrategy, grid, rounds: int = 1) -> None:  # type: ignore[no-untyped-def]
    arrays = ConfigRecord()
    for r in range(1, rounds + 1):
        msgs = strategy.configure_train(r, None, arrays, grid)  # type: ignore[arg-type]
        strategy.aggregate_train(r, grid.send_and_receive(msgs))


def _cohort_all(_r: int, ids):  # type: ignore[no-untyped-def]
    return ids


def _stage_of(msg: Message) -> str | None:
    return read_stage(msg).stage if PROTOCOL_KEY in msg.content.config_records else None


@pytest.fixture(autouse=True)
def _fresh_halves():  # type: ignore[no-untyped-def]
    forget_halves()
    yield
    forget_halves()


def test_plaintext_strategy_equals_in_process_round() -> None:
    n = 5
    ups = known_updates(n)
    weights = {c: float(c + 1) for c in range(n)}
    proto = Plaintext()
    defense = make_defense("mean")
    strat = SecureStrategy(proto, defense, LAYOUT, torch.zeros(LAYOUT.numel),
                           config=StrategyConfig(min_nodes=n, server_opt="sgd", server_lr=1.0), cohort_fn=_cohort_all)
    _drive(strat, local_grid(fixed_app(proto, ups, weights), n))
    ref = proto.run_round(0, [ClientUpdate(c, ups[c], LAYOUT.layer_names, weights[c]) for c in range(n)], LAYOUT,
                          defense=defense)
    rec = strat.history[0]
    assert rec.accepted == list(range(n)) and rec.stages == ["update"]
    torch.testing.assert_close(strat.model.vector, ref.aggregate)  # SGD lr 1 from zeros: the aggregate itself


def test_plaintext_robust_rule_and_a_node_that_never_answers() -> None:
    n = 6
    ups = known_updates(n)
    proto = Plaintext()
    defense = make_defense("median")
    strat = SecureStrategy(proto, defense, LAYOUT, torch.zeros(LAYOUT.numel),
                           config=StrategyConfig(min_nodes=n), cohort_fn=_cohort_all)
    grid = local_grid(fixed_app(proto, ups), n, offline=lambda node, msg: node == 103 and _stage_of(msg) is not None)
    _drive(strat, grid)
    rec = strat.history[0]
    assert rec.dropped == {3: "update"} and 3 not in rec.accepted
    alive = [c for c in range(n) if c != 3]
    ref = proto.run_round(0, [ClientUpdate(c, ups[c], LAYOUT.layer_names, 1.0) for c in alive], LAYOUT,
                          defense=defense)
    torch.testing.assert_close(strat.model.vector, ref.aggregate)


class _DropAt(Transport):
    def __init__(self, who: int, stage: str) -> None:
        self.who, self.stage = who, stage

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        return None if (sender, stage) == (self.who, self.stage) else data


@pytest.mark.parametrize("stage", ["share", "masked", "unmask"])
def test_secagg_over_flower_with_a_dropout_equals_in_process(stage: str) -> None:
    n = 8
    ups = known_updates(n, seed=1)
    proto = SecAggHalves(max_weight=1.0)
    defense = make_defense("mean")
    victim = 2
    strat = SecureStrategy(proto, defense, LAYOUT, torch.zeros(LAYOUT.numel),
                           config=StrategyConfig(min_nodes=n, max_weight=1.0), cohort_fn=_cohort_all)
    grid = local_grid(fixed_app(proto, ups), n,
                      offline=lambda node, msg: node == 100 + victim and _stage_of(msg) == stage)
    _drive(strat, grid)
    rec = strat.history[0]
    assert rec.dropped == {victim: stage}
    assert rec.stages == ["advertise", "share", "complaints", "masked", "unmask"]
    ref = SecAggPlus_round(ups, _DropAt(victim, stage))
    assert rec.accepted == list(ref.accepted)
    bound = 4 * float(ref.extras["error_bound"])  # type: ignore[arg-type]
    assert torch.allclose(strat.model.vector, ref.aggregate, atol=bound)
    assert strat.history[0].bytes_uploaded > 0


def SecAggPlus_round(ups, transport):  # type: ignore[no-untyped-def]
    from securefml.protocols.secagg import SecAggPlus

    proto = SecAggPlus(max_weight=1.0)
    return proto.run_round(0, [ClientUpdate(c, u, LAYOUT.layer_names, 1.0) for c, u in ups.items()], LAYOUT,
                           defense=make_defense("mean"), transport=transport)


def test_bucketed_secagg_with_a_robust_rule_on_bucket_means() -> None:
    from securefml.protocols.secagg import SecAggPlus

    n = 12
    ups = known_updates(n, seed=2)
    ups[0] = torch.full((LAYOUT.numel,), 0.9)  # an outlier the median of bucket means resists
    defense = make_defense("median")
    strat = SecureStrategy(SecAggHalves(buckets=3, max_weight=1.0), defense, LAYOUT, torch.zeros(LAYOUT.numel),
                           config=StrategyConfig(min_nodes=n, max_weight=1.0), cohort_fn=_cohort_all)
    _drive(strat, local_grid(fixed_app(SecAggHalves(buckets=3, max_weight=1.0), ups), n))
    ref = SecAggPlus(buckets=3, max_weight=1.0).run_round(
        0, [ClientUpdate(c, u, LAYOUT.layer_names, 1.0) for c, u in ups.items()], LAYOUT, defense=defense)
    assert strat.history[0].accepted == list(ref.accepted) == list(range(n))
    assert torch.allclose(strat.model.vector, ref.aggregate, atol=4 * float(ref.extras["error_bound"]))  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(victim=st.integers(0, 3), garbage=st.binary(max_size=200), flip=st.integers(0, 10_000))
def test_a_reply_the_adversary_rewrites_is_rejected_by_name_and_the_round_goes_on(
    victim: int, garbage: bytes, flip: int
) -> None:
    """The adversary replaces one client's reply bytes (garbage, or one flipped byte) on the wire."""
    forget_halves()
    n = 4
    ups = known_updates(n, seed=3)
    proto = Plaintext()

    class Rewrite(Transport):
        def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
            if sender != victim:
                return data
            if garbage:
                return garbage
            b = bytearray(data)
            b[flip % len(b)] ^= 0x01
            return bytes(b)

    strat = SecureStrategy(proto, make_defense("mean"), LAYOUT, torch.zeros(LAYOUT.numel),
                           config=StrategyConfig(min_nodes=n), cohort_fn=_cohort_all, transport=Rewrite())
    _drive(strat, local_grid(fixed_app(proto, ups), n))
    rec = strat.history[0]
    honest = [c for c in range(n) if c != victim]
    assert set(honest) <= set(rec.accepted)
    if victim not in rec.accepted:  # a flipped bit inside the float payload decodes: it is then just another value
        assert victim in rec.rejected and "Error" in rec.rejected[victim]
        mean = torch.stack([ups[c] for c in honest]).mean(0)
        torch.testing.assert_close(strat.model.vector, mean)
    assert all(math.isfinite(float(x)) for x in strat.model.vector[:3])


def test_a_reply_for_another_stage_or_party_is_rejected_before_the_protocol() -> None:
    n = 3
    ups = known_updates(n)
    proto = Plaintext()
    app = fixed_app(proto, ups)

    def lying_app(msg, ctx):  # type: ignore[no-untyped-def]
        reply = app(msg, ctx)
        ours = reply.has_content() and PROTOCOL_KEY in reply.content.config_records
        if ctx.node_config["partition-id"] == 1 and ours:
            reply.content[PROTOCOL_KEY]["party"] = 0  # claims to answer for client 0
        return reply

    from securefml.flower import LocalGrid

    grid = LocalGrid({100 + c: lying_app for c in range(n)},  # type: ignore[misc]
                     {100 + c: {"partition-id": c} for c in range(n)})
    strat = SecureStrategy(proto, make_defense("mean"), LAYOUT, torch.zeros(LAYOUT.numel),
                           config=StrategyConfig(min_nodes=n), cohort_fn=_cohort_all)
    _drive(strat, grid)
    rec = strat.history[0]
    assert rec.accepted == [0, 2] and "ProtocolError" in rec.rejected[1]


def test_the_global_model_rides_in_the_first_stage_only() -> None:
    n = 4
    ups = known_updates(n)
    proto = SecAggHalves(max_weight=1.0)
    seen: list[tuple[str, bool]] = []
    inner = fixed_app(proto, ups)

    def spy(msg, ctx):  # type: ignore[no-untyped-def]
        if PROTOCOL_KEY in msg.content.config_records:
            has = GLOBAL_KEY in msg.content.array_records
            seen.append((read_stage(msg).stage, has))
            if has:
                assert read_vector(msg.content, GLOBAL_KEY, length=LAYOUT.numel).shape == (LAYOUT.numel,)
        return inner(msg, ctx)

    from securefml.flower import LocalGrid

    grid = LocalGrid({100 + c: spy for c in range(n)}, {100 + c: {"partition-id": c} for c in range(n)})  # type: ignore[misc]
    strat = SecureStrategy(proto, make_defense("mean"), LAYOUT, torch.zeros(LAYOUT.numel),
                           config=StrategyConfig(min_nodes=n, max_weight=1.0), cohort_fn=_cohort_all)
    _drive(strat, grid)
    assert {s for s, has in seen if has} == {"advertise"}
    assert {s for s, has in seen if not has} == {"share", "complaints", "masked", "unmask"}
