"""Data-poisoning attacks: label flipping, backdoor triggers, attack success rate."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.attacks import Backdoor, LabelFlip, attack_success_rate, make_attack
from securefml.data.base import Task
from securefml.errors import ConfigError, DataError

SETTINGS = settings(max_examples=25, deadline=None)


def make_task(n_support: int = 20, n_query: int = 10, *, shape: tuple[int, ...] = (64,), n_classes: int = 10,
              seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    return Task(
        client_id=3,
        support_x=torch.rand(n_support, *shape, generator=g),
        support_y=torch.randint(0, n_classes, (n_support,), generator=g),
        query_x=torch.rand(n_query, *shape, generator=g),
        query_y=torch.randint(0, n_classes, (n_query,), generator=g),
        n_classes=n_classes,
    )


@SETTINGS
@given(st.integers(2, 12), st.integers(1, 30), st.integers(0, 1000))
def test_labelflip_maps_y_to_c_minus_1_minus_y(n_classes: int, n: int, seed: int) -> None:
    task = make_task(n, n, n_classes=n_classes, seed=seed)
    out = LabelFlip().poison_task(task, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out.support_y, n_classes - 1 - task.support_y)
    assert torch.equal(out.query_y, n_classes - 1 - task.query_y)
    assert torch.equal(out.support_x, task.support_x)  # inputs untouched
    assert out.support_y.dtype == task.support_y.dtype


@SETTINGS
@given(st.floats(0.05, 1.0), st.integers(0, 1000))
def test_labelflip_fraction_and_split(fraction: float, seed: int) -> None:
    task = make_task(40, 10, seed=seed)
    out = LabelFlip(fraction, splits="support").poison_task(task, generator=torch.Generator().manual_seed(seed))
    changed = out.support_y != task.support_y
    flipped = out.support_y == 9 - task.support_y
    assert bool((flipped | ~changed).all())  # every changed label is the flipped one
    # Exactly round(fraction * n) rows chosen; a row whose label is its own flip (none for C=10) would not change.
    assert int(changed.sum()) == (40 if fraction >= 1 else max(1, round(fraction * 40)))
    assert torch.equal(out.query_y, task.query_y)


def test_labelflip_regression_negates_targets() -> None:
    t = Task(0, torch.rand(5, 1), torch.rand(5, 1), torch.rand(4, 1), torch.rand(4, 1), kind="regression")
    out = LabelFlip().poison_task(t)
    assert torch.equal(out.support_y, -t.support_y) and torch.equal(out.query_y, -t.query_y)


@pytest.mark.parametrize("shape", [(64,), (1, 8, 8), (8, 8)])
def test_backdoor_patch_on_image_like_inputs(shape: tuple[int, ...]) -> None:
    task = make_task(30, 12, shape=shape)
    attack = Backdoor(target=7, fraction=0.5, patch=2, value=1.0)
    out = attack.poison_task(task, generator=torch.Generator().manual_seed(1))
    mask = attack.mask(shape)
    assert int(mask.sum()) == 4  # a 2x2 patch
    img = mask.reshape(8, 8)
    assert bool(img[6:, 6:].all()) and not bool(img[:6].any())  # bottom-right corner
    for split, n in (("support", 30), ("query", 12)):
        x0, y0 = getattr(task, f"{split}_x"), getattr(task, f"{split}_y")
        x1, y1 = getattr(out, f"{split}_x"), getattr(out, f"{split}_y")
        poisoned = (x1 != x0).reshape(n, -1).any(1)
        assert int(poisoned.sum()) == round(0.5 * n)  # the chosen fraction ...
        assert bool((x1[poisoned][:, mask] == 1.0).all())  # ... carries the trigger ...
        assert bool((y1[poisoned] == 7).all())  # ... and the target label;
        assert torch.equal(x1[~poisoned], x0[~poisoned]) and torch.equal(y1[~poisoned], y0[~poisoned])  # rest clean
        assert torch.equal(x1[poisoned][:, ~mask], x0[poisoned][:, ~mask])  # only the patch changes


def test_backdoor_feature_trigger_on_tabular_inputs() -> None:
    task = make_task(20, 10, shape=(5,), n_classes=3)
    attack = Backdoor(target=2, fraction=1.0, features=(0, 4), value=9.0)
    out = attack.poison_task(task, generator=torch.Generator().manual_seed(0))
    assert bool((out.support_x[:, [0, 4]] == 9.0).all()) and torch.equal(out.support_x[:, 1:4], task.support_x[:, 1:4])
    assert bool((out.support_y == 2).all()) and bool((out.query_y == 2).all())
    # The default feature trigger uses the task's largest value on the last three columns.
    auto = Backdoor(target=0, fraction=1.0).poison_task(task)
    top = float(torch.cat([task.support_x.reshape(-1), task.query_x.reshape(-1)]).max())
    assert bool((auto.support_x[:, 2:] == top).all())


def test_backdoor_rejects_what_it_cannot_do() -> None:
    with pytest.raises(ConfigError):
        Backdoor(target=12).poison_task(make_task())  # not a class of a 10-class task
    with pytest.raises(ConfigError):
        Backdoor(trigger="patch").poison_task(make_task(shape=(5,)))  # a patch needs an image
    with pytest.raises(DataError):
        Backdoor().poison_task(Task(0, torch.rand(3, 1), torch.rand(3, 1), torch.rand(2, 1), torch.rand(2, 1),
                                    kind="regression"))
    with pytest.raises(ConfigError):
        Backdoor(fraction=0)


def test_attack_success_rate_on_real_predictors() -> None:
    task = make_task(20, 50, n_classes=10, seed=4)
    bd = Backdoor(target=7, value=1.0)
    # A model that fires on the trigger: predicts 7 whenever the bottom-right patch is saturated.
    mask = bd.mask((64,))

    def backdoored(x: torch.Tensor) -> torch.Tensor:
        hit = (x[:, mask] >= 1.0).all(1)
        logits = torch.zeros(x.shape[0], 10)
        logits[hit, 7] = 1.0
        logits[~hit, 0] = 1.0
        return logits

    def clean(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], dtype=torch.long)

    assert attack_success_rate(backdoored, task, bd) == 1.0
    assert attack_success_rate(clean, task, bd) == 0.0
    # Labels already equal to the target are excluded: a model always answering 7 gets 1.0, not more.
    always7 = attack_success_rate(lambda x: torch.full((x.shape[0],), 7), (task.query_x, task.query_y), bd)
    assert always7 == 1.0
    assert make_attack("backdoor:3").target == 3


def test_attack_success_rate_after_training_a_linear_model_on_poisoned_data() -> None:
    """End to end with a real torch model: training on backdoored data makes the trigger work."""
    torch.manual_seed(0)
    task = make_task(400, 200, n_classes=4, seed=5)
    # A learnable clean rule: the class is which quarter of the image is brightest.
    def label(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 4, 16)[:, :, :12].sum(-1).argmax(1)
    task = task.with_data(support_y=label(task.support_x), query_y=label(task.query_x))
    bd = Backdoor(target=1, fraction=0.3, patch=2, value=3.0)
    poisoned = bd.poison_task(task, generator=torch.Generator().manual_seed(0))
    model = torch.nn.Linear(64, 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(poisoned.support_x), poisoned.support_y).backward()
        opt.step()
    asr = attack_success_rate(model, task, bd)
    clean_acc = float((model(task.query_x).argmax(1) == task.query_y).float().mean())
    assert asr > 0.9 and clean_acc > 0.5
