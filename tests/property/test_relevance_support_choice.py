"""Support-split choice of Co-LoRA's shared part (``securefml.relevance.support_choice``).

The adversary here is the other candidate: hypothesis chooses the cross-architecture shared
part a client is offered (any direction, any scale); whatever it is, the client's choice follows
the rule on its own support set, and a client whose split prefers its own part gets exactly it.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.data import make_digits_clusters
from securefml.errors import ConfigError
from securefml.relevance import (
    CoLoRAMLP,
    HeteroConfig,
    check_grid,
    choose_shared,
    load_shared,
    mix_shared,
    pick,
    run_heterogeneous,
    shared_state,
    shot_folds,
    support_split_loss,
)

GRID = (0.0, 0.5, 1.0)


def _model() -> CoLoRAMLP:
    torch.manual_seed(0)
    return CoLoRAMLP(8, (16,), 3, rank=2, family_seed=0)


def _support(seed: int, shots: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat(shots)
    x = torch.randn(len(y), 8, generator=gen) + 2.0 * torch.nn.functional.one_hot(y, 8).float()
    return x, y


def _fitter(model: CoLoRAMLP, shared: dict[str, torch.Tensor], arch: dict[str, torch.Tensor]):
    """A real fit: load the candidate, Adam on the adapters for ``steps`` on the given examples."""
    def fit(x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.nn.Module:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, v in arch.items():
                params[n].copy_(v)
        load_shared(model, shared)
        opt = torch.optim.Adam([p for n, p in model.named_parameters() if ".base." not in n], lr=0.01)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return model
    return fit


def _arch(model: CoLoRAMLP) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_P" not in n and "lora_Q" not in n}


def _candidates(seed: int, scale: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    own = shared_state(_model())
    gen = torch.Generator().manual_seed(seed)
    cross = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in own.items()}
    return cross, own


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.0, 50.0), lam=st.floats(0.0, 1.0))
def test_every_mixture_is_a_convex_combination_of_the_two_candidates(seed, scale, lam):
    cross, own = _candidates(seed, scale)
    mix = mix_shared(cross, own, lam)
    assert mix.keys() == own.keys()
    for k in own:
        lo, hi = torch.minimum(cross[k], own[k]), torch.maximum(cross[k], own[k])
        assert bool(((mix[k] >= lo - 1e-5) & (mix[k] <= hi + 1e-5)).all())
        assert torch.allclose(mix[k], lam * cross[k] + (1 - lam) * own[k], atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(mix_shared(cross, own, 0.0).values(), own.values()))
    assert all(torch.equal(a, b) for a, b in zip(mix_shared(cross, own, 1.0).values(), cross.values()))


@given(scores=st.lists(st.sampled_from([0.0, 1.0, 2.5]), min_size=3, max_size=3))
def test_the_rule_takes_the_lowest_score_and_a_tie_to_more_sharing(scores):
    i = pick(scores, GRID)
    assert scores[i] == min(scores)
    assert all(GRID[j] <= GRID[i] for j, s in enumerate(scores) if s == min(scores))


def test_bad_grids_and_scores_are_refused():
    for grid in ((), (0.0, 1.5), (0.5, 0.5), (float("nan"),)):
        with pytest.raises(ConfigError):
            check_grid(grid)
    with pytest.raises(ConfigError):
        pick([float("nan"), 1.0], (0.0, 1.0))
    with pytest.raises(ConfigError, match="client 7"):  # one shot per class cannot be split
        x, y = _support(0, shots=1)
        support_split_loss(_fitter(_model(), *_candidates(0, 0.0)[1:], {}), x, y, 5, client=7)


def test_leave_one_shot_out_folds_hold_out_one_shot_of_every_class():
    y = torch.tensor([2, 0, 1, 0, 2, 1, 0])
    folds = shot_folds(y)
    assert len(folds) == 2  # the rarest class has 2 shots
    for f in folds:
        assert sorted(y[f].tolist()) == [0, 1, 2]
    assert not bool((folds[0] & folds[1]).any())


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.0, 30.0), steps=st.sampled_from([0, 2]))
def test_choice_follows_the_rule_and_own_preference_gets_exactly_own(seed, scale, steps):
    model = _model()
    arch = _arch(model)
    cross, own = _candidates(seed, scale)
    x, y = _support(seed)

    def score(shared):
        return support_split_loss(_fitter(model, shared, arch), x, y, steps)

    lam, chosen, scores = choose_shared(cross, own, GRID, score)
    again = choose_shared(cross, own, GRID, score)  # deterministic given its inputs
    assert again[0] == lam and again[2] == scores
    assert all(torch.equal(chosen[k], again[1][k]) for k in chosen)
    # the scores recomputed independently, and the rule applied to them
    expect = [support_split_loss(_fitter(model, mix_shared(cross, own, g), arch), x, y, steps) for g in GRID]
    assert scores == expect
    assert lam == GRID[pick(expect, GRID)]
    if lam == 0.0:
        assert all(torch.equal(chosen[k], own[k]) for k in own)


def test_a_client_whose_split_prefers_its_own_part_gets_exactly_it():
    model = _model()
    x, y = _support(1, shots=3)
    fit = _fitter(model, shared_state(model), _arch(model))
    fit(x, y, 60)  # the client's own part: fitted to its task
    arch, own = _arch(model), shared_state(model)
    gen = torch.Generator().manual_seed(2)
    cross = {k: v + 3.0 * torch.randn(v.shape, generator=gen) for k, v in own.items()}
    lam, chosen, scores = choose_shared(cross, own, GRID,
                                        lambda s: support_split_loss(_fitter(model, s, arch), x, y, 2))
    assert lam == 0.0 and scores[0] < scores[2]
    assert all(torch.equal(chosen[k], own[k]) for k in own)


# -- the federation -------------------------------------------------------------------------------


def _data():
    return make_digits_clusters(seed=3, groups=2, n_train=8, n_heldout=6, k_shot=2, query=2,
                                architectures="32,64", heldout_architecture_shares=[1, 1],
                                architectures_per_group=True)


BASE = dict(rounds=3, clients_per_round=6, local_steps=3, finetune_steps=0, rank=4, seed=3, relevance=True,
            temperature=0.2, choice_steps=2)


def test_federation_choice_is_deterministic_and_the_one_value_grids_are_the_two_rules():
    data = _data()
    chosen = run_heterogeneous(data, HeteroConfig(**BASE, support_choice=GRID))
    again = run_heterogeneous(data, HeteroConfig(**BASE, support_choice=GRID))
    assert chosen.per_client == again.per_client and chosen.chosen_lambda == again.chosen_lambda
    assert set(chosen.chosen_lambda) == {t.client_id for t in data.heldout}
    assert set(chosen.chosen_lambda.values()) <= set(GRID)
    assert sum(chosen.training_choices.values()) == 3 * 6  # one choice per cohort client and round
    # grid {1}: the ungated rule; grid {0}: every client keeps its own architecture's part (= alone)
    ungated = run_heterogeneous(data, HeteroConfig(**BASE))
    assert run_heterogeneous(data, HeteroConfig(**BASE, support_choice=(1.0,))).per_client == ungated.per_client
    alone = run_heterogeneous(data, HeteroConfig(**BASE, share=False))
    assert run_heterogeneous(data, HeteroConfig(**BASE, support_choice=(0.0,))).per_client == alone.per_client


def test_support_choice_needs_the_plaintext_relevance_rule():
    for bad in (dict(relevance=False), dict(own_evidence=2.0), dict(protocol="policy"),
                dict(support_choice=(0.0, 2.0)), dict(choice_steps=-1)):
        with pytest.raises(ConfigError):
            HeteroConfig(**{**BASE, "support_choice": GRID, **bad})
