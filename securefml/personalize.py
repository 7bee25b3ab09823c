"""Personalization: a held-out client fine-tunes the meta-model on its support set, then is scored."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from securefml.data.base import Task
from securefml.meta.base import MetaLearner, Params

__all__ = ["PersonalizationReport", "evaluate_task", "personalize"]


@dataclass(frozen=True)
class PersonalizationReport:
    """Per-client scores and their distribution.  ``metric`` is "accuracy" or "mse"."""

    metric: str
    mean: float
    std: float
    per_client: tuple[float, ...]
    steps: int

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d[self.metric] = d.pop("mean")
        d["per_client"] = list(self.per_client)
        return d


def evaluate_task(learner: MetaLearner, params: Params, task: Task) -> float:
    """Accuracy (classification) or mean squared error (regression) on the query set."""
    with torch.no_grad():
        out = learner.forward(params, task.query_x)
        if task.kind == "classification":
            return float((out.argmax(1) == task.query_y).float().mean())
        return float(torch.nn.functional.mse_loss(out, task.query_y))


def personalize(
    learner: MetaLearner,
    params: Params,
    tasks: Sequence[Task],
    *,
    steps: int,
    device: torch.device | str = "cpu",
) -> PersonalizationReport:
    """Fine-tune ``steps`` inner steps on each task's support set (0 = no fine-tuning) and score.

    Meta-SGD adapts with its learned per-parameter rates; every other learner with plain SGD
    at ``inner_lr`` (so "FedAvg+FT" is FedAvg's model fine-tuned exactly like MAML's).
    """
    scores = []
    base = {n: p.detach().to(device) for n, p in params.items()}
    for task in tasks:
        t = task.to(device)
        adapted = learner.adapt(base, t.support_x, t.support_y, t.kind, steps=steps) if steps > 0 else base
        adapted = {n: p.detach() for n, p in adapted.items()}
        if learner.adapts_with_learned_rates:
            adapted = {**base, **adapted}
        scores.append(evaluate_task(learner, adapted, t))
    metric = "accuracy" if tasks and tasks[0].kind == "classification" else "mse"
    values = torch.tensor(scores, dtype=torch.float64)  # a diverged model gives inf/nan: report it, do not crash
    std = float(values.std(unbiased=False)) if len(scores) > 1 else 0.0
    return PersonalizationReport(metric, float(values.mean()), std, tuple(scores), steps)
