"""Meta-learners on ``torch.func`` (``securefml.meta``): FedAvg, MAML, FOMAML, Meta-SGD, Reptile.

The registry also names the Bayesian learners of ``securefml.bayes`` (``bayes-metasgd``,
``bayes-maml``, ``pfedbayes``) and Meta-SGD with temperature scaling (``metasgd-ts``); they are
imported when first built, since ``securefml.bayes`` itself builds on this package.
"""

from __future__ import annotations

from securefml.meta.base import MetaConfig, MetaLearner, Params, task_loss
from securefml.meta.local import FedAvg, Reptile
from securefml.meta.maml import FOMAML, MAML
from securefml.meta.metasgd import ALPHA_PREFIX, MetaSGD
from securefml.registry import Registry


def _bayes(class_name: str):  # type: ignore[no-untyped-def]
    """A factory that imports ``securefml.bayes`` on first use (it depends on this package)."""

    def factory(**kwargs: object) -> MetaLearner:
        from securefml import bayes

        learner: MetaLearner = getattr(bayes, class_name)(**kwargs)
        return learner

    factory.__name__ = class_name
    return factory


__all__ = [
    "ALPHA_PREFIX",
    "FOMAML",
    "LEARNERS",
    "MAML",
    "FedAvg",
    "MetaConfig",
    "MetaLearner",
    "MetaSGD",
    "Params",
    "Reptile",
    "task_loss",
]

LEARNERS: Registry[MetaLearner] = Registry("algorithm")
LEARNERS.register("fedavg")(FedAvg)
LEARNERS.register("maml")(MAML)
LEARNERS.register("fomaml")(FOMAML)
LEARNERS.register("metasgd")(MetaSGD)
LEARNERS.register("reptile")(Reptile)
LEARNERS.register("bayes-metasgd")(_bayes("BayesMetaSGD"))
LEARNERS.register("bayes-maml")(_bayes("BayesMAML"))
LEARNERS.register("pfedbayes")(_bayes("PFedBayes"))
LEARNERS.register("metasgd-ts")(_bayes("MetaSGDTemperature"))
