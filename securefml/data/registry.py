"""The dataset registry: the names ``--dataset`` accepts.

Each definition registers itself with a decorator beside it (``@DATASETS.register("name")``); the package
``__init__`` imports the modules, so importing the package fills the registry.  This module imports
nothing from the package at run time, so any module of it can import the registry without a cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from securefml.registry import Registry

if TYPE_CHECKING:
    from securefml.data.base import FederatedDataset

__all__ = ["DATASETS"]

DATASETS: Registry[FederatedDataset] = Registry("dataset")
