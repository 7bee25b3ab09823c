"""Small models sized for CPU federated meta-learning on the bundled datasets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from securefml.data.base import FederatedDataset
from securefml.errors import ConfigError

__all__ = ["MLP", "make_model", "batchnorm_on_batch_statistics", "has_running_statistics"]


def has_running_statistics(model: nn.Module) -> bool:
    """Whether any normalization layer of ``model`` tracks running statistics in place."""
    return any(isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats for m in model.modules())


def batchnorm_on_batch_statistics(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose BatchNorm layers always normalize with the batch's statistics.

    Why: a learner is a pure function of ``(params, task)`` under ``torch.func``, and a
    BatchNorm layer in training mode updates ``running_mean``/``running_var``/
    ``num_batches_tracked`` *in place*, which ``grad``/``vmap`` refuse ("attempted to call
    in-place operation").  Running statistics are also the wrong thing for meta-learning: they
    average over tasks, while each task is adapted on a few support examples.  So, as in Finn et
    al.'s MAML code (and ``torch.func.replace_all_batch_norm_modules_``, used here), BatchNorm
    keeps its affine weight and bias, which are ordinary parameters and are federated, and drops
    its running statistics: training, adaptation and evaluation all normalize with the current
    batch's statistics (transductive BatchNorm; evaluation is batched per task).  Nothing of the
    running statistics is uploaded, so no extra client statistic crosses the protocol.  The
    alternative, FedBN's per-client local statistics, needs state kept per client across
    rounds, which the stateless learners do not have.  The caller's model is left as it is.
    """
    if not has_running_statistics(model):
        return model
    import copy

    from torch.func import replace_all_batch_norm_modules_

    return replace_all_batch_norm_modules_(copy.deepcopy(model))


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
