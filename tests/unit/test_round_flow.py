"""One round flows one way: plan -> client work -> adversary -> halves over bytes -> aggregation -> step.

Covers the pieces that used to be folded into ``Server.run_round``: the ``Adversary`` (each
attack controls its own group; a group sees honest updates only when omniscient, never another
group's rows), ``Client.prepare_upload`` (error feedback, selection, DP hook on what is sent),
the typed ``RoundContext`` and the JSON-ready round record.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from enum import Enum

import pytest
import torch

from securefml.adversary import Adversary
from securefml.attacks.base import Attack, AttackContext
from securefml.attacks.model_poisoning import SignFlip
from securefml.client import Client, LocalResult, UploadPlan
from securefml.context import RoundContext
from securefml.data import make_sine
from securefml.defenses import Mean
from securefml.defenses.budget import BYZANTINE_KEY
from securefml.meta import FOMAML, MetaConfig
from securefml.models import make_model
from securefml.protocols import Plaintext
from securefml.records import MAX_TENSOR_ENTRIES, json_ready
from securefml.selection import AllLayers, NamedLayers
from securefml.server import Server
from securefml.updates import LayerLayout


class Constant(Attack):
    """Sends a constant row; records the honest rows it was shown (to check what it may see)."""

    name = "constant"

    def __init__(self, value: float, omniscient: bool = False) -> None:
        self.value = value
        self.omniscient = omniscient
        self.seen: list[torch.Tensor | None] = []

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        self.seen.append(context.honest_updates)
        context.attack_info[self.name] = {"value": self.value}
        return torch.full_like(own, self.value)


def _results(n: int, d: int = 3) -> list[LocalResult]:
    return [LocalResult(i, torch.full((d,), float(i + 1)), 1.0, {}) for i in range(n)]


def test_each_attack_controls_its_own_group() -> None:
    flip, const = SignFlip(2.0), Constant(7.0)
    results = _results(6)
    adversary = Adversary({1: flip, 3: flip, 4: const, 5: const})
    report = adversary.act(results, RoundContext(round=0), cohort_size=6)
    rows = {r.client_id: r.update for r in results}
    assert torch.equal(rows[1], torch.full((3,), -4.0)) and torch.equal(rows[3], torch.full((3,), -8.0))
    assert torch.equal(rows[4], torch.full((3,), 7.0)) and torch.equal(rows[5], torch.full((3,), 7.0))
    assert torch.equal(rows[0], torch.full((3,), 1.0)) and torch.equal(rows[2], torch.full((3,), 3.0))
    assert report.groups == {"constant": (4, 5), "signflip": (1, 3)}
    assert report.attack_info["constant"] == {"value": 7.0}


def test_an_omniscient_group_sees_the_honest_rows_only() -> None:
    spy, other = Constant(5.0, omniscient=True), Constant(-5.0)
    results = _results(5)
    Adversary({0: other, 1: spy, 2: spy}).act(results, RoundContext(round=3), cohort_size=5)
    (seen,) = spy.seen
    assert seen is not None and sorted(seen[:, 0].tolist()) == [4.0, 5.0]  # clients 3 and 4: honest only
    assert other.seen == [None]  # not omniscient: sees no honest update


def test_the_adversary_never_sees_the_servers_stimuli() -> None:
    seen: list[AttackContext] = []

    class Peek(Attack):
        name = "peek"

        def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
            seen.append(context)
            return own

    ctx = RoundContext(round=1, forward=lambda v: v, byzantine_budget=2)
    Adversary({0: Peek()}).act(_results(2), ctx, cohort_size=2)
    assert seen[0].defense_context is not None
    assert "forward" not in seen[0].defense_context and seen[0].defense_context[BYZANTINE_KEY] == 2


def test_a_federation_with_two_attacks_runs_both() -> None:
    data = make_sine(n_train=6, n_heldout=1, seed=0)
    flip, const = SignFlip(1.0), Constant(0.0)
    clients = [Client(t, attack=flip if i < 2 else const if i < 4 else None) for i, t in enumerate(data.train)]
    server = Server(FOMAML(make_model(data), MetaConfig(inner_steps=1)), Plaintext(), Mean())
    rec = server.run_round(0, clients)
    assert rec.extras["adversary"]["groups"] == {"constant": [2, 3], "signflip": [0, 1]}
    assert sorted(rec.accepted) == list(range(6)) and rec.malicious == [0, 1, 2, 3]
    json.dumps(rec.extras)  # the record is JSON-ready as it is


def _plan(layout: LayerLayout, **kw: object) -> UploadPlan:
    return UploadPlan(round=0, layout=layout, global_vector=torch.zeros(layout.numel), **kw)  # type: ignore[arg-type]


def test_prepare_upload_applies_the_dp_hook_last_on_exactly_what_is_sent() -> None:
    data = make_sine(n_train=1, n_heldout=1, seed=0)
    learner = FOMAML(make_model(data), MetaConfig(inner_steps=1))
    layout = LayerLayout.from_params(learner.init_params())
    first = layout.layer_names[:1]
    seen: list[torch.Tensor] = []

    def hook(cid: int, full: torch.Tensor) -> torch.Tensor:
        seen.append(full.clone())
        return full * 0.5

    client = Client(data.train[0])
    result = LocalResult(client.client_id, torch.ones(layout.numel), 3.0, {})
    up = client.prepare_upload(result, _plan(layout, layers=tuple(first), selector=NamedLayers(first),
                                             update_hook=hook), learner)
    assert up.layers == tuple(first) and up.weight == 3.0
    assert torch.equal(up.vector, torch.full((layout.numel_of(first),), 0.5))
    # the hook saw the scattered upload: zeros where nothing is sent
    assert float(seen[0].sum()) == layout.numel_of(first)


def test_prepare_upload_keeps_what_it_withheld_for_the_next_round() -> None:
    data = make_sine(n_train=1, n_heldout=1, seed=0)
    learner = FOMAML(make_model(data), MetaConfig(inner_steps=1))
    layout = LayerLayout.from_params(learner.init_params())
    first = tuple(layout.layer_names[:1])
    client = Client(data.train[0])
    plan = _plan(layout, layers=first, selector=AllLayers(), error_feedback=True, equal_weights=True)
    up = client.prepare_upload(LocalResult(client.client_id, torch.ones(layout.numel), 3.0, {}), plan, learner)
    assert up.weight == 1.0 and client.residual is not None
    assert float(client.residual.sum()) == layout.numel - layout.numel_of(first)
    again = client.prepare_upload(LocalResult(client.client_id, torch.zeros(layout.numel), 3.0, {}), plan, learner)
    assert float(again.vector.sum()) == 0.0 and float(client.residual.sum()) == layout.numel - layout.numel_of(first)


def test_round_context_reads_the_same_as_fields_and_as_a_mapping() -> None:
    ref = torch.ones(4)
    ctx = RoundContext.from_mapping(2, {"reference": ref, BYZANTINE_KEY: 3, "my_rule_key": "x"})
    assert ctx.reference is ref and ctx.get("reference") is ref
    assert ctx.byzantine_budget == 3 and ctx[BYZANTINE_KEY] == 3
    assert ctx["my_rule_key"] == "x" and ctx.round == 2 and ctx["round"] == 2
    assert "forward" not in ctx and "generator" not in dict(ctx)  # unset fields are absent
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.round = 5  # type: ignore[misc]


class Colour(Enum):
    RED = "red"


@dataclass(frozen=True)
class Stats:
    sent: int

    def to_dict(self) -> dict[str, int]:
        return {"sent": self.sent}


def test_the_round_record_keeps_tuples_enums_stats_and_small_tensors() -> None:
    rec = json_ready({
        "withheld_layers": ("a", "b"),
        "bucket_index": (0, 2),
        "mode": Colour.RED,
        "stats": Stats(3),
        "gram": torch.eye(2),
        "huge": torch.zeros(MAX_TENSOR_ENTRIES + 1),
        "fn": lambda: None,
        "nested": {1: (torch.tensor(2.5),)},
    })
    assert rec == {"withheld_layers": ["a", "b"], "bucket_index": [0, 2], "mode": "red", "stats": {"sent": 3},
                   "gram": [[1.0, 0.0], [0.0, 1.0]], "nested": {"1": [2.5]}}
    json.dumps(rec)
