"""Cedar's Byzantine detector: representational similarity of client models and the global model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from securefml.defenses.base import AggregationResult, Defense
from securefml.defenses.distance import combine
from securefml.defenses.registry import DEFENSES
from securefml.errors import ConfigError
from securefml.reveals import Reveals

__all__ = ["similarity_matrix", "corr2", "two_means_low", "representational_scores", "CedarDetector"]


def similarity_matrix(outputs: torch.Tensor, *, softmax: bool = True) -> torch.Tensor:
    """``[s, s]`` cosine similarities between a model's (softmax) outputs on ``s`` stimuli."""
    out = outputs.to(torch.float64).reshape(outputs.shape[0], -1)
    if softmax:
        out = out.softmax(dim=-1)
    nrm = out.norm(dim=1).clamp_min(1e-300)
    return (out @ out.T) / (nrm[:, None] * nrm[None, :])


def corr2(a: torch.Tensor, b: torch.Tensor) -> float:
    """2-D correlation coefficient (Pearson over all entries), as MATLAB's ``corr2``.

    A constant matrix has no correlation structure: the result is 1 if both matrices are
    equal and 0 otherwise.
    """
    a = a.to(torch.float64).flatten()
    b = b.to(torch.float64).flatten()
    ac, bc = a - a.mean(), b - b.mean()
    denom = float(ac.norm() * bc.norm())
    if denom <= 1e-300:
        return 1.0 if torch.allclose(a, b) else 0.0
    return float((ac @ bc) / denom)


def two_means_low(scores: torch.Tensor) -> torch.Tensor:
    """Exact 1-D 2-means: a mask of the low cluster (empty if all scores are equal).

    Sorts the scores and takes the split minimising the within-cluster sum of squares
    (vectorised over all ``n - 1`` splits with cumulative sums): the optimum KMeans(k=2)
    solution in one dimension, with no random restarts.
    """
    s = scores.to(torch.float64).cpu()
    n = s.numel()
    low = torch.zeros(n, dtype=torch.bool)
    if n < 2 or float(s.max() - s.min()) == 0:
        return low
    vals, order = s.sort(stable=True)
    c1 = vals.cumsum(0)
    c2 = (vals * vals).cumsum(0)
    k = torch.arange(1, n, dtype=torch.float64)  # size of the low cluster
    tot1, tot2 = c1[-1], c2[-1]
    left = c2[:-1] - c1[:-1] ** 2 / k
    right = (tot2 - c2[:-1]) - (tot1 - c1[:-1]) ** 2 / (n - k)
    split = int(torch.argmin(left + right)) + 1
    low[order[:split]] = True
    return low


def representational_scores(
    updates: torch.Tensor,
    global_vector: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor],
    *,
    softmax: bool = True,
) -> torch.Tensor:
    """Each client model's 2-D correlation between its similarity matrix and the global model's."""
    g = global_vector.to(device=updates.device, dtype=updates.dtype).reshape(-1)
    with torch.no_grad():
        ref = similarity_matrix(forward(g), softmax=softmax)
        return torch.tensor(
            [corr2(similarity_matrix(forward(g + u), softmax=softmax), ref) for u in updates], dtype=torch.float64
        )


@DEFENSES.register("cedar")
class CedarDetector(Defense):
    """Cedar's server-side detector (You et al., Nat. Commun. 2025).

    For every client the server evaluates the client model (``global + update``) and the
    global model on fixed stimulus inputs (one per class), builds each model's cosine
    similarity matrix of its softmax outputs across the stimuli, and scores the client by
    the 2-D correlation of its matrix with the global model's.  The scores are split into
    two groups (exact 1-D 2-means, KMeans(k=2)'s optimum) and the low-similarity group is
    flagged when the two group means differ by at least ``min_gap`` (0 by default, as in
    the paper; a positive value avoids flagging anyone in an all-honest round).  The others
    are averaged with their client weights.

    The published code appears to zero the weights of the *majority* cluster rather than the
    low-similarity one; this implements the evident intent described in the paper: the
    low-similarity group is excluded, whatever its size.

    Context: ``context["forward"]`` maps a flat parameter vector (same length as the rows) to
    the model's outputs ``[s, k]`` on the stimuli; ``context["global_vector"]`` is the flat
    global parameter vector.  A missing key raises ``ConfigError`` naming it.

    Threat model: Byzantine clients whose models behave differently on the stimuli (label
    flipping, backdoors, sign flips); it needs each client's model, so it runs on plaintext
    updates only.

    References
    ----------
    Y. You et al. A framework reforming personalized Internet of Things by federated
    meta-learning (Cedar). Nature Communications, 2025.
    """

    name = "cedar"
    runs_on = frozenset({Reveals.UPDATES})

    def __init__(self, *, min_gap: float = 0.0, softmax: bool = True) -> None:
        if not (isinstance(min_gap, (int, float)) and min_gap >= 0):
            raise ConfigError(f"min_gap must be a number >= 0, got {min_gap!r}")
        self.min_gap = float(min_gap)
        self.softmax = bool(softmax)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        for key in ("forward", "global_vector"):
            if key not in context:
                raise ConfigError(f"CedarDetector needs context[{key!r}]")
        forward = context["forward"]
        if not callable(forward):
            raise ConfigError("CedarDetector context['forward'] must be callable")
        gvec = torch.as_tensor(context["global_vector"]).reshape(-1)
        if gvec.numel() != updates.shape[1]:
            raise ConfigError(
                f"CedarDetector context['global_vector'] has {gvec.numel()} entries, rows have {updates.shape[1]}"
            )
        scores = representational_scores(updates, gvec, forward, softmax=self.softmax)
        low = two_means_low(torch.nan_to_num(scores, nan=-1.0))
        gap = float(scores[~low].mean() - scores[low].mean()) if bool(low.any()) else 0.0
        if not bool(low.any()) or gap < self.min_gap:
            low = torch.zeros_like(low)
        keep = (~low).to(torch.float64) * weights.to(torch.float64).cpu()
        if float(keep.sum()) <= 0:
            keep = weights.to(torch.float64).cpu()
            low = torch.zeros_like(low)
        coeffs = (keep / keep.sum()).to(updates.device)
        flagged = tuple(client_ids[i] for i in low.nonzero().flatten().tolist())
        return AggregationResult(
            combine(coeffs, updates), client_ids, weights=coeffs, scores=scores, flagged=flagged, info={"gap": gap}
        )
