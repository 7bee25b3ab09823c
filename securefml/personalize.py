"""Personalization: a held-out client fine-tunes the meta-model on its support set, then is scored.

Every classification run is also scored for calibration and useful uncertainty
(``securefml.calibration``): per held-out client, ECE (15 equal-width bins and the adaptive
variant), the debiased squared calibration error (``sq_ce_debiased``, Kumar et al. 2019: an
unbiased estimate whose mean over clients, then square-rooted, does not have ECE's floor on
small query sets), NLL, Brier score and selective accuracy (the 80% most confident predictions); the
distribution of each across clients; the same numbers pooled over all query predictions with
the pooled reliability diagram's bins; and, when the tasks know their source classes
(``Task.classes``, digits-fewshot), out-of-task detection: the AUROC of the predictive entropy
on query inputs of *other* held-out clients whose class is outside this client's task
(positives) against this client's own query inputs (negatives).

The predictive distribution is ``softmax(learner.forward(adapted, x))`` for every learner: the
deterministic ones return logits, temperature scaling returns tempered logits, and the
Bayesian learners return the log of their Monte Carlo averaged predictive probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from securefml.calibration import ReliabilityBins, auroc, calibration_summary, predictive_entropy, reliability_bins
from securefml.data.base import Task
from securefml.meta.base import MetaLearner, Params

__all__ = ["CalibrationReport", "PersonalizationReport", "evaluate_task", "out_of_task_inputs", "personalize",
           "personalized_probabilities", "predictive_probabilities"]

#: the per-client calibration numbers, in report order
#: (``sq_ce_debiased``: the debiased squared calibration error of ``securefml.calibration``; its
#: mean over clients is unbiased, so its root is the estimator that can resolve calibration below
#: the ECE floor of a 50-example query set)
CALIBRATION_METRICS = ("ece", "ece_adaptive", "sq_ce_debiased", "nll", "brier", "selective_accuracy", "ood_auroc")


def _distribution(values: Sequence[float | None]) -> dict[str, object]:
    finite = torch.tensor([v for v in values if v is not None and math.isfinite(v)], dtype=torch.float64)
    if finite.numel() == 0:
        return {"mean": None, "std": None, "median": None, "q10": None, "q90": None, "per_client": list(values)}
    q = torch.quantile(finite, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"mean": float(finite.mean()), "std": float(finite.std(unbiased=False)), "median": float(q[1]),
            "q10": float(q[0]), "q90": float(q[2]), "per_client": list(values)}


@dataclass(frozen=True)
class CalibrationReport:
    """Calibration of the personalized predictions of every held-out client.

    Attributes
    ----------
    per_client:
        Metric name (``CALIBRATION_METRICS``) -> one value per client (``None`` where it is
        undefined, e.g. ``ood_auroc`` without source classes).
    pooled:
        ECE, adaptive ECE, NLL, Brier and selective accuracy over all clients' query predictions.
    reliability:
        The pooled equal-width bins (the reliability diagram).
    """

    per_client: Mapping[str, tuple[float | None, ...]]
    pooled: Mapping[str, float]
    reliability: ReliabilityBins

    def mean(self, metric: str) -> float | None:
        values = [v for v in self.per_client[metric] if v is not None and math.isfinite(v)]
        return float(sum(values) / len(values)) if values else None

    def to_dict(self) -> dict[str, object]:
        return {
            "per_client": {k: _distribution(v) for k, v in self.per_client.items()},
            "pooled": dict(self.pooled),
            "reliability": self.reliability.to_dict(),
        }


@dataclass(frozen=True)
class PersonalizationReport:
    """Per-client scores and their distribution.  ``metric`` is "accuracy" or "mse".

    ``calibration`` is set for classification tasks; ``to_dict`` then adds the per-client
    means of ``CALIBRATION_METRICS`` at the top level (``ece``, ``nll``, ``brier``, ...) and
    the details under ``calibration``.
    """

    metric: str
    mean: float
    std: float
    per_client: tuple[float, ...]
    steps: int
    calibration: CalibrationReport | None = None

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d[self.metric] = d.pop("mean")
        d["per_client"] = list(self.per_client)
        d.pop("calibration")
        if self.calibration is not None:
            for name in CALIBRATION_METRICS:
                d[name] = self.calibration.mean(name)
            d["calibration"] = self.calibration.to_dict()
        return d


def predictive_probabilities(learner: MetaLearner, params: Params, x: torch.Tensor) -> torch.Tensor:
    """``softmax(learner.forward(params, x))`` without gradients (see the module docstring)."""
    with torch.no_grad():
        return torch.softmax(learner.forward(params, x).to(torch.float64), dim=1)


def evaluate_task(learner: MetaLearner, params: Params, task: Task) -> float:
    """Accuracy (classification) or mean squared error (regression) on the query set."""
    with torch.no_grad():
        out = learner.forward(params, task.query_x)
        if task.kind == "classification":
            return float((out.argmax(1) == task.query_y).float().mean())
        return float(torch.nn.functional.mse_loss(out, task.query_y))


def out_of_task_inputs(task: Task, others: Sequence[Task], *, limit: int | None = None) -> torch.Tensor | None:
    """Query inputs of ``others`` whose source class is not one of ``task``'s classes.

    Returns ``None`` when the tasks do not record their source classes or no such input exists.
    At most ``limit`` inputs (default: as many as ``task`` has query inputs), in a fixed order.
    """
    if task.classes is None:
        return None
    own = set(task.classes)
    limit = task.query_x.shape[0] if limit is None else limit
    chunks, total = [], 0
    for other in others:
        if other is task or other.classes is None:
            continue
        source = torch.tensor(other.classes, device=other.query_y.device)[other.query_y]
        keep = torch.tensor([int(c) not in own for c in source.tolist()], device=other.query_x.device)
        if bool(keep.any()):
            chunks.append(other.query_x[keep])
            total += int(keep.sum())
        if total >= limit:
            break
    if not chunks:
        return None
    return torch.cat(chunks)[:limit]


def _adapt(learner: MetaLearner, base: Params, t: Task, steps: int) -> Params:
    adapted = learner.adapt(base, t.support_x, t.support_y, t.kind, steps=steps) if steps > 0 else base
    adapted = {n: p.detach() for n, p in adapted.items()}
    if learner.adapts_with_learned_rates:
        adapted = {**base, **adapted}
    return learner.calibrate(adapted, t.support_x, t.support_y, t.kind)


def personalized_probabilities(learner: MetaLearner, params: Params, task: Task, *, steps: int) -> torch.Tensor:
    """Query predictive probabilities of one client after the same personalization ``personalize`` scores.

    Adapt on the support set (``steps`` steps), post-hoc calibrate, then ``predictive_probabilities``
    on the query inputs; for analyses that need the probabilities themselves (the ECE floor of
    ``securefml.calibration.calibrated_ece_floor``).
    """
    return predictive_probabilities(learner, _adapt(learner, params, task, steps), task.query_x)


def personalize(
    learner: MetaLearner,
    params: Params,
    tasks: Sequence[Task],
    *,
    steps: int,
    device: torch.device | str = "cpu",
    n_bins: int = 15,
    coverage: float = 0.8,
) -> PersonalizationReport:
    """Fine-tune ``steps`` inner steps on each task's support set (0 = no fine-tuning) and score.

    Meta-SGD adapts with its learned per-parameter rates; every other learner with plain SGD
    at ``inner_lr`` (so "FedAvg+FT" is FedAvg's model fine-tuned exactly like MAML's).
    Classification tasks are also scored for calibration (``n_bins`` equal-width ECE bins,
    selective accuracy at ``coverage``) and out-of-task detection; see the module docstring.
    """
    scores = []
    per_client: dict[str, list[float | None]] = {k: [] for k in CALIBRATION_METRICS}
    all_probs, all_labels = [], []
    base = {n: p.detach().to(device) for n, p in params.items()}
    moved = [task.to(device) for task in tasks]
    for t in moved:
        adapted = _adapt(learner, base, t, steps)
        scores.append(evaluate_task(learner, adapted, t))
        if t.kind != "classification":
            continue
        probs = predictive_probabilities(learner, adapted, t.query_x)
        if not bool(torch.isfinite(probs).all()):  # a diverged model: report nan, do not crash
            for k in CALIBRATION_METRICS:
                per_client[k].append(math.nan)
            continue
        summary = calibration_summary(probs, t.query_y, n_bins=n_bins, coverage=coverage)
        for k in CALIBRATION_METRICS[:-1]:
            per_client[k].append(summary[k])
        outside = out_of_task_inputs(t, moved)
        if outside is None:
            per_client["ood_auroc"].append(None)
        else:
            inside_h = predictive_entropy(probs)
            outside_h = predictive_entropy(predictive_probabilities(learner, adapted, outside))
            per_client["ood_auroc"].append(auroc(outside_h, inside_h) if bool(torch.isfinite(outside_h).all())
                                           else math.nan)
        all_probs.append(probs.cpu())
        all_labels.append(t.query_y.cpu())
    metric = "accuracy" if tasks and tasks[0].kind == "classification" else "mse"
    values = torch.tensor(scores, dtype=torch.float64)  # a diverged model gives inf/nan: report it, do not crash
    std = float(values.std(unbiased=False)) if len(scores) > 1 else 0.0
    calibration = None
    if all_probs:
        p, y = torch.cat(all_probs), torch.cat(all_labels)
        pooled = calibration_summary(p, y, n_bins=n_bins, coverage=coverage)
        calibration = CalibrationReport({k: tuple(v) for k, v in per_client.items()}, pooled,
                                        reliability_bins(p, y, n_bins=n_bins))
    return PersonalizationReport(metric, float(values.mean()), std, tuple(scores), steps, calibration)
