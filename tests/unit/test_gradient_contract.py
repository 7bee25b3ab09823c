"""The gradient-function contract: learners take every gradient through it; DP is swapped in, not re-implemented.

The toy learner below is defined here, outside the package, and gets record-level DP (planning,
ledger, clipping, noise, a federated round) with no edit to the library.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.client import Client
from securefml.data import make_digits_fewshot
from securefml.data.base import Task
from securefml.defenses import make_defense
from securefml.errors import ConfigError
from securefml.meta import LEARNERS, Gradients, MetaConfig, MetaLearner, MetaSGD, Params, PlainGradients
from securefml.meta.gradients import Batch, LossFn
from securefml.models import make_model
from securefml.privacy import PrivacyConfig, RecordLevelDP, epsilon_for, setup_privacy
from securefml.protocols import PROTOCOLS
from securefml.server import Server

DIGITS = make_digits_fewshot(n_train=3, n_heldout=1, k_shot=2, query=2, seed=0)


class Counting(Gradients):
    """Plain gradients that count what the learner asked for."""

    def __init__(self) -> None:
        self.released = 0
        self.traced_calls = 0
        self.plain = PlainGradients()

    def __call__(self, loss: LossFn, params: Params, batch: Batch) -> Params:
        self.released += 1
        return self.plain(loss, params, batch)

    def with_value(self, loss: LossFn, params: Params, batch: Batch) -> tuple[Params, torch.Tensor]:
        self.released += 1
        return self.plain.with_value(loss, params, batch)

    def traced(self, loss: LossFn, params: Params, batch: Batch) -> Params:
        self.traced_calls += 1
        return self.plain.traced(loss, params, batch)


class SmoothedHeadSGD(MetaLearner):
    """A learner the library has never seen: label-smoothed SGD on the output layer only, all local data."""

    name = "toy-smoothed-head"
    step_loss_name = "train_loss"

    def released_gradients(self) -> int:
        return self.config.inner_steps

    def meta_update(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        x, y = torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])
        head = {n: p for n, p in params.items() if n.startswith("layers.2.")}
        rest = {n: p for n, p in params.items() if n not in head}

        def loss(h: Params, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            out = self.forward({**rest, **h}, xb)
            return torch.nn.functional.cross_entropy(out, yb, label_smoothing=0.1)

        for _ in range(self.config.inner_steps):
            g = self.gradients(loss, head, (x, y))
            head = {n: (p - self.config.inner_lr * g[n]).detach() for n, p in head.items()}
        return {**params, **head}, {"train_loss": float(loss(head, x, y).detach())}


def _toy(steps: int = 3) -> SmoothedHeadSGD:
    return SmoothedHeadSGD(make_model(DIGITS, hidden=(8,), seed=0), MetaConfig(inner_steps=steps, inner_lr=0.5))


def _learner(name: str, steps: int, outer: int) -> MetaLearner:
    cfg = MetaConfig(inner_steps=steps, inner_lr=0.1, outer_lr=0.1, outer_steps=outer)
    model = make_model(DIGITS, hidden=(8,), seed=0)
    if name == "metasgd-fo":
        return MetaSGD(model, cfg, first_order=True)
    return LEARNERS.create(name, model=model, config=cfg)


@pytest.mark.parametrize("name", ["fedavg", "reptile", "fomaml", "maml", "metasgd", "metasgd-fo"])
@settings(max_examples=3, deadline=None)
@given(steps=st.integers(0, 3), outer=st.integers(1, 2))
def test_every_learner_declares_exactly_the_gradients_it_takes(name: str, steps: int, outer: int) -> None:
    learner = _learner(name, steps, outer)
    counting = Counting()
    learner.with_gradients(counting).update(learner.init_params(), DIGITS.train[0])
    assert counting.released == learner.released_gradients()
    assert (counting.traced_calls > 0) == (learner.traces_local_gradients and steps > 0)


@pytest.mark.parametrize("name", ["fedavg", "reptile", "fomaml", "maml", "metasgd", "metasgd-fo"])
def test_per_sample_engines_give_the_same_private_update(name: str) -> None:
    """Expanded weights (where the loss allows) and vmap release the same gradients; auto picks per loss."""
    learner = _learner(name, 2, 1)
    params = learner.init_params()
    got = {}
    engines = {}
    for engine in ("vmap", "auto"):
        dp = RecordLevelDP(learner, noise_multiplier=0.0, max_grad_norm=0.3, sample_rate=1.0, per_sample=engine,
                           allow_support_leak=True)
        got[engine], _ = dp.update(params, DIGITS.train[0])
        engines[engine] = dp.clients[0].gradients.engine_calls
    for n in got["vmap"]:
        assert torch.allclose(got["vmap"][n], got["auto"][n], atol=1e-6, rtol=1e-5), n
    assert engines["vmap"]["expanded-weights"] == 0
    weight_only = name in ("fedavg", "reptile", "fomaml", "metasgd-fo")  # steps on model weights
    assert (engines["auto"]["expanded-weights"] > 0) == weight_only
    if name in ("maml", "metasgd", "metasgd-fo"):  # query loss through rates or a traced loop: vmap
        assert engines["auto"]["vmap"] > 0


def test_injected_gradients_are_what_the_learner_uses() -> None:
    """Constructor injection and ``with_gradients`` both route the learner's gradients; the default is plain."""
    model = make_model(DIGITS, hidden=(8,), seed=0)
    counting = Counting()
    learner = LEARNERS.create("fomaml", model=model, config=MetaConfig(inner_steps=2))
    assert isinstance(learner.gradients, PlainGradients)
    injected = type(learner)(model, MetaConfig(inner_steps=2), gradients=counting)
    ref, _ = learner.update(learner.init_params(), DIGITS.train[1])
    got, _ = injected.update(learner.init_params(), DIGITS.train[1])
    assert counting.released == 3 and all(torch.equal(ref[n], got[n]) for n in ref)
    assert isinstance(learner.gradients, PlainGradients)  # with_gradients copies, never mutates


