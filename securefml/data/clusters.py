"""``digits-clusters``: clients in G groups whose tasks conflict (one label permutation per group).

Why this dataset
----------------
Relevance-aware personalized aggregation (FedMosaic, Seo et al., ICLR 2026) pays off when
clients' tasks interfere: averaging a client's model with those of unrelated clients hurts it.
Here every group ``g`` relabels scikit-learn's bundled digits with its own permutation
``pi_g`` of the 10 classes and (by default) shows the images through its own fixed permutation
of the 64 pixels (group 0 keeps both identities), so one global classifier must be wrong for
most groups, a model averaged within the true groups is right for all of them, and which
group a client is in is visible only through its data.

Options
-------
* ``shift_round`` / ``shift_fraction``: at round ``shift_round`` a fraction of the training
  clients move to another group (their label permutation changes; same images).  The moved
  clients' new tasks are in ``ClusteredDataset.shifted`` and the federation loop swaps them in.
* ``architectures``: the heterogeneous-architecture variant; each client is given one MLP shape
  (hidden widths) from the list, in the proportions ``architecture_shares`` (so the smallest
  architecture group can be made small, the case cross-architecture sharing is for).

Training and held-out clients draw their images from disjoint pools; every client sees all
10 classes, ``k_shot`` support and ``query`` query images per class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from securefml.data.base import FederatedDataset, Task
from securefml.data.digits import load_digits_tensors
from securefml.data.registry import DATASETS
from securefml.errors import ConfigError

__all__ = ["ClusteredDataset", "make_digits_clusters", "parse_architectures"]


@dataclass(frozen=True)
class ClusteredDataset(FederatedDataset):
    """A ``FederatedDataset`` that knows each client's true group (for oracles and reports).

    Attributes
    ----------
    groups:
        True group of each training client (same order as ``train``) before any shift.
    heldout_groups:
        True group of each held-out client.
    permutations:
        ``[G][10]``: the label each group gives to digit class c is ``permutations[g][c]``.
    shift_round:
        Round at which the clients in ``shifted`` switch to their new task (None: no shift).
    shifted:
        Client id -> (new task, new group) for the clients that move at ``shift_round``.
    architectures:
        Hidden widths of each training client's MLP (heterogeneous variant), else empty.
    heldout_architectures:
        Hidden widths of each held-out client's MLP (heterogeneous variant), else empty.
    """

    groups: tuple[int, ...] = ()
    heldout_groups: tuple[int, ...] = ()
    permutations: tuple[tuple[int, ...], ...] = ()
    shift_round: int | None = None
    shifted: tuple[tuple[int, Task, int], ...] = ()
    architectures: tuple[tuple[int, ...], ...] = ()
    heldout_architectures: tuple[tuple[int, ...], ...] = ()

    def groups_at(self, round_idx: int) -> dict[int, int]:
        """Client id -> true group at ``round_idx`` (after the shift, moved clients' new group)."""
        out = {t.client_id: g for t, g in zip(self.train, self.groups)}
        if self.shift_round is not None and round_idx >= self.shift_round:
            out.update({cid: g for cid, _, g in self.shifted})
        return out


def parse_architectures(text: str | Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """``"32,64,64x64"`` -> ``((32,), (64,), (64, 64))``: comma between shapes, ``x`` between layers."""
    if not isinstance(text, str):
        shapes = tuple(tuple(int(h) for h in s) for s in text)
    else:
        try:
            shapes = tuple(tuple(int(h) for h in part.split("x")) for part in text.split(",") if part.strip())
        except ValueError:
            raise ConfigError(f"architectures must look like 32,64,64x64; got {text!r}") from None
    if not shapes or any(not s or min(s) <= 0 for s in shapes):
        raise ConfigError(f"architectures need at least one shape of positive widths, got {text!r}")
    return shapes


def _task(client_id: int, pool: dict[int, np.ndarray], x: torch.Tensor, y: torch.Tensor, perm: Sequence[int],
          k_shot: int, query: int, rng: np.random.Generator) -> tuple[Task, np.ndarray, np.ndarray]:
    s_idx, q_idx = [], []
    for c in range(10):
        idx = rng.choice(pool[c], size=k_shot + query, replace=False)
        s_idx.append(idx[:k_shot])
        q_idx.append(idx[k_shot:])
    s, q = np.concatenate(s_idx), np.concatenate(q_idx)
    return _relabel(client_id, x, y, s, q, perm), s, q


def _relabel(client_id: int, x: torch.Tensor, y: torch.Tensor, s: np.ndarray, q: np.ndarray,
             perm: Sequence[int]) -> Task:
    p = torch.as_tensor(list(perm), dtype=torch.int64)
    return Task(client_id, x[s], p[y[s]], x[q], p[y[q]], kind="classification", n_classes=10)


@DATASETS.register("digits-clusters")
def make_digits_clusters(
    *,
    n_train: int = 32,
    n_heldout: int = 8,
    groups: int = 4,
    k_shot: int = 3,
    query: int = 5,
    heldout_fraction: float = 0.3,
    shift_round: int | None = None,
    shift_fraction: float = 0.25,
    architectures: str | Sequence[Sequence[int]] | None = None,
    architecture_shares: Sequence[float] | None = None,
    heldout_architecture_shares: Sequence[float] | None = None,
    architectures_per_group: bool = False,
    transform: str = "pixels",
    seed: int = 0,
) -> ClusteredDataset:
    """Build ``digits-clusters`` (see the module docstring).

    Parameters
    ----------
    n_train, n_heldout:
        Training and held-out clients; client ``i`` is in group ``i % groups``.
    groups:
        Number of groups G (1..10), each with its own label permutation (1: no conflict, for
        the heterogeneous-architecture variant alone).
    k_shot, query:
        Support and query images per class and client.
    shift_round, shift_fraction:
        At ``shift_round`` the first ``round(shift_fraction * n_train)`` training clients of a
        seeded order move to the next group (``g -> (g + 1) % G``).
    transform:
        ``"pixels"`` (default): every group but group 0 also permutes the 64 input pixels with
        its own fixed permutation, so the groups conflict in the first layer as well as in the
        labels and a few fine-tuning steps of one global model cannot undo the conflict;
        ``"none"``: label permutations only.
    architectures, architecture_shares:
        Heterogeneous variant: MLP shapes (``"32,64,64x64"``) and the share of clients of each
        (default: equal shares); assignment is interleaved so every group has every shape
        where the counts allow.
    heldout_architecture_shares:
        Shares of the shapes among held-out clients (default: ``architecture_shares``).  The
        held-out clients only measure; equal shares give the smallest training group as many
        held-out clients as the others, so its accuracy is not the noisiest figure.
    architectures_per_group:
        Assign the shapes within each group (training and held-out separately), so every group
        has every shape in the given shares (the interleaved global assignment can leave a
        group without the smallest shape when its count is not a multiple of ``groups``).
    """
    if not 1 <= groups <= 10:
        raise ConfigError(f"groups must be in [1, 10], got {groups}")
    if n_train < groups or n_heldout < 0:
        raise ConfigError(f"need at least one training client per group ({groups}), got n_train={n_train}")
    if k_shot < 1 or query < 1:
        raise ConfigError(f"k_shot and query must be >= 1, got {k_shot}, {query}")
    if shift_round is not None and shift_round < 1:
        raise ConfigError(f"shift_round must be >= 1, got {shift_round}")
    if not 0 <= shift_fraction <= 1:
        raise ConfigError(f"shift_fraction must be in [0, 1], got {shift_fraction}")
    if transform not in ("pixels", "none"):
        raise ConfigError(f"transform must be 'pixels' or 'none', got {transform!r}")
    x0, y = load_digits_tensors()
    rng = np.random.default_rng(seed)
    pixel = [np.arange(64)] + [rng.permutation(64) for _ in range(groups - 1)]
    if transform == "none":
        pixel = [np.arange(64)] * groups
    views = [x0[:, torch.as_tensor(p)] for p in pixel]  # group g sees the images through pixel[g]
    perms: list[tuple[int, ...]] = [tuple(range(10))]
    while len(perms) < groups:
        p = tuple(int(v) for v in rng.permutation(10))
        # conflicting tasks: a new permutation must move most classes relative to every other one
        if all(sum(a != b for a, b in zip(p, q)) >= 8 for q in perms):
            perms.append(p)
    labels = y.numpy()
    order = rng.permutation(len(labels))
    cut = int(len(order) * (1 - heldout_fraction))
    pools = [{c: order[:cut][labels[order[:cut]] == c] for c in range(10)},
             {c: order[cut:][labels[order[cut:]] == c] for c in range(10)}]
    for name, pool in zip(("training", "held-out"), pools):
        if min(len(v) for v in pool.values()) < k_shot + query:
            raise ConfigError(f"{name} image pool too small for {k_shot}-shot + {query} query per class")
    train, train_groups, indices = [], [], []
    for i in range(n_train):
        task, s, q = _task(i, pools[0], views[i % groups], y, perms[i % groups], k_shot, query, rng)
        train.append(task)
        train_groups.append(i % groups)
        indices.append((s, q))
    heldout, held_groups = [], []
    for i in range(n_heldout):
        task, _, _ = _task(n_train + i, pools[1], views[i % groups], y, perms[i % groups], k_shot, query, rng)
        heldout.append(task)
        held_groups.append(i % groups)
    shifted: list[tuple[int, Task, int]] = []
    if shift_round is not None:
        movers = rng.permutation(n_train)[: int(round(shift_fraction * n_train))]
        for i in sorted(int(m) for m in movers):
            g = (train_groups[i] + 1) % groups
            s, q = indices[i]
            shifted.append((i, _relabel(i, views[g], y, s, q, perms[g]), g))
    arch: tuple[tuple[int, ...], ...] = ()
    held_arch: tuple[tuple[int, ...], ...] = ()
    if architectures is not None:
        shapes = parse_architectures(architectures)
        held_shares = architecture_shares if heldout_architecture_shares is None else heldout_architecture_shares
        if architectures_per_group:
            arch = _assign_per_group(shapes, architecture_shares, train_groups)
            held_arch = _assign_per_group(shapes, held_shares, held_groups)
        else:
            arch = _assign(shapes, architecture_shares, n_train)
            held_arch = _assign(shapes, held_shares, n_heldout)
    return ClusteredDataset(
        "digits-clusters", tuple(train), tuple(heldout), (64,), "classification", 10,
        groups=tuple(train_groups), heldout_groups=tuple(held_groups), permutations=tuple(perms),
        shift_round=shift_round, shifted=tuple(shifted), architectures=arch, heldout_architectures=held_arch,
    )


def _assign_per_group(shapes: Sequence[tuple[int, ...]], shares: Sequence[float] | None,
                      groups: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """``_assign`` within each group: every group gets the shapes in the same proportions."""
    out: list[tuple[int, ...]] = [()] * len(groups)
    for g in sorted(set(groups)):
        members = [i for i, h in enumerate(groups) if h == g]
        for i, s in zip(members, _assign(shapes, shares, len(members))):
            out[i] = s
    return tuple(out)


def _assign(shapes: Sequence[tuple[int, ...]], shares: Sequence[float] | None, n: int) -> tuple[tuple[int, ...], ...]:
    """Give ``n`` clients shapes in proportion to ``shares``, interleaved (largest remainder)."""
    w = np.ones(len(shapes)) if shares is None else np.asarray(list(shares), dtype=np.float64)
    if w.shape != (len(shapes),) or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"architecture_shares must be {len(shapes)} non-negative numbers, got {shares}")
    w = w / w.sum()
    out: list[tuple[int, ...]] = []
    given = np.zeros(len(shapes))
    for i in range(n):
        k = int(np.argmax(w * (i + 1) - given))  # the shape furthest behind its share
        given[k] += 1
        out.append(tuple(shapes[k]))
    return tuple(out)
