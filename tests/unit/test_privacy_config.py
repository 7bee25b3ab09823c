"""Bad DP settings fail early with a ConfigError that says why and what to use instead."""

from __future__ import annotations

import math

import pytest

from securefml.data import make_sine
from securefml.errors import ConfigError
from securefml.meta import LEARNERS, MetaConfig, MetaSGD
from securefml.models import make_model
from securefml.privacy import PrivacyConfig, RecordLevelDP, setup_privacy

SINE = make_sine(n_train=4, n_heldout=1, seed=0)


def _learner(name: str = "fomaml"):  # type: ignore[no-untyped-def]
    return LEARNERS.create(name, model=make_model(SINE, hidden=(8,)), config=MetaConfig(inner_steps=1))


def _setup(cfg: PrivacyConfig, learner=None, **kw):  # type: ignore[no-untyped-def]
    base = dict(n_train_clients=100, clients_per_round=10, rounds=5, local_dataset_size=20, dataset_kind="regression")
    return setup_privacy(cfg, learner or _learner(), **{**base, **kw})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mode="user", target_epsilon=0.0), "target epsilon must be > 0"),
        (dict(mode="record", target_epsilon=-1.0), "target epsilon must be > 0"),
        (dict(mode="user", target_epsilon=1.0, clip=0.0), "clip must be > 0"),
        (dict(mode="record", target_epsilon=1.0, max_grad_norm=-1.0), "max_grad_norm must be > 0"),
        (dict(mode="record", target_epsilon=1.0, max_grad_norm=math.inf), "clipping off"),
        (dict(mode="user", noise_multiplier=1.0, clip=math.inf), "clipping off"),
        (dict(mode="user", target_epsilon=1.0, delta=1.0), "delta must be in"),
        (dict(mode="user", target_epsilon=1.0, noise_multiplier=1.0), "either a target epsilon or a noise"),
        (dict(mode="user"), "needs a budget"),
        (dict(mode="none", target_epsilon=3.0), "choose --dp record or --dp user"),
        (dict(mode="record", target_epsilon=1.0, placement="distributed"), "user-level DP only"),
        (dict(mode="record", target_epsilon=1.0, accountant="gdp"), "unknown accountant"),
        (dict(mode="local"), "unknown DP mode"),
        (dict(mode="record", noise_multiplier=-0.5), "noise multiplier must be"),
        (dict(mode="record", noise_multiplier=1.0, sample_rate=0.0), "sample_rate"),
    ],
)
def test_bad_config_raises_config_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PrivacyConfig(**kwargs)


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        PrivacyConfig(mode="user", target_epsilon=0.0)


def test_delta_must_be_below_one_over_number_of_clients_for_user_level() -> None:
    with pytest.raises(ConfigError, match=r"not below 1/100.*use delta <="):
        _setup(PrivacyConfig(mode="user", target_epsilon=3.0, delta=0.01))
    _setup(PrivacyConfig(mode="user", target_epsilon=3.0, delta=0.009))


def test_delta_must_be_below_one_over_local_dataset_for_record_level() -> None:
    with pytest.raises(ConfigError, match=r"not below 1/20"):
        _setup(PrivacyConfig(mode="record", noise_multiplier=1.0, delta=0.05))
    with pytest.raises(ConfigError, match="local_dataset_size"):
        _setup(PrivacyConfig(mode="record", noise_multiplier=1.0, delta=1e-3), local_dataset_size=None)


@pytest.mark.parametrize("name", ["maml", "metasgd"])
def test_record_level_for_second_order_needs_acknowledgement(name: str) -> None:
    cfg = PrivacyConfig(mode="record", noise_multiplier=1.0, delta=1e-3)
    with pytest.raises(ConfigError, match=r"support set.*--dp user"):
        _setup(cfg, _learner(name))
    ok = _setup(PrivacyConfig(mode="record", noise_multiplier=1.0, delta=1e-3, allow_support_leak=True), _learner(name))
    assert isinstance(ok.learner, RecordLevelDP) and not ok.learner.covers_support
    # user-level DP is the recommendation and takes any learner unchanged
    user = _setup(PrivacyConfig(mode="user", noise_multiplier=1.0, delta=1e-3), _learner(name))
    assert user.learner.name == name and not isinstance(user.learner, RecordLevelDP)


def test_first_order_metasgd_is_fully_covered() -> None:
    learner = MetaSGD(make_model(SINE, hidden=(8,)), MetaConfig(inner_steps=1), first_order=True)
    s = _setup(PrivacyConfig(mode="record", noise_multiplier=1.0, delta=1e-3), learner)
    assert isinstance(s.learner, RecordLevelDP) and s.learner.covers_support


def test_unreachable_target_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot reach"):
        _setup(PrivacyConfig(mode="user", target_epsilon=1e-9, delta=1e-9), rounds=500)


def test_mode_none_changes_nothing() -> None:
    learner = _learner()
    s = _setup(PrivacyConfig(), learner)
    assert s.learner is learner and s.update_hook is None and s.aggregate_hook is None
    assert s.end_round(0) is None
    assert s.report() == {"mode": "none", "accountant": None, "delta": None, "epsilon_max": None,
                          "epsilon_per_client": {}}
