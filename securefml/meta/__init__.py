"""Meta-learners on ``torch.func`` (``securefml.meta``): FedAvg, MAML, FOMAML, Meta-SGD, Reptile.

``securefml.bayes`` builds on this package and adds its learners (``bayes-metasgd``,
``bayes-maml``, ``pfedbayes``, ``metasgd-ts``) to ``LEARNERS`` when it is imported, beside their
definitions; this package never imports it (no cycle).

Every learner takes its gradients through an injected gradient function
(``securefml.meta.gradients``: ``Gradients``, default ``PlainGradients``), which is how
record-level DP privatizes any learner without knowing its loop; learners declare the roles of
their extra meta-parameters (``layer_roles``, ``layout``) on the ``LayerLayout``.
"""

from __future__ import annotations

from securefml.meta.base import MetaConfig, MetaLearner, Params, QueryLossLearner, task_loss
from securefml.meta.gradients import Batch, Gradients, LossFn, PlainGradients
from securefml.meta.local import FedAvg, Reptile
from securefml.meta.maml import FOMAML, MAML
from securefml.meta.metasgd import ALPHA_PREFIX, MetaSGD
from securefml.meta.registry import LEARNERS
from securefml.registry import import_submodules

__all__ = [
    "ALPHA_PREFIX",
    "FOMAML",
    "LEARNERS",
    "MAML",
    "Batch",
    "Gradients",
    "LossFn",
    "FedAvg",
    "MetaConfig",
    "MetaLearner",
    "QueryLossLearner",
    "MetaSGD",
    "Params",
    "PlainGradients",
    "Reptile",
    "task_loss",
]

# Every module registers its own definitions (decorators beside them); import them all.
import_submodules(__name__, __path__)

