"""The dataset registry: the names ``--dataset`` accepts.

Imports nothing of the package at run time (see ``securefml.registry.import_submodules``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from securefml.registry import Registry

if TYPE_CHECKING:
    from securefml.data.base import FederatedDataset

__all__ = ["DATASETS"]

DATASETS: Registry[FederatedDataset] = Registry("dataset")
