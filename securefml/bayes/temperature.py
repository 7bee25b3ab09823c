"""Post-hoc temperature scaling (Guo et al., ICML 2017): one scalar ``T`` that divides the logits.

``T`` is chosen to minimise the NLL of ``softmax(logits / T)`` on labelled data.  Fitting it
needs no gradient: the NLL is evaluated on a fixed logarithmic grid of temperatures (deterministic,
differentiable nowhere it matters, and safe inside ``torch.no_grad``).  In federated
personalization the only labelled data a client owns is its support set, which the model was just
fine-tuned on, so the fitted temperature is typically *below* 1 (the support set looks easy): that
is the cheap baseline users would try first, and the benchmark reports what it does.
"""

from __future__ import annotations

import torch

from securefml.errors import ConfigError

__all__ = ["fit_temperature", "TEMPERATURE_GRID"]

#: candidate temperatures, 0.05 ... 20 on a log scale (241 points)
TEMPERATURE_GRID = torch.logspace(-1.30103, 1.30103, 241, dtype=torch.float64)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, grid: torch.Tensor | None = None) -> float:
    """The temperature on ``grid`` that minimises ``NLL(softmax(logits / T), labels)``.

    Examples
    --------
    Logits that are right but far too confident on half of the examples want ``T > 1``:

    >>> logits = torch.tensor([[4.0, 0.0], [4.0, 0.0]])
    >>> fit_temperature(logits, torch.tensor([0, 1])) > 5
    True
    """
    grid = TEMPERATURE_GRID if grid is None else grid.to(torch.float64)
    if logits.dim() != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ConfigError(f"temperature scaling needs [n, C] logits and [n] labels, got {tuple(logits.shape)} "
                          f"and {tuple(labels.shape)}")
    if grid.numel() == 0 or bool((grid <= 0).any()):
        raise ConfigError("temperature grid must be non-empty and positive")
    z = logits.detach().to(torch.float64).cpu()
    y = labels.detach().cpu().long()
    if not bool(torch.isfinite(z).all()):
        return 1.0  # a diverged model: leave it alone, the report shows the damage
    logp = torch.log_softmax(z.unsqueeze(0) / grid[:, None, None], dim=-1)  # [T, n, C]
    nll = -logp.gather(2, y[None, :, None].expand(grid.numel(), -1, 1)).squeeze(2).mean(dim=1)
    return float(grid[int(torch.argmin(nll))])
