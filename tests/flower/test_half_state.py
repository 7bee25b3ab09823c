"""Multi-stage protocols when every message meets a fresh ClientApp process (a real SuperNode).

``fresh_process`` wraps a ClientApp so that, before each message, every half and key holder this
process holds is forgotten: only the node's ``Context.state`` survives, as on a SuperNode that
starts one ClientApp process per message.  SecAgg+ (five stages) and CKKS (key holder included)
must still give the in-process aggregate.
"""

from __future__ import annotations

import pytest  # noqa: I001

pytest.importorskip("flwr", reason="Flower is the optional extra: pip install 'securefml[flower]'")

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from flwr.app import ConfigRecord, Context, Message  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from securefml.defenses import make_defense  # noqa: E402
from securefml.errors import MalformedMessageError  # noqa: E402
from securefml.flower import LocalGrid, SecureStrategy, StrategyConfig, forget_halves  # noqa: E402
from securefml.flower.ckks_parties import KEY_HOLDER_ROLE, ROLE_KEY, CKKSDeployment, forget_parties  # noqa: E402
from securefml.flower.client import HALF_STATE_KEY  # noqa: E402
from securefml.flower.half_state import MAGIC, dump_half, load_half  # noqa: E402
from securefml.flower.records import PROTOCOL_KEY, read_stage  # noqa: E402
from securefml.protocols.ckks import CKKS  # noqa: E402
from securefml.protocols.ckks_params import KEY_HOLDER_PARTY  # noqa: E402
from securefml.protocols.secagg import SecAggPlus  # noqa: E402
from securefml.rounds import ClientUpdate  # noqa: E402
from tests.flower.helpers import LAYOUT, fixed_app, known_updates  # noqa: E402

N = 6
KEY_NODE = 999


def fresh_process(app, seen: list[str]):  # type: ignore[no-untyped-def]
    """``app`` with this process's memory of halves and key holders wiped before every message."""
    def call(msg: Message, ctx: Context) -> Message:
        forget_halves()
        forget_parties()
        if msg.has_content() and PROTOCOL_KEY in msg.content.config_records:
            seen.append(read_stage(msg).stage)
        return app(msg, ctx)

    return call


def _drive(strat: SecureStrategy, grid: LocalGrid, rounds: int = 1) -> None:
    for r in range(1, rounds + 1):
        msgs = strat.configure_train(r, None, ConfigRecord(), grid)  # type: ignore[arg-type]
        strat.aggregate_train(r, grid.send_and_receive(msgs))


pytestmark = pytest.mark.usefixtures("forget_flower_memory")


def test_secagg_with_a_fresh_process_per_message_equals_in_process() -> None:
    ups = known_updates(N, seed=5)
    proto = SecAggPlus(max_weight=1.0)
    seen: list[str] = []
    app = fresh_process(fixed_app(proto, ups), seen)
    grid = LocalGrid({100 + c: app for c in range(N)}, {100 + c: {"partition-id": c} for c in range(N)})
    strat = SecureStrategy(proto, make_defense("mean"), LAYOUT, torch.zeros(LAYOUT.numel),
                           config=StrategyConfig(min_nodes=N, max_weight=1.0), cohort_fn=lambda _r, ids: ids)
    _drive(strat, grid, rounds=2)
    ref = SecAggPlus(max_weight=1.0).run_round(
        0, [ClientUpdate(c, u, LAYOUT.layer_names, 1.0) for c, u in ups.items()], LAYOUT, defense=make_defense("mean"))
    for rec in strat.history:
        assert rec.accepted == list(range(N)) and not rec.dropped and not rec.rejected
    assert len(set(seen)) >= 5  # every stage was answered by a process that had no half in memory
    torch.testing.assert_close(strat.model.vector, 2 * ref.aggregate, atol=8 * float(ref.extras["error_bound"]),
                               rtol=0)


