"""What one evaluation cell reports: clean quality, backdoor success, detection, cost.

The attack success rate of a backdoor is measured the way the victims meet it: each held-out
client fine-tunes the final meta-model on its own clean support set (the same personalization
as the clean accuracy) and the triggered versions of its query inputs whose true label is not
the target are classified; the rate is the fraction sent to the target label
(``securefml.attacks.attack_success_rate``).  It is also reported for the global model
without fine-tuning, which tells a backdoor that personalization washes out from one that
survives it.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from securefml.attacks import attack_success_rate
from securefml.data.base import Task
from securefml.experiment import RunResult
from securefml.meta.base import MetaLearner, Params

__all__ = ["is_backdoor", "backdoor_success", "cell_metrics", "METRICS", "HIGHER_IS_BETTER"]

#: The per-cell numbers every record carries (None when they do not apply), in table order.
METRICS = (
    "personalized",
    "personalized_last_k",
    "global",
    "asr_personalized",
    "asr_global",
    "tpr",
    "fpr",
    "ece",
    "nll",
    "brier",
    "bytes_uploaded",
    "wall_seconds",
)

#: Orientation of each metric for readers and colour maps (MSE metrics are flipped at run time).
HIGHER_IS_BETTER = {
    "personalized": True,
    "personalized_last_k": True,
    "global": True,
    "asr_personalized": False,
    "asr_global": False,
    "tpr": True,
    "fpr": False,
    "ece": False,
    "nll": False,
    "brier": False,
    "bytes_uploaded": False,
    "wall_seconds": False,
}


def is_backdoor(attack: object) -> bool:
    """True for attacks with a trigger and a target label (``Backdoor``, ``MetaBackdoor``, user classes)."""
    return callable(getattr(attack, "apply_trigger", None)) and isinstance(getattr(attack, "target", None), int)


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(statistics.fmean(finite)) if finite else None


def backdoor_success(
    learner: MetaLearner,
    params: Params,
    tasks: Sequence[Task],
    backdoor: Any,
    *,
    steps: int,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Attack success rate on held-out ``tasks``, after ``steps`` of clean fine-tuning and without.

    Parameters
    ----------
    learner, params:
        The meta-learner and the final global (meta-)parameters of the run.
    tasks:
        The held-out clients (victims); each fine-tunes on its own clean support set.
    backdoor:
        The attack whose trigger and target are measured (``is_backdoor(backdoor)``).
    steps:
        Personalization steps, as for the clean personalized accuracy.

    Returns
    -------
    dict
        ``asr_personalized`` and ``asr_global`` (means over the clients that have at least
        one query example outside the target class; None if none has) and the per-client
        lists ``asr_personalized_per_client`` / ``asr_global_per_client`` (None where
        undefined).
    """
    base = {n: p.detach().to(device) for n, p in params.items()}
    pers: list[float] = []
    glob: list[float] = []
    for task in tasks:
        if task.kind != "classification":
            continue
        t = task.to(device)
        glob.append(attack_success_rate(functools.partial(learner.forward, base), t, backdoor))
        adapted = learner.adapt(base, t.support_x, t.support_y, t.kind, steps=steps) if steps > 0 else base
        adapted = {n: p.detach() for n, p in adapted.items()}
        if learner.adapts_with_learned_rates:
            adapted = {**base, **adapted}
        pers.append(attack_success_rate(functools.partial(learner.forward, adapted), t, backdoor))
    return {
        "asr_personalized": _mean(pers),
        "asr_global": _mean(glob),
        "asr_personalized_per_client": [v if math.isfinite(v) else None for v in pers],
        "asr_global_per_client": [v if math.isfinite(v) else None for v in glob],
    }


def cell_metrics(result: RunResult) -> dict[str, Any]:
    """Flatten a run's metrics into one evaluation record (``METRICS`` plus details).

    ``personalized`` / ``global`` hold the accuracy (classification) or the MSE (regression)
    named by ``metric``; ``asr_*`` are None unless the run's ``on_finish`` measured a backdoor.
    """
    m: Mapping[str, Any] = result.metrics
    pers, glob, det = m["personalized"], m["global"], m["detection"]
    metric = pers["metric"]
    return {
        "metric": metric,
        "personalized": pers[metric],
        "personalized_std": pers["std"],
        # mean over the last k rounds' evaluations (k = 1: the final one); older results lack it
        "personalized_last_k": m["personalized_last_k"]["mean"] if "personalized_last_k" in m else pers[metric],
        "last_k": m["personalized_last_k"]["k"] if "personalized_last_k" in m else 1,
        "global": glob[metric],
        "global_std": glob["std"],
        "asr_personalized": m.get("asr_personalized"),
        "asr_global": m.get("asr_global"),
        "tpr": det["tpr"],
        "fpr": det["fpr"],
        # calibration of the personalized predictions (None for regression)
        "ece": pers.get("ece"),
        "nll": pers.get("nll"),
        "brier": pers.get("brier"),
        "bytes_uploaded": m["bytes_uploaded"],
        "wall_seconds": m["wall_seconds"],
        "rejected": m["rejected"],
        "rounds": m["rounds"],
        "personalized_per_client": list(pers["per_client"]),
        "asr_personalized_per_client": m.get("asr_personalized_per_client"),
        "detection_per_round": det["per_round"],
        # every client seen, detected if *excluded* at its latest participation (the capped action)
        "tpr_cumulative": det["cumulative"][-1]["tpr"] if det.get("cumulative") else None,
        "fpr_cumulative": det["cumulative"][-1]["fpr"] if det.get("cumulative") else None,
        # the same, detected if the detector *flagged* it then (excluded or not); None without one
        "tpr_cumulative_detector": _last(det.get("detector", {}).get("cumulative"), "tpr"),
        "fpr_cumulative_detector": _last(det.get("detector", {}).get("cumulative"), "fpr"),
    }


def _last(series: list[dict[str, Any]] | None, key: str) -> Any:
    """``key`` of a per-round series' last entry (None for a missing or empty series, older results)."""
    return series[-1][key] if series else None
