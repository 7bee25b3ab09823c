"""A client's local task and the federated dataset that holds all clients' tasks."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from securefml.errors import DataError

__all__ = ["Task", "FederatedDataset"]


@dataclass(frozen=True)
class Task:
    """One client's data: a support split (to adapt on) and a query split (to evaluate on).

    ``kind`` is ``"classification"`` (``y`` are int64 labels in ``[0, n_classes)``) or
    ``"regression"`` (``y`` are float32 targets of shape ``[m, 1]``).  ``classes``, when the
    dataset knows it, maps each local label to the source dataset's class (position = local
    label); out-of-task detection uses it to find inputs from classes outside the task.
    """

    client_id: int
    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    kind: str = "classification"
    n_classes: int | None = None
    classes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.support_x.shape[0] == 0:
            raise DataError(f"client {self.client_id} has an empty support set")
        if self.query_x.shape[0] == 0:
            raise DataError(f"client {self.client_id} has an empty query set")
        if self.support_x.shape[0] != self.support_y.shape[0] or self.query_x.shape[0] != self.query_y.shape[0]:
            raise DataError(f"client {self.client_id}: inputs and targets differ in length")
        if self.kind not in ("classification", "regression"):
            raise DataError(f"unknown task kind {self.kind!r}")

    @property
    def n_samples(self) -> int:
        return int(self.support_x.shape[0] + self.query_x.shape[0])

    def to(self, device: torch.device | str) -> Task:
        return replace(
            self,
            support_x=self.support_x.to(device),
            support_y=self.support_y.to(device),
            query_x=self.query_x.to(device),
            query_y=self.query_y.to(device),
        )

    def with_data(self, **changes: torch.Tensor) -> Task:
        """A copy with some tensors replaced (data poisoning uses this)."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FederatedDataset:
    """Training clients (meta-train) and held-out clients (personalization evaluation)."""

    name: str
    train: tuple[Task, ...]
    heldout: tuple[Task, ...]
    input_shape: tuple[int, ...]
    kind: str
    n_classes: int | None

    def __post_init__(self) -> None:
        if not self.train:
            raise DataError(f"dataset {self.name!r} has no training clients")
