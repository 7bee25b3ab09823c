"""Calibration and uncertainty metrics for classifiers: ECE, NLL, Brier, selective accuracy, AUROC.

Pure functions on a ``[n, C]`` matrix of predictive probabilities and ``[n]`` integer labels,
so any learner (deterministic softmax, temperature-scaled, Monte Carlo averaged Bayesian) is
scored the same way.  ``securefml.personalize`` calls them on every held-out client of every
classification run.

Definitions
-----------
* **ECE** (expected calibration error, Naeini et al. AAAI 2015; Guo et al. ICML 2017): the
  predictions are grouped by confidence ``max_k p_k`` into bins; ECE is
  ``sum_b |B_b| / n * |acc(B_b) - conf(B_b)|``.  Equal-width bins (default 15, as Guo et al.)
  are right-closed intervals ``(lo, hi]`` (the first bin also holds confidence 0; a confidence
  within 1e-6 of an edge counts as on it, so float32 rounding does not move it); the adaptive
  variant (Nixon et al. CVPR-W 2019, "adaptive calibration error") uses equal-mass bins: the
  predictions sorted by confidence and cut into ``n_bins`` near-equal chunks
  (``numpy.array_split`` sizes).  On few predictions (a 50-example query set) both are biased
  upwards; a pooled value over all clients is reported beside the per-client distribution.
  ``calibrated_ece_floor`` measures that bias for given predictions: the ECE the same
  confidences would score if they were exactly calibrated (labels drawn from the predictions
  themselves), so a measured ECE can be read against what the estimator reports at zero error.
* **Debiased L2 calibration error** (Kumar, Liang & Ma, "Verified Uncertainty Calibration",
  NeurIPS 2019): the plug-in estimate of the binned *squared* top-label calibration error
  ``sum_b |B_b| / n * (acc(B_b) - conf(B_b))^2`` is biased upwards by the sampling variance of
  each bin's accuracy; subtracting its unbiased estimate ``acc(B_b) (1 - acc(B_b)) / (|B_b| - 1)``
  per bin (bins with one prediction contribute nothing) makes the estimate unbiased for the
  binned squared error when the labels in a bin are independent draws around a common rate.
  ``squared_calibration_error(debiased=True)`` returns that estimate, which can be *negative*
  when the predictions are well calibrated: average it over clients or seeds before taking the
  root (``debiased_calibration_error`` = ``sqrt(max(0, .))`` of one estimate).  Its floor on
  exactly calibrated predictions is about 0 whatever the query size, unlike ECE's, which falls
  only like ``1 / sqrt(n)``; that is what lets it resolve a 2x difference between two
  well-calibrated learners on 50-example query sets.  Equal-mass bins by default, as Kumar et al.
* **NLL**: mean of ``-log p_y`` (probabilities clamped at 1e-12 so a confident mistake costs a
  large finite amount).
* **Brier** (Brier 1950, multi-class form): mean over examples of ``sum_k (p_k - 1[y = k])^2``,
  in ``[0, 2]``.
* **Selective accuracy** at coverage ``c``: accuracy on the ``ceil(c * n)`` most confident
  predictions (ties broken by position, a stable sort).
* **AUROC** of a score separating positives from negatives: the Mann-Whitney probability that a
  random positive scores above a random negative, ties counting one half.  Out-of-task detection
  uses the predictive entropy as the score (positives: inputs from classes outside the task).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from securefml.errors import ConfigError

__all__ = [
    "ReliabilityBins",
    "auroc",
    "brier_score",
    "calibrated_ece_floor",
    "calibration_summary",
    "debiased_calibration_error",
    "expected_calibration_error",
    "negative_log_likelihood",
    "predictive_entropy",
    "reliability_bins",
    "selective_accuracy",
    "squared_calibration_error",
]

_EPS = 1e-12


def _check(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if probs.dim() != 2:
        raise ConfigError(f"probabilities must be [n, C], got shape {tuple(probs.shape)}")
    if labels.dim() != 1 or labels.shape[0] != probs.shape[0]:
        raise ConfigError(f"labels must be [n] matching probabilities {tuple(probs.shape)}, got {tuple(labels.shape)}")
    if probs.shape[0] == 0:
        raise ConfigError("calibration metrics need at least one prediction")
    if labels.dtype.is_floating_point or bool((labels < 0).any()) or bool((labels >= probs.shape[1]).any()):
        raise ConfigError(f"labels must be integers in [0, {probs.shape[1]})")
    p = probs.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ConfigError("probabilities must be finite and non-negative")
    return p, labels.detach().cpu().long()


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin counts, accuracies and mean confidences (the data of a reliability diagram).

    Empty bins have count 0 and accuracy/confidence ``nan``.  ``edges`` has ``n_bins + 1``
    entries for equal-width bins and holds the bins' confidence ranges for adaptive ones.
    """

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    accuracy: tuple[float, ...]
    confidence: tuple[float, ...]

    @property
    def ece(self) -> float:
        n = sum(self.counts)
        return float(sum(c / n * abs(a - f) for c, a, f in zip(self.counts, self.accuracy, self.confidence) if c))

    def to_dict(self) -> dict[str, list[float | None] | list[int] | list[float]]:
        def clean(values: tuple[float, ...]) -> list[float | None]:
            return [None if math.isnan(v) else v for v in values]

        return {"edges": list(self.edges), "counts": list(self.counts), "accuracy": clean(self.accuracy),
                "confidence": clean(self.confidence)}


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15,
                     adaptive: bool = False) -> ReliabilityBins:
    """Group predictions by confidence into ``n_bins`` equal-width (or equal-mass) bins.

    Examples
    --------
    >>> p = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    >>> b = reliability_bins(p, torch.tensor([0, 1]), n_bins=2)
    >>> b.counts, b.accuracy
    ((0, 2), (nan, 0.5))
    """
    if n_bins < 1:
        raise ConfigError(f"n_bins must be >= 1, got {n_bins}")
    p, y = _check(probs, labels)
    conf, pred = p.max(dim=1)
    correct = (pred == y).to(torch.float64)
    groups: list[torch.Tensor]
    if adaptive:
        order = torch.sort(conf, stable=True).indices
        groups = [g for g in torch.tensor_split(order, n_bins) if g.numel()]
        edges = tuple(float(conf[g].min()) for g in groups) + (float(conf[groups[-1]].max()),)
    else:
        width = 1.0 / n_bins
        # bin b holds (b*w, (b+1)*w]; a confidence within 1e-6 of an edge counts as on it
        # (float32 0.6 is 0.6000000238), so float32 and float64 inputs bin alike
        idx = (torch.ceil(conf / width - 1e-6) - 1).clamp(0, n_bins - 1).long()
        groups = [torch.nonzero(idx == b).flatten() for b in range(n_bins)]
        edges = tuple(b * width for b in range(n_bins + 1))
    counts = tuple(int(g.numel()) for g in groups)
    acc = tuple(float(correct[g].mean()) if g.numel() else math.nan for g in groups)
    cf = tuple(float(conf[g].mean()) if g.numel() else math.nan for g in groups)
    return ReliabilityBins(edges, counts, acc, cf)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15,
                               adaptive: bool = False) -> float:
    """ECE with ``n_bins`` equal-width bins, or equal-mass bins when ``adaptive``.

    Examples
    --------
    Two predictions at confidence 0.9 (one right) and one at 0.6 (right):
    ``|0.5 - 0.9| * 2/3 + |1 - 0.6| * 1/3 = 0.4``.

    >>> p = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4]])
    >>> round(expected_calibration_error(p, torch.tensor([0, 0, 0])), 6)
    0.4
    """
    return reliability_bins(probs, labels, n_bins=n_bins, adaptive=adaptive).ece


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean ``-log p_y``.

    >>> round(negative_log_likelihood(torch.tensor([[0.5, 0.5], [0.25, 0.75]]), torch.tensor([0, 1])), 6)
    0.490415
    """
    p, y = _check(probs, labels)
    return float(-torch.log(p.gather(1, y[:, None]).clamp_min(_EPS)).mean())


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score: mean squared distance to the one-hot label.

    >>> brier_score(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([0, 0]))
    0.25
    """
    p, y = _check(probs, labels)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(torch.float64)
    return float(((p - onehot) ** 2).sum(dim=1).mean())


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum_k p_k log p_k`` of each row (nats), float64."""
    p = probs.detach().to(torch.float64)
    return -(p * torch.log(p.clamp_min(_EPS))).sum(dim=-1)


def selective_accuracy(probs: torch.Tensor, labels: torch.Tensor, *, coverage: float = 0.8) -> float:
    """Accuracy on the ``ceil(coverage * n)`` most confident predictions.

    >>> p = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    >>> selective_accuracy(p, torch.tensor([0, 1, 1]), coverage=0.6)
    1.0
    """
    if not 0 < coverage <= 1:
        raise ConfigError(f"coverage must be in (0, 1], got {coverage}")
    p, y = _check(probs, labels)
    conf, pred = p.max(dim=1)
    k = max(1, math.ceil(coverage * p.shape[0] - 1e-9))
    top = torch.sort(-conf, stable=True).indices[:k]
    return float((pred[top] == y[top]).to(torch.float64).mean())


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties 1/2 (Mann-Whitney U).

    >>> auroc(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 2.0]))
    0.875
    """
    pos = positive.detach().to(torch.float64).flatten().cpu()
    neg = negative.detach().to(torch.float64).flatten().cpu()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ConfigError("AUROC needs at least one positive and one negative score")
    if not (bool(torch.isfinite(pos).all()) and bool(torch.isfinite(neg).all())):
        raise ConfigError("AUROC scores must be finite")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).to(torch.float64) + 0.5 * (diff == 0).to(torch.float64)).mean())