def test_toy_learner_gets_record_level_dp_without_library_edits() -> None:
    toy = _toy(steps=3)
    cfg = PrivacyConfig(mode="record", noise_multiplier=1.3, delta=1e-3, max_grad_norm=0.5, sample_rate=0.5,
                        insecure_seeded_noise=True)
    s = setup_privacy(cfg, toy, n_train_clients=3, clients_per_round=2, rounds=3, local_dataset_size=8,
                      generator=torch.Generator().manual_seed(0))
    assert isinstance(s.learner, RecordLevelDP) and s.learner.covers_support
    assert s.planned["steps_per_participation"] == 3
    server = Server(s.learner, PROTOCOLS.create("plaintext"), make_defense("mean"), server_optimizer="sgd",
                    server_lr=1.0)
    start = {n: p.clone() for n, p in server.params.items()}
    clients = [Client.build(t) for t in DIGITS.train]
    for rnd in range(2):
        rec = server.run_round(rnd, clients[:2], generator=torch.Generator().manual_seed(rnd))
        assert rec.accepted
        s.end_round(rnd)
    ledger = s.learner.clients[0].ledger
    sigma = s.noise_multiplier
    assert ledger.history == ((sigma, 0.5, 6),)  # 2 rounds x 3 released gradients, nothing else
    assert ledger.epsilon() == epsilon_for("rdp", ((sigma, 0.5, 6),), 1e-3)
    assert s.report()["covers"] == "every local example"
    moved = {n for n in start if not torch.equal(start[n], server.params[n])}
    assert moved == {"layers.2.weight", "layers.2.bias"}  # only what the toy trains, noise included


def test_toy_learner_without_noise_or_clipping_equals_its_plain_update() -> None:
    toy = _toy(steps=2)
    dp = RecordLevelDP(toy, noise_multiplier=0.0, max_grad_norm=math.inf, sample_rate=1.0)
    for task in DIGITS.train:
        ref, _ = toy.update(toy.init_params(), task)
        got, _ = dp.update(toy.init_params(), task)
        for n in ref:
            assert torch.allclose(got[n], ref[n], atol=1e-6, rtol=1e-5), n


class _Undeclared(SmoothedHeadSGD):
    def released_gradients(self) -> None:  # type: ignore[override]
        return None


