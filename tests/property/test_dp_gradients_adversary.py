"""The DP gradient function against adversarial examples: the sensitivity the accountant assumes holds.

Neighbouring local datasets differ in one example, and that example may be anything: huge
inputs, targets far from the data, infinities, NaN.  With sampling rate 1 and no noise the
released gradient times the expected batch size is the clipped sum; removing any one example
moves it by at most C, replacing one by at most 2C, whatever that example is (real torch model,
real ``vmap`` per-example gradients).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.privacy import DPGradients, Ledger, NoiseSource

D_IN, D_OUT = 3, 2
MODEL = torch.nn.Sequential(torch.nn.Linear(D_IN, 4), torch.nn.Tanh(), torch.nn.Linear(4, D_OUT))
PARAMS = {n: p.detach() for n, p in MODEL.named_parameters()}
WILD = st.floats(allow_nan=True, allow_infinity=True, width=32)
TAME = st.floats(-10.0, 10.0, width=32)


def _loss(p, x, y):  # type: ignore[no-untyped-def]
    out = torch.func.functional_call(MODEL, p, (x,))
    return torch.nn.functional.mse_loss(out, y)


def _clipped_sum(xs: torch.Tensor, ys: torch.Tensor, c: float, engine: str) -> torch.Tensor:
    dp = DPGradients(noise_multiplier=0.0, max_grad_norm=c, sample_rate=1.0, ledger=Ledger("rdp", 1e-5),
                     source=NoiseSource.seeded(0), per_sample=engine)
    g = dp(_loss, PARAMS, (xs, ys))
    assert dp.ledger.steps == 1
    return torch.cat([t.flatten() for t in g.values()]) * len(xs)


def _rows(n: int, width: int, elements: st.SearchStrategy[float]) -> st.SearchStrategy[list[list[float]]]:
    return st.lists(st.lists(elements, min_size=width, max_size=width), min_size=n, max_size=n)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), data=st.data(), c=st.floats(0.01, 10.0), which=st.integers(0, 5),
       engine=st.sampled_from(["vmap", "expanded-weights"]))
def test_one_arbitrary_example_moves_the_clipped_sum_by_at_most_c(n: int, data: st.DataObject, c: float,
                                                                    which: int, engine: str) -> None:
    xs = torch.tensor(data.draw(_rows(n, D_IN, TAME)))
    ys = torch.tensor(data.draw(_rows(n, D_OUT, TAME)))
    evil_x = torch.tensor(data.draw(_rows(1, D_IN, WILD)))
    evil_y = torch.tensor(data.draw(_rows(1, D_OUT, WILD)))
    i = which % n
    base = _clipped_sum(xs, ys, c, engine)
    assert torch.isfinite(base).all()
    # add the adversary's example
    added = _clipped_sum(torch.cat([xs, evil_x]), torch.cat([ys, evil_y]), c, engine)
    assert torch.isfinite(added).all()
    assert float((added - base).norm()) <= c * (1 + 1e-4) + 1e-5
    # replace example i by it
    rx, ry = xs.clone(), ys.clone()
    rx[i], ry[i] = evil_x[0], evil_y[0]
    replaced = _clipped_sum(rx, ry, c, engine)
    assert float((replaced - base).norm()) <= 2 * c * (1 + 1e-4) + 1e-5


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), sigma=st.floats(0.5, 3.0), evil=_rows(1, D_IN, WILD))
def test_released_gradient_is_finite_whatever_the_example(seed: int, sigma: float, evil: list[list[float]]) -> None:
    """With noise and sampling on, an adversarial example never makes the release non-finite."""
    dp = DPGradients(noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=0.7, ledger=Ledger("rdp", 1e-5),
                     source=NoiseSource.seeded(seed))
    xs = torch.cat([torch.randn(4, D_IN, generator=torch.Generator().manual_seed(seed)), torch.tensor(evil)])
    g = dp(_loss, PARAMS, (xs, torch.zeros(5, D_OUT)))
    assert all(torch.isfinite(t).all() for t in g.values())
    assert dp.ledger.history == ((sigma, 0.7, 1),)
