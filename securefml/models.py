"""Small models sized for CPU federated meta-learning on the bundled datasets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from securefml.data.base import FederatedDataset
from securefml.errors import ConfigError

__all__ = ["MLP", "make_model"]


class MLP(nn.Module):
    """Fully connected ReLU network; each ``Linear`` is one layer for selection and upload."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int) -> None:
        super().__init__()
        dims = [in_features, *hidden, out_features]
        blocks: list[nn.Module] = []
        for i in range(len(dims) - 1):
            blocks.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                blocks.append(nn.ReLU())
        self.layers = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))


def make_model(
    dataset: FederatedDataset,
    *,
    hidden: Sequence[int] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """The default model for a dataset: MAML's 40-40 MLP for sine, a 64-64 MLP for digits."""
    if hidden is None:
        hidden = (40, 40) if dataset.kind == "regression" else (64, 64)
    if any(h <= 0 for h in hidden):
        raise ConfigError(f"hidden sizes must be positive, got {tuple(hidden)}")
    in_features = int(torch.tensor(dataset.input_shape).prod())
    out = 1 if dataset.kind == "regression" else int(dataset.n_classes or 0)
    if out <= 0:
        raise ConfigError(f"dataset {dataset.name!r} declares no classes")
    torch.manual_seed(seed)
    return MLP(in_features, hidden, out).to(device)
