"""Robust aggregation rules, pre-aggregators and Byzantine detectors (``securefml.defenses``)."""

from securefml.defenses.base import AggregationResult, Composed, Defense, PreAggregator
from securefml.defenses.mean import Mean
from securefml.registry import Registry

__all__ = ["AggregationResult", "Composed", "Defense", "PreAggregator", "Mean", "DEFENSES", "make_defense"]

DEFENSES: Registry[Defense] = Registry("defense")
DEFENSES.register("mean")(Mean)


def make_defense(spec: str) -> Defense:
    """Build a defense from a CLI spec such as ``"trimmedmean:f=2"`` or ``"nnm>>krum:f=3"``."""
    from securefml.registry import parse_spec

    parts = [p.strip() for p in spec.split(">>")]
    built = []
    for part in parts:
        name, kwargs = parse_spec(part)
        if "_" in kwargs:
            kwargs["f"] = kwargs.pop("_")
        built.append(DEFENSES.create(name, **kwargs))
    rule = built[-1]
    for pre in reversed(built[:-1]):
        rule = pre >> rule
    return rule
