"""The server step with partial uploads: an entry nobody uploaded keeps its value *and* its Adam state."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.errors import ConfigError
from securefml.optimizer import ServerOptimizer
from securefml.rounds import RoundOutput
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("a.w", (3,)), ("b.w", (2,)), ("c.w", (4,))])


def _out(agg: torch.Tensor, uploaded: set[str]) -> RoundOutput:
    weights = {n: (1.0 if n in uploaded else 0.0) for n in LAYOUT.layer_names}
    masked = agg * LAYOUT.mask(uploaded)  # zeros where nobody uploaded, as the protocols produce
    return RoundOutput(masked, weights, (0,))


def test_every_entry_uploaded_is_torch_adam():
    torch.manual_seed(0)
    start = torch.randn(LAYOUT.numel)
    ours = ServerOptimizer(LAYOUT, start, name="adam", lr=0.01)
    ref = torch.nn.Parameter(start.clone())
    opt = torch.optim.Adam([ref], lr=0.01)
    for _ in range(30):
        agg = torch.randn(LAYOUT.numel)
        ours.step(_out(agg, set(LAYOUT.layer_names)))
        opt.zero_grad()
        ref.grad = -agg
        opt.step()
    torch.testing.assert_close(ours.vector, ref.detach(), rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(plans=st.lists(st.sets(st.sampled_from(LAYOUT.layer_names)), min_size=1, max_size=12),
       seed=st.integers(0, 2**16), name=st.sampled_from(["adam", "sgd"]))
def test_each_entry_follows_its_own_optimizer_over_the_rounds_it_was_uploaded(plans, seed, name):
    """Any sequence of uploaded layer sets (the selection is arbitrary): entry j's trajectory is
    torch's optimizer run on j alone over exactly the rounds in which j was uploaded."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(LAYOUT.numel, generator=gen)
    aggs = [torch.randn(LAYOUT.numel, generator=gen) for _ in plans]
    ours = ServerOptimizer(LAYOUT, start, name=name, lr=0.05)
    for agg, up in zip(aggs, plans):
        ours.step(_out(agg, up))
    for layer, s in LAYOUT.slices().items():
        ref = torch.nn.Parameter(start[s].clone())
        opt = torch.optim.Adam([ref], lr=0.05) if name == "adam" else torch.optim.SGD([ref], lr=0.05)
        for agg, up in zip(aggs, plans):
            if layer in up:
                opt.zero_grad()
                ref.grad = -agg[s]
                opt.step()
        torch.testing.assert_close(ours.vector[s], ref.detach(), rtol=1e-5, atol=1e-6)
    if name == "adam":
        steps = ours.steps
        assert steps is not None
        for layer, s in LAYOUT.slices().items():
            assert torch.all(steps[s] == sum(layer in up for up in plans))


def test_an_entry_uploaded_every_other_round_takes_full_adam_steps():
    """The defect this replaces: torch.optim.Adam fed zeros for idle entries shrank their steps to ~0.74."""
    opt = ServerOptimizer(LAYOUT, torch.zeros(LAYOUT.numel), name="adam", lr=1e-3)
    agg = torch.ones(LAYOUT.numel)
    moved = []
    for r in range(40):
        before = opt.vector.clone()
        opt.step(_out(agg, {"a"} if r % 2 == 0 else {"b", "c"}))
        moved.append(float((opt.vector - before)[0]))
    active = moved[::2]
    assert all(x == pytest.approx(1e-3, rel=1e-4) for x in active)  # a constant gradient: steps of exactly lr
    assert all(x == 0.0 for x in moved[1::2])


def test_nothing_accepted_changes_nothing_and_bad_settings_are_refused():
    opt = ServerOptimizer(LAYOUT, torch.ones(LAYOUT.numel), name="adam", lr=0.1)
    opt.step(RoundOutput(torch.ones(LAYOUT.numel), dict.fromkeys(LAYOUT.layer_names, 1.0), ()))
    assert torch.equal(opt.vector, torch.ones(LAYOUT.numel))
    with pytest.raises(ConfigError, match="server_lr"):
        ServerOptimizer(LAYOUT, torch.ones(LAYOUT.numel), lr=0.0)
    with pytest.raises(ConfigError, match="unknown server optimizer"):
        ServerOptimizer(LAYOUT, torch.ones(LAYOUT.numel), name="rmsprop")
    with pytest.raises(ConfigError, match="entries"):
        ServerOptimizer(LAYOUT, torch.ones(3))
    with pytest.raises(ConfigError, match="betas"):
        ServerOptimizer(LAYOUT, torch.ones(LAYOUT.numel), name="adam", betas=(0.9, 1.0))
