"""Robust aggregation rules, pre-aggregators and Byzantine detectors (``securefml.defenses``).

Every rule is a ``Defense``: call it on ``[n, d]`` updates (optional weights) to get an
``AggregationResult``; Gram-capable rules (``Reveals.GRAM`` in ``runs_on``) also accept a
``Gram`` through ``aggregate_gram`` and return the coefficients for encrypted updates.
Pre-aggregators compose with ``>>`` (``NNM(f=2) >> TrimmedMean(f=2)``).
"""

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
from securefml.defenses.bucket_reputation import BucketReputation
from securefml.defenses.buckets import BucketAware, BucketMembership
from securefml.defenses.budget import BYZANTINE_KEY, byzantine_budget, cohort_tail
from securefml.defenses.cedar import CedarDetector
from securefml.defenses.clustering import FLAME, DnC, FoolsGold
from securefml.defenses.coordinate import CoordinateMedian, Meamed, TrimmedMean
from securefml.defenses.distance import Bulyan, Krum, MultiKrum, NormBound
from securefml.defenses.geometric import CenteredClipping, GeometricMedian
from securefml.defenses.mean import Mean
from securefml.defenses.metrics import DetectionRates, DetectionTracker, cumulative_detection, detection_rates
from securefml.defenses.preaggregators import ARC, NNM, Bucketing, Clipping, MedianClipping
from securefml.defenses.preset import PREVIOUS_RECOMMENDED_SPEC, RECOMMENDED_SPEC, recommended
from securefml.defenses.registry import DEFENSES
from securefml.defenses.reputation import Reputation
from securefml.defenses.subsets import CAF, MDA, SMEA
from securefml.defenses.trust import FLTrust
from securefml.registry import import_submodules

__all__ = [
    "AggregationResult",
    "Composed",
    "Defense",
    "PreAggregator",
    "MeanEquivalenceWarning",
    "effective_f",
    "register_mean_condition",
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
    "BucketReputation",
    "BucketAware",
    "BucketMembership",
    "recommended",
    "RECOMMENDED_SPEC",
    "PREVIOUS_RECOMMENDED_SPEC",
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

# Every module registers its own definitions (decorators beside them); import them all.
import_submodules(__name__, __path__)




def make_defense(spec: str) -> Defense:
    """Build a defense from a CLI spec such as ``"trimmedmean:f=2"`` or ``"nnm:f=2>>krum:f=2"``.

    A bare positional value is the rule's main option, declared at registration: ``f`` for
    rules that take one (``"krum:3"``), ``size`` for bucketing, ``bound`` for clipping; ``>>`` composes
    pre-aggregators before the last rule.

    ``reputation[:k=v]>>rule`` wraps ``rule`` in per-client reputation (``Reputation``);
    ``bucketrep[:k=v]>>rule`` wraps ``rule`` in bucket-level reputation (``BucketReputation``,
    for bucketed SecAgg); ``recommended[:protocol]`` is ``recommended(protocol)``.

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
    if head == "bucketrep":  # "bucketrep:gate=3>>medclip>>mean": bucket reputation wraps the rest
        return BucketReputation(make_defense(">>".join(parts[1:])) if len(parts) > 1 else None, **head_kwargs)
    names = [parse_spec(part)[0] for part in parts]
    if "reputation" in names[1:]:  # "medclip>>reputation>>mean": pre-aggregators before the reputation
        i = names.index("reputation")
        rule = make_defense(">>".join(parts[i:]))
        for pre in reversed([DEFENSES.build(part) for part in parts[:i]]):
            rule = pre >> rule
        return rule
    built = [DEFENSES.build(part) for part in parts]
    rule = built[-1]
    for pre in reversed(built[:-1]):
        rule = pre >> rule
    return rule
