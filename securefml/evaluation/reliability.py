"""Reliability diagrams (PNG) from the pooled calibration bins a run stores in ``result.json``.

A reliability diagram plots, per confidence bin, the accuracy of the predictions in it against
their mean confidence (Guo et al. ICML 2017): a calibrated model lies on the diagonal, an
over-confident one below it.  Bars are the bins' accuracies, the red outline the gap to the
bin's mean confidence; the histogram underneath shows how many predictions each bin holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from securefml.errors import ConfigError

__all__ = ["reliability_diagram"]


def reliability_diagram(bins: Mapping[str, Any], path: str | Path, *, title: str = "reliability",
                        ece: float | None = None) -> Path:
    """Draw equal-width ``bins`` (``ReliabilityBins.to_dict()``) to ``path`` and return it.

    Raises ``ConfigError`` if the bins are not equal-width bins with ``n + 1`` edges.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, counts = list(bins["edges"]), list(bins["counts"])
    acc, conf = list(bins["accuracy"]), list(bins["confidence"])
    if len(edges) != len(counts) + 1 or not (len(counts) == len(acc) == len(conf)) or not counts:
        raise ConfigError("reliability bins need n counts/accuracies/confidences and n + 1 edges")
    width = [hi - lo for lo, hi in zip(edges[:-1], edges[1:])]
    left = edges[:-1]
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.2, 5.0), dpi=110, sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    shown = [(lo, w, a, c) for lo, w, a, c in zip(left, width, acc, conf) if a is not None and c is not None]
    ax.bar([s[0] for s in shown], [s[2] for s in shown], width=[s[1] for s in shown], align="edge",
           color="#3b75af", edgecolor="k", linewidth=0.5, label="accuracy")
    ax.bar([s[0] for s in shown], [s[3] - s[2] for s in shown], bottom=[s[2] for s in shown],
           width=[s[1] for s in shown], align="edge", color="none", edgecolor="#c0392b", hatch="//",
           linewidth=0.8, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title + (f" (ECE {ece:.3f})" if ece is not None else ""), fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    hist.bar(left, counts, width=width, align="edge", color="#888", edgecolor="k", linewidth=0.5)
    hist.set_xlabel("confidence")
    hist.set_ylabel("count")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, bbox_inches="tight")
    plt.close(fig)
    return target
