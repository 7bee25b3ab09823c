"""Attacks specific to federated meta-learning.

A meta-learned initialisation is not the model victims use: each victim fine-tunes it on its
own support set first.  A plain backdoor tends to be washed out by that fine-tuning; and
Meta-SGD also meta-learns the per-parameter inner learning rates, a small set of parameters
that controls every victim's personalization and is an attack surface of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from securefml.attacks.base import Attack, AttackContext
from securefml.attacks.data_poisoning import SPLITS, Backdoor
from securefml.attacks.model_poisoning import benign_reference
from securefml.attacks.registry import ATTACKS
from securefml.data.base import Task
from securefml.errors import ConfigError

__all__ = ["MetaBackdoor", "MetaSGDLearningRate"]


@ATTACKS.register("meta-backdoor", positional="target")
class MetaBackdoor(Attack):
    """A backdoor aimed at the meta-initialisation, meant to survive personalization.

    Two changes over a plain ``Backdoor``:

    1. **Both splits are poisoned.**  The meta-gradient is computed on the query set *after*
       adapting on the support set, so poisoning the query split makes the meta-objective
       itself ask for "the backdoor still works after a few fine-tuning steps on (partly
       triggered) data" -- the initialisation is pushed to where fine-tuning keeps it.
    2. **The backdoor part of the update is boosted.**  With the honest updates known
       (omniscient) the malicious row is ``mean_h + boost * (own - mean_h)``: only the part
       that differs from the honest consensus is scaled, which keeps the row's honest
       component intact.  Without them, the whole update is scaled (model replacement).  An
       optional ``max_norm`` clips each row to evade norm bounding (Sun et al. 2019).

    Threat model: ``f`` colluding clients with their own (poisoned) data; optional omniscience.
    Victims are the held-out clients who personalize the meta-model.

    Parameters
    ----------
    target, fraction, trigger, patch, features, value, image_side:
        As for ``Backdoor``.
    boost:
        Factor on the backdoor part of the update (1 = no boost).
    max_norm:
        Clip each malicious row to this L2 norm (None = no clipping).
    omniscient:
        Use the round's honest mean as the consensus the boost is measured from.

    References
    ----------
    Bagdasaryan et al., How To Backdoor Federated Learning, AISTATS 2020 (boosting);
    Chen et al., FedMeta, 2018; Fallah et al., Per-FedAvg, NeurIPS 2020 (the meta-objective
    on the query split after local adaptation).
    """

    name = "meta-backdoor"

    def __init__(
        self,
        target: int = 0,
        *,
        fraction: float = 0.5,
        trigger: str = "auto",
        patch: int = 2,
        features: Sequence[int] | None = None,
        value: float | None = None,
        image_side: int | None = None,
        boost: float = 5.0,
        max_norm: float | None = None,
        omniscient: bool = False,
    ) -> None:
        if not (boost > 0 and math.isfinite(boost)):
            raise ConfigError(f"MetaBackdoor boost must be positive and finite, got {boost}")
        if max_norm is not None and not (max_norm > 0 and math.isfinite(max_norm)):
            raise ConfigError(f"MetaBackdoor max_norm must be positive and finite, got {max_norm}")
        self.backdoor = Backdoor(
            target,
            fraction=fraction,
            trigger=trigger,
            patch=patch,
            features=features,
            value=value,
            image_side=image_side,
            splits=SPLITS,
        )
        self.boost = float(boost)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.omniscient = bool(omniscient)

    @property
    def target(self) -> int:
        return self.backdoor.target

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on a batch (to measure the attack success rate on victims)."""
        return self.backdoor.apply_trigger(x)

    def poison_task(self, task: Task, *, generator: torch.Generator | None = None) -> Task:
        return self.backdoor.poison_task(task, generator=generator)

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        x = own.to(torch.float64)
        if self.omniscient:
            mu = benign_reference(own, context, omniscient=True).to(torch.float64).mean(0)
            rows = mu + self.boost * (x - mu)
        else:
            rows = self.boost * x
        if self.max_norm is not None:
            norms = rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
            rows = rows * (self.max_norm / norms).clamp(max=1.0)
        return rows.to(own.dtype)


@ATTACKS.register("metasgd-lr", positional="mode")
class MetaSGDLearningRate(Attack):
    """Poison Meta-SGD's meta-learned inner learning rates.

    Meta-SGD (Li et al. 2017) meta-learns one inner learning rate per parameter; every
    victim's personalization runs with them.  The entries of the update vector that belong
    to those learning rates are given by a boolean mask ``context.lr_mask`` (the
    federation loop builds it from the layer layout).  Only those entries are changed; every
    other entry is the client's genuine update, so rules that look at the bulk of the vector
    see an ordinary client.

    Modes
    -----
    ``"inflate"``: send ``+scale`` on every learning-rate entry (inner steps become too large:
    personalization diverges).  ``"deflate"``: send ``-scale`` (learning rates shrink towards
    zero or below: personalization stalls or ascends).  ``"flip"``: send ``-scale`` times the
    genuine learning-rate update.

    Threat model: ``f`` colluding, non-omniscient clients that know which update entries are
    the learning rates (public: the layout is broadcast).

    References
    ----------
    Li, Zhou, Chen & Li, Meta-SGD: Learning to Learn Quickly for Few-Shot Learning, 2017;
    Chen et al., FedMeta, 2018 (federated Meta-SGD).
    """

    name = "metasgd-lr"

    def __init__(self, mode: str = "inflate", *, scale: float = 1.0) -> None:
        if mode not in ("inflate", "deflate", "flip"):
            raise ConfigError(f"unknown Meta-SGD poisoning mode {mode!r}; choose one of: deflate, flip, inflate")
        if not (scale > 0 and math.isfinite(scale)):
            raise ConfigError(f"MetaSGDLearningRate scale must be positive and finite, got {scale}")
        self.mode = mode
        self.scale = float(scale)

    @staticmethod
    def lr_mask(own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        """The validated boolean mask of learning-rate entries."""
        mask = context.lr_mask
        if mask is None:
            raise ConfigError("Meta-SGD learning-rate poisoning needs context.lr_mask")
        mask = torch.as_tensor(mask, device=own.device)
        if mask.dtype != torch.bool or mask.dim() != 1 or mask.numel() != own.shape[1]:
            raise ConfigError(
                f"lr_mask must be a boolean vector of {own.shape[1]} entries, got {mask.dtype} {tuple(mask.shape)}"
            )
        if not bool(mask.any()):
            raise ConfigError("lr_mask selects no entry: the model has no learned learning rates")
        return mask

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        mask = self.lr_mask(own, context)
        out = own.clone()
        if self.mode == "inflate":
            out[:, mask] = self.scale
        elif self.mode == "deflate":
            out[:, mask] = -self.scale
        else:
            out[:, mask] = -self.scale * own[:, mask]
        return out