def test_ckks_with_a_fresh_process_per_message_and_the_ledger_outlives_the_key_holder_process(ckks_keys: Path) -> None:
    dep = CKKSDeployment(str(ckks_keys))
    ups = known_updates(N, seed=6)
    seen: list[str] = []
    app = fresh_process(fixed_app(dep, ups, services=dep), seen)
    configs = {100 + c: {"partition-id": c} for c in range(N)}
    configs[KEY_NODE] = {ROLE_KEY: KEY_HOLDER_ROLE}
    grid = LocalGrid({n: app for n in configs}, configs)  # type: ignore[misc]
    strat = SecureStrategy(dep.server_protocol(), make_defense("mean"), LAYOUT, torch.zeros(LAYOUT.numel),
                           config=StrategyConfig(min_nodes=N + 1), cohort_fn=lambda _r, ids: ids,
                           service_nodes={KEY_HOLDER_PARTY: KEY_HOLDER_PARTY})
    _drive(strat, grid)
    assert strat.history[0].accepted == list(range(N)) and set(seen) == {"announce", "update", "decrypt"}
    ref = CKKS(preset="add-only").run_round(0, [ClientUpdate(c, u, LAYOUT.layer_names, 1.0) for c, u in ups.items()],
                                            LAYOUT, defense=make_defense("mean"))
    assert torch.allclose(strat.model.vector, ref.aggregate, atol=1e-4)
    # the server replays the round's decrypt request to a key holder restarted in a fresh process: refused
    captured: list[Message] = []
    original = grid.send_and_receive

    def spy(messages, **kw):  # type: ignore[no-untyped-def]
        messages = list(messages)
        captured.extend(m for m in messages if m.metadata.dst_node_id == KEY_NODE)
        return original(messages, **kw)

    grid.send_and_receive = spy  # type: ignore[method-assign]
    forget_halves()
    _drive_again = SecureStrategy(dep.server_protocol(), make_defense("mean"), LAYOUT, torch.zeros(LAYOUT.numel),
                                  config=StrategyConfig(min_nodes=N + 1), cohort_fn=lambda _r, ids: ids,
                                  service_nodes={KEY_HOLDER_PARTY: KEY_HOLDER_PARTY})
    msgs = _drive_again.configure_train(1, None, ConfigRecord(), grid)  # round 0 again, a new server half
    _drive_again.aggregate_train(1, grid.send_and_receive(msgs))
    again = _drive_again.history[0]
    assert captured and "key holder" in str(again.extras.get("aborted"))  # nothing revealed ...
    assert "already decrypted" in again.rejected[KEY_HOLDER_PARTY]  # ... because the ledger survived the process


def test_a_saved_half_round_trips_and_a_secret_stays_in_the_bytes() -> None:
    proto = SecAggPlus(max_weight=1.0)
    half = proto.client_half(0, LAYOUT, ClientUpdate(1, torch.ones(LAYOUT.numel), LAYOUT.layer_names, 1.0))
    data = dump_half(half, round_idx=0)
    assert data.startswith(MAGIC)
    back = load_half(data, proto, LAYOUT, round_idx=0, party=1)
    assert torch.equal(torch.as_tensor(back.vector), torch.ones(LAYOUT.numel))  # type: ignore[attr-defined]
    with pytest.raises(MalformedMessageError, match="round 0 party 1"):
        load_half(data, proto, LAYOUT, round_idx=1, party=1)  # a saved half of another round is refused


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=200),
                      st.builds(lambda tail: MAGIC + b"\x00\x01\x00\x00\x00\x10" + tail, st.binary(max_size=64))))
def test_state_bytes_that_are_not_a_saved_half_raise_a_typed_error(data: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        load_half(data, SecAggPlus(max_weight=1.0), LAYOUT, round_idx=0, party=1)


def test_the_mod_keeps_the_half_in_the_node_context_state() -> None:
    ups = known_updates(N, seed=7)
    proto = SecAggPlus(max_weight=1.0)
    grid = LocalGrid({100 + c: fresh_process(fixed_app(proto, ups), []) for c in range(N)},  # type: ignore[misc]
                     {100 + c: {"partition-id": c} for c in range(N)})
    strat = SecureStrategy(proto, make_defense("mean"), LAYOUT, torch.zeros(LAYOUT.numel),
                           config=StrategyConfig(min_nodes=N, max_weight=1.0), cohort_fn=lambda _r, ids: ids)
    _drive(strat, grid)
    for node in range(100, 100 + N):
        saved = grid.contexts[node].state.config_records[HALF_STATE_KEY]
        assert saved["round"] == 0 and isinstance(saved["half"], bytes) and saved["half"].startswith(MAGIC)
