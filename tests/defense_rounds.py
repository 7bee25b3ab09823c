"""Synthetic rounds for the detection and reputation tests (shared by several test modules)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch


def signflip_round(g: torch.Generator, ids: Sequence[int], bad: Collection[int], d: int = 60,
                   signal: float = 0.6) -> torch.Tensor:
    """Heterogeneous honest updates sharing a weak common direction; ``bad`` rows are sign-flipped."""
    common = torch.zeros(d, dtype=torch.float64)
    common[0] = 1.0
    x = signal * common + torch.randn(len(ids), d, generator=g, dtype=torch.float64) / d**0.5
    for i, c in enumerate(ids):
        if c in bad:
            x[i] = -x[i]
    return x
