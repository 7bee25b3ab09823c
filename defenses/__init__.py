"""Robust aggregation rules, pre-aggregators and Byzantine detectors (``securefml.defenses``).

Every rule is a ``Defense``: call it on ``[n, d]`` updates (optional weights) to get an
``AggregationResult``; Gram-capable rules (``Reveals.GRAM`` in ``runs_on``) also accept a
``Gram`` through ``aggregate_gram`` and return the coefficients for encrypted updates.
Pre-aggregators compose with ``>>`` (``NNM(f=2) >> TrimmedMean(f=2)``).
"""

from collections.abc import Mapping
from typing import Any

from securefml.defenses.base import (
    AggregationResult,
    Composed,
    Defense,
    MeanEquivalenceWarning,
    PreAggregator,
    effective_f,
    register_mean_condition,
)
from securefml.defenses.budget import BYZANTINE_KEY, byzantine_budget, cohort_tail
from securefml.defenses.cedar import CedarDetector
from securefml.defenses.clustering import FLAME, DnC, FoolsGold
from securefml.defenses.coordinate import CoordinateMedian, Meamed, TrimmedMean
from securefml.defenses.distance import Bulyan, Krum, MultiKrum, NormBound
from securefml.defenses.geometric import CenteredClipping, GeometricMedian
from securefml.defenses.mean import Mean
from securefml.defenses.metrics import DetectionRates, DetectionTracker, cumulative_detection, detection_rates
from securefml.defenses.preaggregators import ARC, NNM, Bucketing, Clipping, MedianClipping
from securefml.defenses.preset import recommended
from securefml.defenses.reputation import Reputation
from securefml.defenses.subsets import CAF, MDA, SMEA
from securefml.defenses.trust import FLTrust
from securefml.registry import Registry

__all__ = [
    "AggregationResult",
    "Composed",
    "Defense",
    "PreAggregator",
    "MeanEquivalenceWarning",
    "BYZANTINE_KEY",
    "byzantine_budget",
    "cohort_tail",
    "Mean",
    "CoordinateMedian",
    "TrimmedMean",
    "Meamed",
    "Krum",
    "MultiKrum",
    "Bulyan",
    "NormBound",
    "GeometricMedian",
    "CenteredClipping",
    "NNM",
    "Bucketing",
    "ARC",
    "Clipping",
    "MedianClipping",
    "FLTrust",
    "FLAME",
    "FoolsGold",
    "DnC",
    "CedarDetector",
    "Reputation",
    "recommended",
    "MDA",
    "SMEA",
    "CAF",
    "DetectionRates",
    "DetectionTracker",
    "detection_rates",
    "cumulative_detection",
    "DEFENSES",
    "make_defense",
]

def _trimmed_to_mean(rule: TrimmedMean | Meamed, n: int, context: Mapping[str, Any]) -> str | None:
    f = effective_f(rule.f, context, rule)
    return "f=0 trims nothing" if f == 0 else None


register_mean_condition(TrimmedMean, _trimmed_to_mean)
register_mean_condition(Meamed, _trimmed_to_mean)

DEFENSES: Registry[Defense] = Registry("defense")
DEFENSES.register("mean")(Mean)
DEFENSES.register("median")(CoordinateMedian)
DEFENSES.register("trimmedmean", positional="f")(TrimmedMean)
DEFENSES.register("meamed", positional="f")(Meamed)
DEFENSES.register("krum", positional="f")(Krum)
DEFENSES.register("multikrum", positional="f")(MultiKrum)
DEFENSES.register("bulyan", positional="f")(Bulyan)
DEFENSES.register("normbound", positional="bound")(NormBound)
DEFENSES.register("geomed")(GeometricMedian)
DEFENSES.register("cclip", positional="tau")(CenteredClipping)
DEFENSES.register("nnm", positional="f")(NNM)
DEFENSES.register("bucketing", positional="size")(Bucketing)
DEFENSES.register("arc", positional="f")(ARC)
DEFENSES.register("clipping", positional="bound")(Clipping)
DEFENSES.register("medclip")(MedianClipping)
DEFENSES.register("fltrust")(FLTrust)
DEFENSES.register("flame")(FLAME)
DEFENSES.register("foolsgold")(FoolsGold)
DEFENSES.register("dnc", positional="f")(DnC)
DEFENSES.register("cedar")(CedarDetector)
DEFENSES.register("reputation")(Reputation)
DEFENSES.register("mda")(MDA)
DEFENSES.register("smea")(SMEA)
DEFENSES.register("caf")(CAF)


def make_defense(spec: str) -> Defense:
    """Build a defense from a CLI spec such as ``"trimmedmean:f=2"`` or ``"nnm:f=2>>krum:f=2"``.

    A bare positional value is the rule's main option, declared at registration: ``f`` for
    rules that take one (``"krum:3"``), ``size`` for bucketing, ``bound`` for clipping; ``>>`` composes
    pre-aggregators before the last rule.

    ``reputation[:k=v]>>rule`` wraps ``rule`` in per-client reputation (``Reputation``);
    ``recommended[:protocol]`` is ``recommended(protocol)``.

    >>> make_defense("nnm:f=1>>krum:1")
    NNM(f=1, chunk=65536) >> Krum(f=1, chunk=65536)
    >>> make_defense("reputation:threshold=2.5>>mean")  # doctest: +NORMALIZE_WHITESPACE
    Reputation(Mean(), threshold=2.5, min_rounds=3, window=2000, consensus='unflagged', duplicate=0.99,
               rescore=6, history=250)
    """
    from securefml.registry import parse_spec

    parts = [p.strip() for p in spec.split(">>")]
    head, parsed = parse_spec(parts[0])
    head_kwargs: dict[str, Any] = dict(parsed)  # checked by the constructors below
    if head == "recommended" and len(parts) == 1:  # "recommended[:protocol=ckks]"
        if "_" in head_kwargs:
            head_kwargs["protocol"] = head_kwargs.pop("_")
        return recommended(**head_kwargs)
    if head == "reputation":  # "reputation:threshold=2>>rule": reputation wraps the rest
        inner = make_defense(">>".join(parts[1:])) if len(parts) > 1 else None
        return Reputation(inner, **head_kwargs)
    built = [DEFENSES.build(part) for part in parts]
    rule = built[-1]
    for pre in reversed(built[:-1]):
        rule = pre >> rule
    return rule
