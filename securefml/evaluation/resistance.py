"""Resistance, not bias: per defense, clean accuracy, worst case over attacks, drop from clean.

A robust rule that is biased on heterogeneous clients ranks high in an attack-only table
for the wrong reason, and one that ignores attacks entirely can rank high on clean data.  This
table separates the two: for each defense (and protocol / malicious fraction) it reports the
clean score (attack ``none``), the worst score over every attack that ran (taken per seed,
then averaged), and the drop from clean, each a mean over seeds with a 95 % t-interval
half-width; rows are sorted by worst case, best first.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ResistanceRow", "resistance_rows", "resistance_markdown", "t_interval"]

# two-sided 95 % t quantiles for 1..30 degrees of freedom (then the normal's 1.96)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t_interval(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95 % t-interval (None for fewer than 2 values).

    >>> m, h = t_interval([0.8, 0.9, 1.0]); round(m, 3), round(h, 3)
    (0.9, 0.248)
    """
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, None
    t = _T975[len(values) - 2] if len(values) - 1 <= len(_T975) else 1.96
    return m, t * statistics.stdev(values) / math.sqrt(len(values))


@dataclass(frozen=True)
class ResistanceRow:
    """One defense's resistance in one (protocol, malicious fraction) group."""

    protocol: str
    malicious: float
    defense: str
    clean: tuple[float, float | None] | None
    worst: tuple[float, float | None] | None
    worst_attack: str | None
    drop: tuple[float, float | None] | None
    seeds: int


def resistance_rows(records: Sequence[Mapping[str, Any]], metric: str = "personalized") -> list[ResistanceRow]:
    """Group evaluation records into resistance rows (sorted by worst case, best first)."""
    ok = [r for r in records if not r.get("error") and isinstance(r.get(metric), (int, float))]
    clean: dict[tuple[str, str], dict[int, float]] = {}
    attacked: dict[tuple[str, float, str], dict[str, dict[int, float]]] = {}
    for r in ok:
        if r["attack"] == "none":
            clean.setdefault((r["protocol"], r["defense"]), {})[int(r["seed"])] = float(r[metric])
        else:
            key = (r["protocol"], float(r["malicious"]), r["defense"])
            attacked.setdefault(key, {}).setdefault(r["attack"], {})[int(r["seed"])] = float(r[metric])
    rows = []
    for (protocol, frac, defense), by_attack in attacked.items():
        seeds = sorted(set.intersection(*(set(v) for v in by_attack.values())))
        worst_per_seed = [min(by_attack[a][s] for a in by_attack) for s in seeds]
        base = clean.get((protocol, defense), {})
        both = [s for s in seeds if s in base]
        mean_by_attack = {a: statistics.fmean(v[s] for s in seeds) for a, v in by_attack.items()} if seeds else {}
        rows.append(ResistanceRow(
            protocol, frac, defense,
            clean=t_interval([base[s] for s in sorted(base)]) if base else None,
            worst=t_interval(worst_per_seed) if seeds else None,
            worst_attack=min(mean_by_attack, key=mean_by_attack.__getitem__) if mean_by_attack else None,
            drop=t_interval([base[s] - min(by_attack[a][s] for a in by_attack) for s in both]) if both else None,
            seeds=len(seeds),
        ))
    rows.sort(key=lambda r: (r.protocol, r.malicious, -(r.worst[0] if r.worst else -math.inf)))
    return rows


def _cell(v: tuple[float, float | None] | None) -> str:
    if v is None:
        return "-"
    return f"{v[0]:.3f}" + (f" ± {v[1]:.3f}" if v[1] is not None else "")


def resistance_markdown(records: Sequence[Mapping[str, Any]], metric: str = "personalized") -> str:
    """The resistance table in Markdown (empty when no attacked cell ran)."""
    rows = resistance_rows(records, metric)
    if not rows:
        return ""
    lines = ["| protocol | malicious | defense | clean | worst case | worst attack | drop from clean | seeds |",
             "|---|---:|---|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.protocol} | {r.malicious:.0%} | {r.defense.replace('|', '/')} | {_cell(r.clean)} | "
                     f"{_cell(r.worst)} | {r.worst_attack or '-'} | {_cell(r.drop)} | {r.seeds} |")
    return "\n".join(lines)
