"""scikit-learn's bundled digits (1797 8x8 images, offline) split into federated tasks.

Two settings:

* ``digits-fewshot``: N-way K-shot tasks; each client holds its own N classes with its own
  random label assignment, so no single global classifier fits every client.  Training and
  held-out clients draw from disjoint image pools.
* ``digits-skew``: the classic non-IID split, by label skew (``classes_per_client``) or by a
  Dirichlet(alpha) over labels; each client's samples are split into support and query.
"""

from __future__ import annotations

import numpy as np
import torch

from securefml.data.base import FederatedDataset, Task
from securefml.data.registry import DATASETS
from securefml.errors import ConfigError

__all__ = ["load_digits_tensors", "make_digits_fewshot", "make_digits_skew"]


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as float32 features scaled to [0, 1] (64 per image) and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return x, y


def _by_class(indices: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    return {c: indices[labels[indices] == c] for c in range(10)}


def _fewshot_task(
    client_id: int,
    pool: dict[int, np.ndarray],
    x: torch.Tensor,
    n_way: int,
    k_shot: int,
    query: int,
    rng: np.random.Generator,
) -> Task:
    classes = rng.choice(10, size=n_way, replace=False)  # position = the client's own label
    sx, sy, qx, qy = [], [], [], []
    for label, c in enumerate(classes):
        idx = rng.choice(pool[int(c)], size=k_shot + query, replace=False)
        sx.append(x[idx[:k_shot]])
        qx.append(x[idx[k_shot:]])
        sy += [label] * k_shot
        qy += [label] * query
    return Task(
        client_id, torch.cat(sx), torch.tensor(sy), torch.cat(qx), torch.tensor(qy),
        kind="classification", n_classes=n_way, classes=tuple(int(c) for c in classes),
    )


@DATASETS.register("digits-fewshot")
def make_digits_fewshot(
    *,
    n_train: int = 100,
    n_heldout: int = 30,
    n_way: int = 5,
    k_shot: int = 5,
    query: int = 10,
    heldout_fraction: float = 0.3,
    seed: int = 0,
) -> FederatedDataset:
    if not 2 <= n_way <= 10:
        raise ConfigError(f"n_way must be in [2, 10], got {n_way}")
    x, y = load_digits_tensors()
    rng = np.random.default_rng(seed)
    labels = y.numpy()
    perm = rng.permutation(len(labels))
    cut = int(len(perm) * (1 - heldout_fraction))
    train_pool, held_pool = _by_class(perm[:cut], labels), _by_class(perm[cut:], labels)
    need = k_shot + query
    for name, pool in (("training", train_pool), ("held-out", held_pool)):
        if min(len(v) for v in pool.values()) < need:
            raise ConfigError(f"{name} image pool too small for {k_shot}-shot + {query} query per class")
    train = tuple(_fewshot_task(i, train_pool, x, n_way, k_shot, query, rng) for i in range(n_train))
    heldout = tuple(
        _fewshot_task(n_train + i, held_pool, x, n_way, k_shot, query, rng) for i in range(n_heldout)
    )
    return FederatedDataset("digits-fewshot", train, heldout, (64,), "classification", n_way)


def _split_task(client_id: int, idx: np.ndarray, x: torch.Tensor, y: torch.Tensor, support_frac: float,
                rng: np.random.Generator) -> Task:
    idx = rng.permutation(idx)
    k = max(1, min(len(idx) - 1, int(round(len(idx) * support_frac))))
    s, q = idx[:k], idx[k:]
    return Task(client_id, x[s], y[s], x[q], y[q], kind="classification", n_classes=10)


@DATASETS.register("digits-skew")
def make_digits_skew(
    *,
    n_clients: int = 30,
    n_heldout: int = 5,
    classes_per_client: int | None = 2,
    alpha: float | None = None,
    support_fraction: float = 0.5,
    seed: int = 0,
) -> FederatedDataset:
    """Label-skewed digits: ``classes_per_client`` shards per client, or Dirichlet(``alpha``).

    Exactly one of the two partitioners is used (``alpha`` wins when given).  The last
    ``n_heldout`` clients are held out for personalization.
    """
    total = n_clients + n_heldout
    x, y = load_digits_tensors()
    labels = y.numpy()
    rng = np.random.default_rng(seed)
    if alpha is not None:
        if alpha <= 0:
            raise ConfigError(f"Dirichlet alpha must be positive, got {alpha}")
        parts = _dirichlet_partition(labels, total, alpha, rng)
    else:
        if classes_per_client is None or not 1 <= classes_per_client <= 10:
            raise ConfigError(f"classes_per_client must be in [1, 10], got {classes_per_client}")
        parts = _shard_partition(labels, total, classes_per_client, rng)
    tasks = [_split_task(i, p, x, y, support_fraction, rng) for i, p in enumerate(parts)]
    return FederatedDataset("digits-skew", tuple(tasks[:n_clients]), tuple(tasks[n_clients:]), (64,),
                            "classification", 10)


def _shard_partition(labels: np.ndarray, n: int, c: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Sort by label, cut into n*c shards, give each client c shards (McMahan et al., 2017)."""
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, n * c)
    assignment = rng.permutation(n * c)
    return [np.concatenate([shards[j] for j in assignment[i * c : (i + 1) * c]]) for i in range(n)]


def _dirichlet_partition(labels: np.ndarray, n: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, split its samples across clients with proportions ~ Dirichlet(alpha)."""
    parts: list[list[int]] = [[] for _ in range(n)]
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet(alpha * np.ones(n))
        cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i] += chunk.tolist()
    # every client needs at least 2 samples (one support, one query): borrow from the largest
    for i in range(n):
        while len(parts[i]) < 2:
            donor = max(range(n), key=lambda j: len(parts[j]))
            parts[i].append(parts[donor].pop())
    return [np.asarray(p) for p in parts]
