"""Offline federated task datasets (``securefml.data``)."""

from __future__ import annotations

from securefml.data.base import FederatedDataset, Task
from securefml.data.clusters import ClusteredDataset, make_digits_clusters, parse_architectures
from securefml.data.digits import load_digits_tensors, make_digits_fewshot, make_digits_skew
from securefml.data.registry import DATASETS
from securefml.data.sine import make_sine
from securefml.data.synthetic import make_synthetic
from securefml.registry import import_submodules

__all__ = [
    "ClusteredDataset",
    "FederatedDataset",
    "Task",
    "DATASETS",
    "load_dataset",
    "load_digits_tensors",
    "make_digits_clusters",
    "make_digits_fewshot",
    "make_digits_skew",
    "make_sine",
    "make_synthetic",
    "parse_architectures",
]

# Every module registers its own definitions (decorators beside them); import them all.
import_submodules(__name__, __path__)



def load_dataset(name: str, *, seed: int = 0, **options: object) -> FederatedDataset:
    """Build a registered dataset by name (unknown names raise ``ConfigError`` listing the valid ones)."""
    return DATASETS.create(name, seed=seed, **options)
