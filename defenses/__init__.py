"""Robust aggregation rules, pre-aggregators and Byzantine detectors (``securefml.defenses``).

Every rule is a ``Defense``: call it on ``[n, d]`` updates (optional weights) to get an
``AggregationResult``; Gram-capable rules (``Reveals.GRAM`` in ``runs_on``) also accept a
``Gram`` through ``aggregate_gram`` and return the coefficients for encrypted updates.
Pre-aggregators compose with ``>>`` (``NNM(f=2) >> TrimmedMean(f=2)``).
"""

from securefml.defenses.base import AggregationResult, Composed, Defense, PreAggregator
from securefml.defenses.cedar import CedarDetector
from securefml.defenses.clustering import FLAME, DnC, FoolsGold
from securefml.defenses.coordinate import CoordinateMedian, Meamed, TrimmedMean
from securefml.defenses.distance import Bulyan, Krum, MultiKrum, NormBound
from securefml.defenses.geometric import CenteredClipping, GeometricMedian
from securefml.defenses.mean import Mean
from securefml.defenses.metrics import DetectionRates, DetectionTracker, detection_rates
from securefml.defenses.preaggregators import ARC, NNM, Bucketing, Clipping
from securefml.defenses.trust import FLTrust
from securefml.registry import Registry

__all__ = [
    "AggregationResult",
    "Composed",
    "Defense",
    "PreAggregator",
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
    "FLTrust",
    "FLAME",
    "FoolsGold",
    "DnC",
    "CedarDetector",
    "DetectionRates",
    "DetectionTracker",
    "detection_rates",
    "DEFENSES",
    "make_defense",
]

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
DEFENSES.register("fltrust")(FLTrust)
DEFENSES.register("flame")(FLAME)
DEFENSES.register("foolsgold")(FoolsGold)
DEFENSES.register("dnc", positional="f")(DnC)
DEFENSES.register("cedar")(CedarDetector)


def make_defense(spec: str) -> Defense:
    """Build a defense from a CLI spec such as ``"trimmedmean:f=2"`` or ``"nnm:f=2>>krum:f=2"``.

    A bare positional value is the rule's main option, declared at registration: ``f`` for
    rules that take one (``"krum:3"``), ``size`` for bucketing, ``bound`` for clipping; ``>>`` composes
    pre-aggregators before the last rule.

    >>> make_defense("nnm:f=1>>krum:1")
    NNM(f=1, chunk=65536) >> Krum(f=1, chunk=65536)
    """
    built = [DEFENSES.build(part.strip()) for part in spec.split(">>")]
    rule = built[-1]
    for pre in reversed(built[:-1]):
        rule = pre >> rule
    return rule
