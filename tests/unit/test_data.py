import math

import pytest
import torch

from securefml.data import load_dataset, make_digits_fewshot, make_digits_skew, make_sine, make_synthetic
from securefml.data.base import Task
from securefml.errors import ConfigError, DataError


def test_sine_ranges_and_split():
    d = make_sine(n_train=20, n_heldout=5, k_shot=7, seed=1)
    assert len(d.train) == 20 and len(d.heldout) == 5
    t = d.train[0]
    assert t.support_x.shape == (7, 1) and t.kind == "regression"
    xs = torch.cat([t.support_x for t in d.train])
    assert xs.min() >= -5 and xs.max() <= 5
    amp = max(float(t.support_y.abs().max()) for t in d.train)
    assert amp <= 5.0 + 1e-6


def test_digits_fewshot_clients_have_own_label_assignment():
    d = make_digits_fewshot(n_train=20, n_heldout=5, n_way=5, k_shot=3, query=4, seed=0)
    t = d.train[0]
    assert t.support_x.shape == (15, 64) and t.query_x.shape == (20, 64)
    assert set(t.support_y.tolist()) == set(range(5))
    # the same client label means different digits for different clients
    means = [task.support_x[task.support_y == 0].mean(0) for task in d.train[:10]]
    assert max(float((a - b).abs().sum()) for a in means for b in means) > 1.0


def test_digits_skew_label_skew_and_dirichlet():
    d = make_digits_skew(n_clients=10, n_heldout=2, classes_per_client=2, seed=0)
    for t in d.train:
        assert len(set(torch.cat([t.support_y, t.query_y]).tolist())) <= 4  # shard boundaries
    dd = make_digits_skew(n_clients=10, n_heldout=2, alpha=0.3, seed=0)
    assert sum(t.n_samples for t in dd.train + dd.heldout) == 1797


def test_synthetic_fedprox_shapes():
    d = make_synthetic(alpha=0.5, beta=0.5, n_users=10, n_heldout=2, seed=3)
    assert len(d.train) == 8 and d.train[0].support_x.shape[1] == 60
    assert all(t.n_samples >= 50 for t in d.train)
    assert max(int(t.support_y.max()) for t in d.train) < 10


def test_seed_determinism():
    a, b = make_sine(n_train=3, seed=5), make_sine(n_train=3, seed=5)
    assert torch.equal(a.train[2].query_y, b.train[2].query_y)


def test_bad_dataset_inputs():
    with pytest.raises(ConfigError, match="choose one of"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="empty support"):
        Task(3, torch.zeros(0, 2), torch.zeros(0), torch.zeros(1, 2), torch.zeros(1))
    with pytest.raises(ConfigError):
        make_digits_skew(alpha=-1.0)
    with pytest.raises(ConfigError):
        make_digits_fewshot(n_way=11)
    assert math.isfinite(float(make_sine(n_train=1).train[0].support_y.sum()))