def calibration_summary(probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15,
                        coverage: float = 0.8) -> dict[str, float]:
    """All per-client numbers at once: accuracy, ECE (equal-width and adaptive), NLL, Brier, selective accuracy.

    ``sq_ce_debiased`` is ``squared_calibration_error`` (equal-mass ``n_bins``, debiased): an
    unbiased, possibly negative estimate, to be averaged over clients before its root is taken.
    """
    p, y = _check(probs, labels)
    return {
        "accuracy": float((p.argmax(1) == y).to(torch.float64).mean()),
        "ece": expected_calibration_error(p, y, n_bins=n_bins),
        "ece_adaptive": expected_calibration_error(p, y, n_bins=n_bins, adaptive=True),
        "sq_ce_debiased": squared_calibration_error(p, y, n_bins=n_bins),
        "nll": negative_log_likelihood(p, y),
        "brier": brier_score(p, y),
        "selective_accuracy": selective_accuracy(p, y, coverage=coverage),
    }


def calibrated_ece_floor(probs: torch.Tensor, *, n_bins: int = 15, adaptive: bool = False, draws: int = 100,
                         generator: torch.Generator | None = None) -> float:
    """Mean ECE of these predictions if they were perfectly calibrated: the estimator's floor for them.

    Labels are drawn from the predictive distribution itself (``y ~ Categorical(p)``), so the
    true calibration error is 0 by construction and what ``expected_calibration_error`` reports
    is its finite-sample bias at exactly this confidence profile and sample size.  A measured
    ECE near this floor means the estimator cannot tell the predictions from calibrated ones;
    no method can get far below the floor of its own confidences.

    Examples
    --------
    Confident predictions on few examples have a floor well above 0:

    >>> p = torch.tensor([[0.9, 0.1]] * 20)
    >>> 0.02 < calibrated_ece_floor(p, generator=torch.Generator().manual_seed(0)) < 0.15
    True
    """
    if draws < 1:
        raise ConfigError(f"draws must be >= 1, got {draws}")
    p = probs.detach().to(torch.float64)
    if p.dim() != 2 or p.shape[0] == 0 or not bool(torch.isfinite(p).all()):
        raise ConfigError(f"need finite [n, C] probabilities with n > 0, got shape {tuple(p.shape)}")
    p = p.clamp_min(0)
    gen = generator or torch.Generator().manual_seed(0)
    labels = torch.multinomial(p.cpu(), draws, replacement=True, generator=gen)  # [n, draws]
    return float(sum(expected_calibration_error(p, labels[:, d], n_bins=n_bins, adaptive=adaptive)
                     for d in range(draws)) / draws)


