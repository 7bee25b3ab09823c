"""Model-poisoning attacks: the malicious clients rewrite their own update vectors."""

from __future__ import annotations

import torch

from securefml.attacks.base import Attack, AttackContext
from securefml.errors import ConfigError

__all__ = ["SignFlip"]


class SignFlip(Attack):
    """Send ``-scale`` times the honest update one would have sent (bit/sign flipping).

    Threat model: each malicious client acts on its own data only (not omniscient).
    Reference: Allen-Zhu et al., 2020; the "bit-flip" attack of Karimireddy et al., 2021.
    """

    name = "signflip"

    def __init__(self, scale: float = 1.0) -> None:
        if not scale > 0:
            raise ConfigError(f"SignFlip scale must be positive, got {scale}")
        self.scale = float(scale)

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        return -self.scale * own
