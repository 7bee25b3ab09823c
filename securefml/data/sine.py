"""MAML's sine-wave regression tasks (Finn et al., 2017), one task per client."""

from __future__ import annotations

import math

import torch

from securefml.data.base import FederatedDataset, Task
from securefml.data.registry import DATASETS

__all__ = ["make_sine"]


def _sine_task(client_id: int, k_shot: int, query: int, gen: torch.Generator) -> Task:
    amplitude = 0.1 + 4.9 * torch.rand((), generator=gen).item()
    phase = math.pi * torch.rand((), generator=gen).item()
    x = -5.0 + 10.0 * torch.rand(k_shot + query, 1, generator=gen)
    y = amplitude * torch.sin(x - phase)
    return Task(client_id, x[:k_shot], y[:k_shot], x[k_shot:], y[k_shot:], kind="regression")


@DATASETS.register("sine")
def make_sine(
    *,
    n_train: int = 200,
    n_heldout: int = 50,
    k_shot: int = 10,
    query: int = 10,
    heldout_query: int = 100,
    seed: int = 0,
) -> FederatedDataset:
    """Amplitude in [0.1, 5], phase in [0, pi], x uniform in [-5, 5]; K-shot support per client.

    Held-out clients get a larger query set so their personalized MSE is measured precisely.
    """
    gen = torch.Generator().manual_seed(seed)
    train = tuple(_sine_task(i, k_shot, query, gen) for i in range(n_train))
    heldout = tuple(_sine_task(n_train + i, k_shot, heldout_query, gen) for i in range(n_heldout))
    return FederatedDataset("sine", train, heldout, (1,), "regression", None)
