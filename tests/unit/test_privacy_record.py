"""Record-level DP-SGD: ledgers, vmap per-example gradients against Opacus, empty Poisson batches, reporting."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from opacus.grad_sample import wrap_model
from opacus.optimizers import DPOptimizer

from securefml.data import make_digits_fewshot
from securefml.meta import LEARNERS, MetaConfig, MetaSGD
from securefml.models import make_model
from securefml.privacy import PrivacyConfig, RecordLevelDP, setup_privacy, steps_per_participation

DIGITS = make_digits_fewshot(n_train=3, n_heldout=1, k_shot=2, query=2, seed=0)


def _learner(name: str, steps: int = 2, outer: int = 1):  # type: ignore[no-untyped-def]
    cfg = MetaConfig(inner_steps=steps, inner_lr=0.1, outer_lr=0.1, outer_steps=outer)
    model = make_model(DIGITS, hidden=(8,), seed=0)
    if name == "metasgd-fo":
        return MetaSGD(model, cfg, first_order=True)
    return LEARNERS.create(name, model=model, config=cfg)


def _support_gradient(dp: RecordLevelDP, learner, params, task):  # type: ignore[no-untyped-def]
    """One released DP gradient of the task loss at ``params`` on the support set (client 0)."""
    return dp.gradients_for(0)(learner.weights_loss_fn(task.kind), learner.model_params(params),
                               (task.support_x, task.support_y))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_vmap_clipped_gradients_equal_opacus_ew_and_hooks_modes() -> None:
    """The vectorized per-example route releases what Opacus' GradSampleModule + DPOptimizer release."""
    learner = _learner("fedavg")
    params = learner.init_params()
    task = DIGITS.train[0]
    dp = RecordLevelDP(learner, noise_multiplier=0.0, max_grad_norm=0.05, sample_rate=1.0)
    ours = _support_gradient(dp, learner, params, task)
    for mode in ("ew", "hooks"):
        module = copy.deepcopy(learner.model)
        gsm = wrap_model(module, grad_sample_mode=mode, loss_reduction="sum")
        opt = DPOptimizer(torch.optim.SGD(module.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=0.05,
                          expected_batch_size=len(task.support_x), loss_reduction="mean")
        torch.nn.functional.cross_entropy(gsm(task.support_x), task.support_y, reduction="sum").backward()
        opt.pre_step()
        for n, p in module.named_parameters():
            assert p.grad is not None
            assert torch.allclose(ours[n], p.grad, atol=1e-6), (mode, n)


def test_every_dp_step_lands_on_the_clients_own_ledger() -> None:
    for name, outer in (("fedavg", 1), ("reptile", 1), ("fomaml", 2), ("metasgd-fo", 2), ("maml", 2)):
        learner = _learner(name, steps=2, outer=outer)
        dp = RecordLevelDP(learner, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                           allow_support_leak=True)
        params = learner.init_params()
        dp.update(params, DIGITS.train[0])
        dp.update(params, DIGITS.train[0])
        dp.update(params, DIGITS.train[1])
        ledger0 = dp.clients[0].ledger
        ledger1 = dp.clients[1].ledger
        assert ledger0 is not None and ledger1 is not None
        assert ledger0.steps == 2 * steps_per_participation(learner), name
        assert ledger1.steps == steps_per_participation(learner), name
        assert ledger0.epsilon() > ledger1.epsilon() > 0
        assert dp.touched == {0, 1}


def test_empty_poisson_batch_releases_pure_noise() -> None:
    learner = _learner("reptile")
    params = learner.init_params()
    task = DIGITS.train[0]
    tiny = RecordLevelDP(learner, noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=1e-9)
    g = _support_gradient(tiny, learner, params, task)
    assert all(torch.count_nonzero(t) == 0 for t in g.values())  # nobody sampled, no noise: zero gradient
    noisy = RecordLevelDP(learner, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1e-9)
    g = _support_gradient(noisy, learner, params, task)
    assert all(torch.isfinite(t).all() and torch.count_nonzero(t) > 0 for t in g.values())
    assert noisy.clients[0].ledger is not None and noisy.clients[0].ledger.steps == 1


def test_wrapped_learner_delegates_everything_but_the_client_step() -> None:
    learner = _learner("metasgd-fo")
    dp = RecordLevelDP(learner, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5)
    params = dp.init_params()
    assert params.keys() == learner.init_params().keys()
    assert dp.name == learner.name and dp.adapts_with_learned_rates
    task = DIGITS.train[0]
    a = dp.adapt(params, task.support_x, task.support_y, task.kind)
    b = learner.adapt(params, task.support_x, task.support_y, task.kind)
    assert all(torch.equal(a[n], b[n]) for n in a)
    upd, metrics = dp.update(params, task)
    assert upd.keys() == params.keys() and "query_loss" in metrics
    assert all(torch.isfinite(t).all() for t in upd.values())


def test_report_states_what_is_covered() -> None:
    learner = _learner("maml")
    cfg = PrivacyConfig(mode="record", noise_multiplier=1.0, delta=1e-3, allow_support_leak=True)
    s = setup_privacy(cfg, learner, n_train_clients=3, clients_per_round=1, rounds=2, local_dataset_size=8)
    params = s.learner.init_params()
    s.learner.update(params, DIGITS.train[2])
    eps = s.end_round(0)
    report = s.report()
    assert report["covers"].startswith("query examples only")
    assert report["epsilon_per_client"] == {"2": eps}
    assert report["epsilon_max"] == eps and eps is not None and math.isfinite(eps)
