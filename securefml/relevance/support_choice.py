"""Support-split choice of the shared part: each client picks its mix of cross and own P, Q.

The relevance-weighted Co-LoRA (``hetero_relevance``) gives client i two candidate shared
parts, both mixtures of the same uploads with the same relevance row: ``cross_i`` (every
architecture) and ``own_i`` (its own architecture only).  Which one serves a client better
depends on the client: the smallest architecture group (one client per task) gains from the
other shapes' P, Q, a large group may not.  Here the client decides, on its **own support
set** only (never its query set, which scores it), among the mixtures

    ``shared_i(lam) = lam * cross_i + (1 - lam) * own_i``,  ``lam`` in a small grid (e.g. {0, 0.5, 1})

Selection rule (``docs/relevance.md``, "Support-split choice", fixed before any run was
summarised): leave-one-shot-out.  Fold k holds out the k-th support example of every class
(support order), there are as many folds as the rarest class has shots; the candidate is
adapted on the other shots (``steps`` Adam steps at the held-out fine-tuning rate, from a fresh
optimizer) and scored by its mean cross-entropy on the held-out shots; a candidate's score is
the mean over folds.  The lowest score is chosen; an exact tie goes to the larger ``lam`` (more
sharing: the ungated rule).  With ``steps = 0`` there is nothing to adapt, every fold scores
the candidate as it is, and the rule is the cross-entropy on the whole support set.
Cross-entropy rather than accuracy: with 2 shots of 10 classes a held-out fold is 10 images,
and accuracy ties on most clients.

Guarantees (tested): every mixture is a convex combination of the two candidates (entrywise
between them; ``lam = 0`` returns ``own_i`` exactly, ``lam = 1`` ``cross_i`` exactly); the
choice is a deterministic function of the candidates and the support set (no randomness); a
client whose split prefers ``lam = 0`` gets exactly its own architecture's part.  The server
learns nothing new: both candidates are computed from the round's uploads and weights, and the
choice is made on the client.  What it does not guarantee: a training client's support images
were in its own training data, so its candidates, which both contain its own upload, are
scored on data they have seen (``own_i`` weights the client itself more, which favours it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from securefml.errors import ConfigError

__all__ = ["check_grid", "mix_shared", "shot_folds", "pick", "support_split_loss", "choose_shared"]

State = dict[str, torch.Tensor]


def check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    """The grid of mixing weights, checked: non-empty, distinct, each in [0, 1]."""
    values = tuple(float(v) for v in grid)
    if not values:
        raise ConfigError("support_choice needs at least one mixing weight")
    if any(not (0.0 <= v <= 1.0) or math.isnan(v) for v in values):
        raise ConfigError(f"support_choice mixing weights must lie in [0, 1], got {values}")
    if len(set(values)) != len(values):
        raise ConfigError(f"support_choice mixing weights must be distinct, got {values}")
    return values


def mix_shared(cross: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], lam: float) -> State:
    """``lam * cross + (1 - lam) * own`` per block key (``lam`` 0 / 1: ``own`` / ``cross`` exactly)."""
    if not 0.0 <= lam <= 1.0:
        raise ConfigError(f"mixing weight must lie in [0, 1], got {lam}")
    if cross.keys() != own.keys():
        raise ConfigError(f"the two candidates hold different blocks: {sorted(cross)} vs {sorted(own)}")
    out: State = {}
    for k, o in own.items():
        c = cross[k]
        if c.shape != o.shape:
            raise ConfigError(f"shared {k}: candidate shapes {tuple(c.shape)} and {tuple(o.shape)} differ")
        if lam == 0.0:
            out[k] = o.clone()
        elif lam == 1.0:
            out[k] = c.clone()
        else:
            out[k] = (lam * c.to(torch.float64) + (1.0 - lam) * o.to(torch.float64)).to(o.dtype)
    return out


def shot_folds(y: torch.Tensor) -> list[torch.Tensor]:
    """Leave-one-shot-out folds of a support set: fold k holds out the k-th example of every class.

    Returns boolean masks of the held-out examples, as many as the rarest class has shots;
    shots beyond that are in the adaptation part of every fold.
    """
    classes = torch.unique(y)
    per_class = [torch.nonzero(y == c).flatten() for c in classes]
    k = min(len(ix) for ix in per_class)
    folds = []
    for j in range(k):
        mask = torch.zeros(len(y), dtype=torch.bool)
        for ix in per_class:
            mask[ix[j]] = True
        folds.append(mask)
    return folds


def pick(scores: Sequence[float], grid: Sequence[float]) -> int:
    """Index of the chosen mixing weight: the lowest score, an exact tie to the larger weight."""
    if len(scores) != len(grid) or not scores:
        raise ConfigError("one score per mixing weight is needed")
    if any(math.isnan(s) for s in scores):
        raise ConfigError(f"a support-split score is NaN: {list(scores)}")
    best = min(scores)
    return max((i for i, s in enumerate(scores) if s == best), key=lambda i: grid[i])


def support_split_loss(fit: Callable[[torch.Tensor, torch.Tensor, int], torch.nn.Module],
                       x: torch.Tensor, y: torch.Tensor, steps: int, *, client: object = None) -> float:
    """A candidate's leave-one-shot-out score on a support set (module docstring).

    ``fit(x_adapt, y_adapt, steps)`` loads the candidate into a model, adapts it ``steps`` on
    the given examples and returns it.  ``steps = 0``: the candidate's cross-entropy on the
    whole support set (every fold would score it unchanged).
    """
    if steps < 0:
        raise ConfigError(f"support-split adaptation steps must be >= 0, got {steps}")
    if steps == 0:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(fit(x[:0], y[:0], 0)(x), y))
    folds = shot_folds(y)
    if len(folds) < 2:
        raise ConfigError(f"client {client}: a support split needs >= 2 shots of every class to adapt on one "
                          f"and score on another, got {len(folds)}")
    losses = []
    for held in folds:
        m = fit(x[~held], y[~held], steps)
        with torch.no_grad():
            losses.append(float(torch.nn.functional.cross_entropy(m(x[held]), y[held])))
    return sum(losses) / len(losses)


def choose_shared(cross: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], grid: Sequence[float],
                  score: Callable[[State], float]) -> tuple[float, State, list[float]]:
    """The chosen ``(lam, shared part, scores per grid value)`` of one client.

    ``score(shared)`` is the client's support-split score of a candidate shared part (lower is
    better, e.g. ``support_split_loss``).  A grid of one value skips the scoring.
    """
    values = check_grid(grid)
    mixes = [mix_shared(cross, own, lam) for lam in values]
    if len(values) == 1:
        return values[0], mixes[0], [float("nan")]
    scores = [float(score(m)) for m in mixes]
    i = pick(scores, values)
    return values[i], mixes[i], scores
