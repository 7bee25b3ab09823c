"""Server-dictated selection never starves a layer: every layer at least every R = L rounds."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.experiment import RunConfig, run_experiment
from securefml.selection import TopKImportance, make_selector
from securefml.testing import layer_layouts


@settings(max_examples=60, deadline=None)
@given(
    layout=layer_layouts(min_layers=1, max_layers=6, max_layer_size=50),
    fraction=st.floats(0.01, 1.0),
    data=st.data(),
)
def test_every_layer_is_uploaded_in_every_window_of_L_dictated_rounds(layout, fraction, data):
    sel = TopKImportance(fraction, server_dictated=True)
    n_layers = len(layout.layer_names)
    plans = []
    for _ in range(3 * n_layers + 2):
        # the update (and so the ranking) is arbitrary: an adversarial order of layer scores
        scale = data.draw(st.lists(st.floats(0, 1e6), min_size=n_layers, max_size=n_layers))
        upd = torch.cat([torch.full((layout.numel_of([n]),), s) for n, s in zip(layout.layer_names, scale)])
        plans.append(set(sel.select(layout, upd, torch.ones(layout.numel))))
    for start in range(len(plans) - n_layers + 1):
        window = set().union(*plans[start : start + n_layers])
        assert window == set(layout.layer_names), (start, plans)


def test_ranking_alone_would_starve_the_hidden_layer_but_rotation_does_not():
    from securefml.updates import LayerLayout

    layout = LayerLayout([("hidden.w", (64, 65)), ("head.w", (5, 65))])
    upd = torch.cat([torch.full((64 * 65,), 1e-3), torch.full((5 * 65,), 1.0)])  # the head always ranks first
    client_chosen = TopKImportance(0.5)
    assert all(client_chosen.select(layout, upd, torch.ones(layout.numel)) == ("head",) for _ in range(5))
    dictated = TopKImportance(0.5, server_dictated=True)
    sent = [dictated.select(layout, upd, torch.ones(layout.numel)) for _ in range(4)]
    assert {"hidden"} <= set().union(*map(set, sent[:2])) and {"head"} <= set().union(*map(set, sent[:2]))
    state = dictated.state_dict()
    again = TopKImportance(0.5, server_dictated=True)
    again.load_state_dict(state)
    assert again.select(layout, upd, torch.ones(layout.numel)) == dictated.select(layout, upd, torch.ones(layout.numel))


def test_cclip_with_a_dictated_partial_plan_runs_through_the_federation():
    # the crash: "center has 8645 entries, updates have 325"
    torch.set_num_threads(1)
    res = run_experiment(RunConfig(dataset="digits-fewshot", rounds=4, clients_per_round=4,
                                   select="topk:fraction=0.5,server_dictated=true", defense="cclip"))
    layers = [set(h["uploaded_layers"]) for h in res.history]
    assert layers[0] != layers[1]  # partial uploads that change between rounds
    assert res.metrics["personalized"]["accuracy"] > 0
    assert make_selector("topk:fraction=0.5,server_dictated=true").server_dictated
