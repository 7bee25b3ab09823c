"""Vectorized cohorts (issue 15): one vmap over stacked tasks equals the loop over clients."""

from __future__ import annotations

import pytest
import torch

from securefml.client import Client
from securefml.data.base import Task
from securefml.defenses import Mean
from securefml.meta import LEARNERS, MAML, MetaConfig
from securefml.models import MLP
from securefml.privacy.record import RecordLevelDP
from securefml.protocols import Plaintext
from securefml.server import Server

ALGORITHMS = ["maml", "fomaml", "metasgd", "reptile", "fedavg"]


def tasks(n: int, *, support: int = 6, query: int = 8, features: int = 5, classes: int = 3, seed: int = 0,
          first_id: int = 0) -> list[Task]:
    g = torch.Generator().manual_seed(seed)
    return [
        Task(first_id + i,
             torch.randn(support, features, generator=g), torch.randint(0, classes, (support,), generator=g),
             torch.randn(query, features, generator=g), torch.randint(0, classes, (query,), generator=g),
             n_classes=classes)
        for i in range(n)
    ]


def learner(name: str, *, outer_steps: int = 2):
    torch.manual_seed(0)
    cfg = MetaConfig(inner_steps=2, inner_lr=0.1, outer_lr=0.05, outer_steps=outer_steps)
    return LEARNERS.create(name, model=MLP(5, [7], 3), config=cfg)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_update_many_equals_the_loop(name):
    lrn = learner(name)
    params = lrn.init_params()
    ts = tasks(4)
    assert lrn.vectorizes(ts)
    loop = [lrn.update(params, t) for t in ts]
    vec = lrn.update_many(params, ts)
    for (u1, m1), (u2, m2) in zip(loop, vec):
        assert m1.keys() == m2.keys()
        for k in m1:
            assert m1[k] == pytest.approx(m2[k], rel=1e-5, abs=1e-6)
        for n in params:
            torch.testing.assert_close(u1[n], u2[n], rtol=1e-5, atol=1e-6)


def test_what_does_not_vectorize_keeps_the_loop():
    lrn = learner("maml")
    mixed = tasks(2) + tasks(1, support=4, seed=1, first_id=2)
    assert not lrn.vectorizes(mixed)  # shapes differ
    assert not lrn.vectorizes(tasks(1))  # nothing to batch

    class Custom(MAML):  # a subclass with its own round must not get MAML's vmap
        def meta_update(self, params, task):
            return super().meta_update(params, task)

    assert not Custom(MLP(5, [7], 3)).vectorizes(tasks(3))
    dp = RecordLevelDP(learner("fomaml"), noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5)
    # record-level DP cohorts vectorize too (each client's stream and ledger kept: test_dp_vectorized.py),
    # except with the expanded-weights engine, which cannot run under a vmap
    assert dp.vectorizes(tasks(3))
    ew = RecordLevelDP(learner("fomaml"), noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                       per_sample="expanded-weights")
    assert not ew.vectorizes(tasks(3))
    params = lrn.init_params()
    out = lrn.update_many(params, mixed)  # falls back to the loop, same results
    for (u1, _), t in zip(out, mixed):
        u2, _ = lrn.update(params, t)
        for n in params:
            torch.testing.assert_close(u1[n], u2[n])


@pytest.mark.parametrize("name", ["maml", "reptile"])
def test_server_rounds_agree_with_and_without_vectorization(name):
    ts = tasks(5) + tasks(2, support=4, seed=3, first_id=5)  # two shape groups: one vmapped, one too
    finals = []
    for vectorize in (True, False):
        lrn = learner(name, outer_steps=1)
        server = Server(lrn, Plaintext(), Mean(), server_optimizer="adam", server_lr=0.01, vectorize=vectorize)
        cohort = [Client(t) for t in ts]
        losses = []
        for rnd in range(3):
            rec = server.run_round(rnd, cohort)
            assert rec.accepted == [t.client_id for t in ts]
            losses.append(rec.train_loss)
        finals.append((server.global_vector.clone(), losses))
    torch.testing.assert_close(finals[0][0], finals[1][0], rtol=1e-5, atol=1e-6)
    assert finals[0][1] == pytest.approx(finals[1][1], rel=1e-5)


def test_a_nonfinite_client_is_rejected_alone_in_a_vectorized_group():
    ts = tasks(4)
    ts[2] = Task(2, ts[2].support_x * float("inf"), ts[2].support_y, ts[2].query_x, ts[2].query_y, n_classes=3)
    server = Server(learner("fomaml", outer_steps=1), Plaintext(), Mean())
    rec = server.run_round(0, [Client(t) for t in ts])
    assert 2 in rec.rejected and rec.accepted == [0, 1, 3]
