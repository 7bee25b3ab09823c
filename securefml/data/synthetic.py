"""FedProx's Synthetic(alpha, beta) (Li et al., 2020): heterogeneous logistic-regression clients."""

from __future__ import annotations

import numpy as np
import torch

from securefml.data.base import FederatedDataset, Task
from securefml.data.registry import DATASETS
from securefml.errors import ConfigError

__all__ = ["make_synthetic"]


@DATASETS.register("synthetic")
def make_synthetic(
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    n_users: int = 30,
    n_heldout: int = 6,
    dim: int = 60,
    n_classes: int = 10,
    support_fraction: float = 0.5,
    max_samples: int | None = 2000,
    seed: int = 0,
) -> FederatedDataset:
    """Samples per user int(lognormal(4, 2)) + 50; u_k ~ N(0, alpha), B_k ~ N(0, beta),
    v_k ~ N(B_k, 1), x ~ N(v_k, Sigma) with Sigma = diag(j^-1.2), W_k, b_k ~ N(u_k, 1),
    y = argmax(softmax(x W_k + b_k)).  The last ``n_heldout`` users are held out.

    ``max_samples`` caps the heavy lognormal tail so one user cannot dominate memory.
    """
    if n_heldout >= n_users:
        raise ConfigError("n_heldout must be smaller than n_users")
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, n_users).astype(int) + 50
    if max_samples is not None:
        sizes = np.minimum(sizes, max_samples)
    cov_diag = np.array([(j + 1) ** -1.2 for j in range(dim)])
    tasks = []
    for k in range(n_users):
        u_k = rng.normal(0, np.sqrt(alpha))
        b_k = rng.normal(0, np.sqrt(beta))
        v_k = rng.normal(b_k, 1, dim)
        w = rng.normal(u_k, 1, (dim, n_classes))
        b = rng.normal(u_k, 1, n_classes)
        x = rng.normal(v_k, np.sqrt(cov_diag), (sizes[k], dim))
        y = np.argmax(x @ w + b, axis=1)
        xs = torch.tensor(x, dtype=torch.float32)
        ys = torch.tensor(y, dtype=torch.int64)
        cut = max(1, min(len(ys) - 1, int(len(ys) * support_fraction)))
        tasks.append(Task(k, xs[:cut], ys[:cut], xs[cut:], ys[cut:], kind="classification", n_classes=n_classes))
    train = tuple(tasks[: n_users - n_heldout])
    return FederatedDataset("synthetic", train, tuple(tasks[n_users - n_heldout :]), (dim,), "classification",
                            n_classes)