class _UnderDeclared(SmoothedHeadSGD):
    def released_gradients(self) -> int:
        return self.config.inner_steps - 1


class _SecretlySecondOrder(SmoothedHeadSGD):
    """Differentiates through a gradient of local data without declaring it."""

    def meta_update(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        loss = self.loss_fn(task.kind)

        def through(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            g = self.gradients.traced(loss, p, (task.support_x, task.support_y))
            return loss({n: p[n] - 0.1 * g[n] for n in p}, x, y)

        g = self.gradients(through, params, (task.query_x, task.query_y))
        return {n: p - 0.1 * g[n] for n, p in params.items()}, {}

    def released_gradients(self) -> int:
        return 1


class _Nested(_SecretlySecondOrder):
    """Asks for a released gradient inside another gradient's loss."""

    def meta_update(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        loss = self.loss_fn(task.kind)

        def through(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            g = self.gradients(loss, p, (task.support_x, task.support_y))
            return loss({n: p[n] - 0.1 * g[n] for n in p}, x, y)

        g = self.gradients(through, params, (task.query_x, task.query_y))
        return {n: p - 0.1 * g[n] for n, p in params.items()}, {}


def test_learners_that_break_the_contract_are_refused_naming_themselves() -> None:
    model = make_model(DIGITS, hidden=(8,), seed=0)
    kw = dict(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5)
    with pytest.raises(ConfigError, match="_Undeclared.*user-level DP"):
        RecordLevelDP(_Undeclared(model, MetaConfig(inner_steps=2)), **kw)
    with pytest.raises(ConfigError, match="_Undeclared.*--dp user"):
        setup_privacy(PrivacyConfig(mode="record", noise_multiplier=1.0, delta=1e-3),
                      _Undeclared(model, MetaConfig(inner_steps=2)), n_train_clients=3, clients_per_round=1,
                      rounds=1, local_dataset_size=8)
    under = RecordLevelDP(_UnderDeclared(model, MetaConfig(inner_steps=2)), **kw)
    with pytest.raises(ConfigError, match="declared 1 released gradients per round but took 2"):
        under.update(under.init_params(), DIGITS.train[0])
    secret = RecordLevelDP(_SecretlySecondOrder(model, MetaConfig(inner_steps=1)), **kw)
    with pytest.raises(ConfigError, match="differentiates through a gradient of local data"):
        secret.update(secret.init_params(), DIGITS.train[0])
    nested = RecordLevelDP(_Nested(model, MetaConfig(inner_steps=1)), **kw)
    with pytest.raises(ConfigError, match="inside the loss of another gradient"):
        nested.update(nested.init_params(), DIGITS.train[0])


def test_bayesian_learner_is_refused_before_any_work() -> None:
    from securefml.bayes import BayesMetaSGD

    learner = BayesMetaSGD(make_model(DIGITS, seed=0), MetaConfig(inner_steps=1))
    with pytest.raises(ConfigError, match="BayesMetaSGD.*user-level DP"):
        RecordLevelDP(learner, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5)


def test_dp_gradients_never_run_inside_a_vmapped_cohort() -> None:
    """A learner built with DP gradients runs its cohort one client at a time; inside vmap they refuse."""
    from securefml.privacy import DPGradients, Ledger, NoiseSource

    dp = DPGradients(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, ledger=Ledger("rdp", 1e-5),
                     source=NoiseSource.seeded(0))
    learner = LEARNERS.create("fedavg", model=make_model(DIGITS, hidden=(8,), seed=0), config=MetaConfig(inner_steps=1))
    tasks = list(DIGITS.train)
    assert learner.vectorizes(tasks) and not learner.with_gradients(dp).vectorizes(tasks)
    params = learner.init_params()
    loss = learner.weights_loss_fn("classification")
    xs = torch.stack([t.support_x for t in tasks])
    ys = torch.stack([t.support_y for t in tasks])
    with pytest.raises(ConfigError, match="torch.func transform"):
        torch.func.vmap(lambda x, y: dp(loss, params, (x, y))["layers.0.weight"])(xs, ys)
    assert dp.ledger.steps == 0
