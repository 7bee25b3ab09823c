"""The learner registry: the names ``--algorithm`` accepts (the meta-learners and the Bayesian ones).

Imports nothing of the package at run time (see ``securefml.registry.import_submodules``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from securefml.registry import Registry

if TYPE_CHECKING:
    from securefml.meta.base import MetaLearner

__all__ = ["LEARNERS"]

LEARNERS: Registry[MetaLearner] = Registry("algorithm")
