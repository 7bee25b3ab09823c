"""The Bayesian prior's update through every protocol, and how variances are aggregated.

The federation merges the clients' Gaussian priors by the mean of their log-variances
(``securefml.bayes.aggregation``): these tests check that the server's new prior is exactly that
merge under plaintext, CKKS and SecAgg+, that every upload has the prior's shape, and that no
Byzantine upload (hypothesis drives it) can make the merged variance invalid, while a
precision-weighted merge can be broken by one client.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.bayes import BayesConfig, BayesMetaSGD, mean_log_variance, precision_weighted
from securefml.client import Client
from securefml.data import make_digits_fewshot
from securefml.defenses import make_defense
from securefml.errors import InvalidUpdateError
from securefml.meta import MetaConfig
from securefml.models import make_model
from securefml.protocols import PROTOCOLS
from securefml.server import Server

DATA = make_digits_fewshot(n_train=4, n_heldout=2, k_shot=2, query=2, seed=1)


def _server(protocol: str, defense: str = "mean") -> tuple[Server, BayesMetaSGD, dict[int, torch.Tensor]]:
    learner = BayesMetaSGD(make_model(DATA, hidden=(8,)), MetaConfig(inner_steps=1, inner_lr=0.1, outer_lr=1.0),
                           bayes=BayesConfig(train_samples=2, eval_samples=4))
    captured: dict[int, torch.Tensor] = {}

    def capture(client_id: int, update: torch.Tensor) -> torch.Tensor:
        captured[client_id] = update.clone()
        return update

    proto = PROTOCOLS.create(protocol)
    server = Server(learner, proto, make_defense(defense), server_optimizer="sgd", server_lr=1.0,
                    update_hook=capture)
    return server, learner, captured


@pytest.mark.parametrize("protocol, tol", [("plaintext", 1e-7), ("ckks", 1e-4), ("secagg", 1e-5)])
def test_prior_update_shape_and_merge_through_every_protocol(protocol: str, tol: float) -> None:
    server, learner, captured = _server(protocol)
    layout = server.layout
    names = layout.layer_names
    assert {"layers.0", "logvar.layers.0", "alpha.layers.0", "alpha.logvar.layers.0", "logvar.layers.2"} <= set(names)
    before = {n: t.clone() for n, t in server.params.items()}
    cohort = [Client(t) for t in DATA.train]
    rec = server.run_round(0, cohort, generator=torch.Generator().manual_seed(0))
    assert sorted(rec.accepted) == [c.client_id for c in cohort]
    assert all(v.shape == (layout.numel,) for v in captured.values())
    assert all(rec.uploaded_layers[n] == len(cohort) for n in names)  # every prior layer travelled
    # the new prior is the mean of the clients' local priors (equal support sizes)
    local = {cid: layout.unflatten(layout.flatten(before) + u) for cid, u in captured.items()}
    for n in learner.net.gaussian_names:
        lv = "logvar." + n
        mu, merged_lv = mean_log_variance(torch.stack([local[c][n].flatten() for c in local]),
                                          torch.stack([local[c][lv].flatten() for c in local]))
        assert server.params[n].shape == before[n].shape and server.params[lv].shape == before[lv].shape
        assert torch.allclose(server.params[n].flatten(), mu, atol=tol)
        assert torch.allclose(server.params[lv].flatten(), merged_lv, atol=tol)


@settings(max_examples=8, deadline=None)
@given(byzantine=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=64),
       rule=st.sampled_from(["mean", "median", "trimmedmean:f=1"]))
def test_no_finite_byzantine_upload_makes_the_merged_variance_invalid(byzantine: list[float], rule: str) -> None:
    server, learner, _ = _server("plaintext", rule)
    layout = server.layout
    vals = torch.tensor(byzantine, dtype=torch.float32)

    class Arbitrary:  # the adversary: its log-variance (and every other) upload is whatever hypothesis says
        omniscient = False

        def poison_task(self, task, generator=None):  # type: ignore[no-untyped-def]
            return task

        def poison_updates(self, updates, ctx):  # type: ignore[no-untyped-def]
            return vals.repeat(layout.numel // vals.numel() + 1)[: layout.numel].expand_as(updates).clone()

    cohort = [Client(t, attack=Arbitrary() if i == 0 else None) for i, t in enumerate(DATA.train)]  # type: ignore[arg-type]
    server.run_round(0, cohort, generator=torch.Generator().manual_seed(0))
    for n in learner.net.gaussian_names:
        var = torch.exp(learner.gaussian(server.params)["logvar." + n].clamp(-16, 2))
        assert bool(torch.isfinite(var).all()) and bool((var > 0).all())
    probs = torch.softmax(learner.forward(server.params, DATA.heldout[0].query_x), 1)
    assert bool(torch.isfinite(probs).all())
    assert torch.allclose(probs.sum(1), torch.ones(probs.shape[0], dtype=probs.dtype), atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(honest=st.lists(st.floats(0.01, 100.0), min_size=2, max_size=6), lie=st.floats(-1e6, -1e-3))
def test_precision_weighted_merge_is_broken_by_one_client(honest: list[float], lie: float) -> None:
    means = torch.zeros(len(honest) + 1, 1, dtype=torch.float64)
    precisions = torch.tensor([*honest, 0.0], dtype=torch.float64)[:, None]
    mu, lv = precision_weighted(means[:-1], precisions[:-1])
    assert math.isfinite(float(lv))
    precisions[-1, 0] = lie - sum(honest)  # one client cancels the honest precisions (unseen under SecAgg)
    with pytest.raises(InvalidUpdateError):
        precision_weighted(means, precisions)
    # the same client cannot do that to the mean of log-variances: any finite value stays a variance
    _, lv = mean_log_variance(means, torch.tensor([*[-math.log(h) for h in honest], lie], dtype=torch.float64)[:, None])
    assert math.isfinite(float(lv)) and float(torch.exp(lv.clamp(-16, 2))) > 0
