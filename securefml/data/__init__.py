"""Offline federated task datasets (``securefml.data``)."""

from __future__ import annotations

from securefml.data.base import FederatedDataset, Task
from securefml.data.clusters import ClusteredDataset, make_digits_clusters, parse_architectures
from securefml.data.digits import load_digits_tensors, make_digits_fewshot, make_digits_skew
from securefml.data.sine import make_sine
from securefml.data.synthetic import make_synthetic
from securefml.registry import Registry

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

DATASETS: Registry[FederatedDataset] = Registry("dataset")
DATASETS.register("sine")(make_sine)
DATASETS.register("digits-fewshot")(make_digits_fewshot)
DATASETS.register("digits-skew")(make_digits_skew)
DATASETS.register("digits-clusters")(make_digits_clusters)
DATASETS.register("synthetic")(make_synthetic)


def load_dataset(name: str, *, seed: int = 0, **options: object) -> FederatedDataset:
    """Build a registered dataset by name (unknown names raise ``ConfigError`` listing the valid ones)."""
    return DATASETS.create(name, seed=seed, **options)
