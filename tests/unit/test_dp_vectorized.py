"""Record-level DP cohorts as one vmap equal the per-client loop (issue 15, item 3).

Two ``RecordLevelDP`` wrappers with the same seeded noise source: one runs each client's round
on its own (the loop), the other runs the cohort as one vmap (``update_many``).  Each client's
coins and noise come from its own stream in the same order, so the updates agree to float
rounding, the ledgers hold the same steps and report the same epsilon.
"""

from __future__ import annotations

import math

import pytest
import torch

from securefml.client import Client
from securefml.cohort import train_cohort
from securefml.data import make_digits_fewshot
from securefml.errors import PrivacyBudgetExceeded
from securefml.meta import LEARNERS, MetaConfig, MetaSGD
from securefml.models import make_model
from securefml.privacy import RecordLevelDP
from securefml.privacy.randomness import NoiseSource

DIGITS = make_digits_fewshot(n_train=5, n_heldout=1, k_shot=3, query=3, seed=0)


def _learner(name: str):  # type: ignore[no-untyped-def]
    cfg = MetaConfig(inner_steps=2, inner_lr=0.1, outer_lr=0.1, outer_steps=2)
    model = make_model(DIGITS, hidden=(8,), seed=0)
    if name == "metasgd-fo":
        return MetaSGD(model, cfg, first_order=True)
    return LEARNERS.create(name, model=model, config=cfg)


def _pair(name: str, **kw):  # type: ignore[no-untyped-def]
    opts = {"noise_multiplier": 0.8, "max_grad_norm": 0.5, "sample_rate": 0.6, "allow_support_leak": True, **kw}
    return (RecordLevelDP(_learner(name), source=NoiseSource.seeded(7), **opts),
            RecordLevelDP(_learner(name), source=NoiseSource.seeded(7), **opts))


@pytest.mark.parametrize("name", ["fedavg", "reptile", "fomaml", "metasgd-fo", "maml"])
def test_vectorized_dp_cohort_equals_the_loop(name: str) -> None:
    loop, vec = _pair(name)
    params = loop.init_params()
    tasks = list(DIGITS.train)
    assert vec.vectorizes(tasks)
    for _ in range(2):  # two rounds: the streams and ledgers carry over
        expected = [loop.update(params, t) for t in tasks]
        got = vec.update_many(params, tasks)
        for (e_upd, e_met), (g_upd, g_met) in zip(expected, got):
            for n in e_upd:
                torch.testing.assert_close(g_upd[n], e_upd[n], rtol=1e-4, atol=1e-5)
            assert g_met.keys() == e_met.keys()
            assert all(math.isclose(g_met[k], e_met[k], rel_tol=1e-4, abs_tol=1e-5) for k in e_met)
        params = {n: p + 0.5 * expected[0][0][n] for n, p in params.items()}
    assert vec.epsilons() == loop.epsilons()  # the accountant is unchanged: the same steps, the same epsilon
    for cid in loop.clients:
        a, b = loop.clients[cid], vec.clients[cid]
        assert (a.participations, a.gradients.steps, a.ledger.steps) == (b.participations, b.gradients.steps,
                                                                          b.ledger.steps)


def test_noise_is_really_drawn_and_differs_per_client() -> None:
    """Not a zero-noise coincidence: each client's released update carries its own noise."""
    _, vec = _pair("fedavg", noise_multiplier=2.0, sample_rate=1.0)
    _, quiet = _pair("fedavg", noise_multiplier=0.0, sample_rate=1.0)
    params = vec.init_params()
    tasks = list(DIGITS.train)
    noisy = vec.update_many(params, tasks)
    clean = quiet.update_many(params, tasks)
    deltas = [torch.cat([(a[0][n] - b[0][n]).reshape(-1) for n in a[0]]) for a, b in zip(noisy, clean)]
    assert all(float(d.abs().max()) > 1e-3 for d in deltas)
    assert float((deltas[0] - deltas[1]).abs().max()) > 1e-3


def test_spent_budget_refuses_the_group_and_the_cohort_falls_back_per_client() -> None:
    loop, vec = _pair("fedavg", max_participations=1)
    params = vec.init_params()
    tasks = list(DIGITS.train)
    vec.update_many(params, tasks[:2])  # clients 0 and 1 spend their one round
    with pytest.raises(PrivacyBudgetExceeded, match=f"client {tasks[0].client_id}"):
        vec.update_many(params, tasks)
    assert all(vec.clients[t.client_id].participations == 1 for t in tasks[:2])  # nothing booked by the refusal
    layout = vec.layout()
    results, rejected = train_cohort(vec, params, layout, [Client(t) for t in tasks])
    assert set(rejected) == {t.client_id for t in tasks[:2]}
    assert {r.client_id for r in results} == {t.client_id for t in tasks[2:]}


def test_expanded_weights_only_and_repeated_clients_keep_the_loop() -> None:
    loop, _ = _pair("fedavg", per_sample="expanded-weights")
    tasks = list(DIGITS.train)
    assert not loop.vectorizes(tasks)
    _, vec = _pair("fedavg")
    assert not vec.vectorizes([tasks[0], tasks[0]])
