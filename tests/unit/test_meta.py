import pytest
import torch
from torch.func import grad

from securefml.data import make_digits_fewshot, make_sine
from securefml.errors import ConfigError
from securefml.meta import ALPHA_PREFIX, FOMAML, LEARNERS, MAML, MetaConfig, MetaSGD
from securefml.models import make_model

SINE = make_sine(n_train=4, n_heldout=1, seed=0)


def _autograd_maml_grad(learner, params, task, steps, lr):
    p = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    w = p
    for _ in range(steps):
        loss = learner.loss(w, task.support_x, task.support_y, task.kind)
        g = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        w = {n: t - lr * gi for (n, t), gi in zip(w.items(), g)}
    q = learner.loss(w, task.query_x, task.query_y, task.kind)
    return dict(zip(p, torch.autograd.grad(q, list(p.values()))))


def test_maml_matches_autograd_second_order():
    model = make_model(SINE)
    learner = MAML(model, MetaConfig(inner_steps=2, inner_lr=0.02))
    params = learner.init_params()
    ref = _autograd_maml_grad(learner, params, SINE.train[0], 2, 0.02)
    g, _ = learner.meta_gradient(params, SINE.train[0])
    for n in params:
        assert torch.allclose(g[n], ref[n], atol=1e-6)


def test_fomaml_differs_from_maml_but_is_query_gradient_at_adapted():
    model = make_model(SINE)
    params = MAML(model).init_params()
    task = SINE.train[1]
    fo = FOMAML(model, MetaConfig(inner_steps=2, inner_lr=0.02))
    g, _ = fo.meta_gradient(params, task)
    adapted = fo.adapt(params, task.support_x, task.support_y, task.kind)
    ref = grad(lambda p: fo.loss(p, task.query_x, task.query_y, task.kind))(adapted)
    assert all(torch.allclose(g[n], ref[n]) for n in params)


def test_metasgd_ships_learned_rates_and_updates_them():
    model = make_model(SINE)
    learner = MetaSGD(model, MetaConfig(inner_steps=1, inner_lr=0.01, outer_lr=0.1))
    params = learner.init_params()
    assert {n for n in params if n.startswith(ALPHA_PREFIX)} == {ALPHA_PREFIX + n for n, _ in model.named_parameters()}
    upd, _ = learner.update(params, SINE.train[0])
    assert any(upd[n].abs().sum() > 0 for n in params if n.startswith(ALPHA_PREFIX))


@pytest.mark.parametrize("name", ["fedavg", "maml", "fomaml", "metasgd", "reptile"])
def test_every_learner_reduces_its_training_loss(name):
    data = make_digits_fewshot(n_train=2, n_heldout=1, k_shot=5, query=5, seed=0)
    model = make_model(data)
    learner = LEARNERS.create(name, model=model, config=MetaConfig(inner_steps=3, inner_lr=0.1, outer_lr=0.5))
    params = learner.init_params()
    task = data.train[0]
    before = learner.loss(learner.adapt(params, task.support_x, task.support_y, task.kind), task.query_x,
                          task.query_y, task.kind)
    for _ in range(10):
        upd, _ = learner.update(params, task)
        params = {n: params[n] + upd[n] for n in params}
    after = learner.loss(learner.adapt(params, task.support_x, task.support_y, task.kind), task.query_x,
                         task.query_y, task.kind)
    assert after < before


def test_bad_meta_config():
    with pytest.raises(ConfigError):
        MetaConfig(inner_lr=0)
    with pytest.raises(ConfigError, match="choose one of"):
        LEARNERS.get("protonet")


def test_personalize_reports_a_diverged_model_instead_of_crashing():
    from securefml.personalize import personalize

    model = make_model(SINE)
    learner = MAML(model, MetaConfig(inner_steps=1))
    params = {n: torch.full_like(p, 1e30) for n, p in learner.init_params().items()}
    rep = personalize(learner, params, SINE.heldout, steps=1)
    assert rep.metric == "mse" and not (rep.mean < 1e6)