def squared_calibration_error(probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15, adaptive: bool = True,
                              debiased: bool = True) -> float:
    """Binned squared top-label calibration error; debiased (Kumar et al. 2019) unless ``debiased=False``.

    ``sum_b |B_b| / n * [(acc_b - conf_b)^2 - acc_b (1 - acc_b) / (|B_b| - 1)]``, the correction
    only where ``debiased`` and ``|B_b| >= 2`` (see the module docstring).  The debiased value
    is an unbiased estimate and may be negative; the plug-in value (``debiased=False``) never is.

    Examples
    --------
    One bin (``n_bins=1``) of four predictions at confidence 0.75, three right: the plug-in
    error is 0 and the debiased one subtracts ``0.75 * 0.25 / 3``:

    >>> p = torch.tensor([[0.75, 0.25]] * 4)
    >>> y = torch.tensor([0, 0, 0, 1])
    >>> squared_calibration_error(p, y, n_bins=1, debiased=False)
    0.0
    >>> round(squared_calibration_error(p, y, n_bins=1), 6)
    -0.0625
    """
    bins = reliability_bins(probs, labels, n_bins=n_bins, adaptive=adaptive)
    n = sum(bins.counts)
    total = 0.0
    for c, a, f in zip(bins.counts, bins.accuracy, bins.confidence):
        if not c:
            continue
        term = (a - f) ** 2
        if debiased and c >= 2:
            term -= a * (1.0 - a) / (c - 1)
        total += c / n * term
    return float(total)


def debiased_calibration_error(probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15,
                               adaptive: bool = True) -> float:
    """``sqrt(max(0, squared_calibration_error(...)))``: the debiased L2 calibration error of one set.

    For a comparison across clients, average ``squared_calibration_error`` first and take the
    root of the mean (clamping each client at 0 would bias the average upwards again).

    >>> p = torch.tensor([[0.9, 0.1]] * 10)
    >>> round(debiased_calibration_error(p, torch.tensor([1] * 10), n_bins=1), 6)
    0.9
    """
    return math.sqrt(max(0.0, squared_calibration_error(probs, labels, n_bins=n_bins, adaptive=adaptive)))
