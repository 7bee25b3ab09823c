"""Write an evaluation's records: ``eval.json``, ``eval.csv``, ``eval.md`` and one heatmap PNG per metric.

``eval.json`` is the source of truth (one record per cell, with the cell's key and full
configuration); it is also what a rerun reads back to resume.  The CSV holds the flat
columns, the Markdown file one attack x defense table per metric (means over seeds, with the
spread when there are several), and each heatmap the same table as colours.  Plots use
matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from securefml.errors import DataError
from securefml.evaluation.metrics import HIGHER_IS_BETTER, METRICS
from securefml.evaluation.resistance import resistance_markdown

__all__ = [
    "heatmap_figure",
    "load_records",
    "save_records",
    "write_reports",
    "pivot",
    "markdown_table",
    "CSV_COLUMNS",
    "TITLES",
]

#: Flat columns of ``eval.csv`` (nested details stay in ``eval.json``).
CSV_COLUMNS = (
    "key",
    "attack",
    "defense",
    "protocol",
    "malicious",
    "seed",
    "metric",
    *METRICS,
    "personalized_std",
    "global_std",
    "rejected",
    "rounds",
    "error",
)

#: Human titles of the metrics in tables and plots.
TITLES = {
    "personalized": "personalized {metric} (held-out clients, after fine-tuning)",
    "personalized_last_k": "personalized {metric}, mean of the last k rounds' evaluations",
    "global": "global {metric} (held-out clients, no fine-tuning)",
    "asr_personalized": "backdoor attack success rate after fine-tuning",
    "asr_global": "backdoor attack success rate of the global model",
    "tpr": "detection true-positive rate",
    "fpr": "detection false-positive rate",
    "bytes_uploaded": "bytes uploaded (all rounds)",
    "wall_seconds": "wall seconds per run",
}


def _clean(value: Any) -> Any:
    """Recursively replace NaN/Inf by None: ``eval.json`` stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so an interrupted run never leaves half a file.

    ``mkstemp`` makes its file private (0600); the report is given the mode an ordinary
    ``open`` would (0666 less the umask: 0644 usually), like the PNGs beside it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_records(
    records: Sequence[Mapping[str, Any]], out_dir: str | Path, *, archived: Sequence[Mapping[str, Any]] = ()
) -> Path:
    """Write ``eval.json`` (atomically) and return its path.

    ``archived`` records (cells of earlier matrices written to the same folder) are kept
    under their own key: they stay reusable by a later run but are not part of the tables.
    """
    path = Path(out_dir) / "eval.json"
    payload: dict[str, Any] = {"records": _clean(list(records))}
    if archived:
        payload["archived"] = _clean(list(archived))
    _atomic_write(path, json.dumps(payload, indent=1, allow_nan=False) + "\n")
    return path


def load_records(out_dir: str | Path, *, archived: bool = False) -> list[dict[str, Any]]:
    """Records of ``out_dir/eval.json`` (plus its archived ones if asked); [] if there is none yet.

    Raises
    ------
    DataError
        If the file exists but is not an evaluation written by ``save_records``.
    """
    path = Path(out_dir) / "eval.json"
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable evaluation file ({exc})") from exc
    records = data.get("records") if isinstance(data, dict) else None
    old = data.get("archived", []) if isinstance(data, dict) else None
    if not isinstance(records, list) or not isinstance(old, list) or not all(
        isinstance(r, dict) for r in [*records, *old]
    ):
        raise DataError(f"{path}: expected an object with a 'records' list")
    return records + old if archived else records


def _stat(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return None, None, 0
    mean = statistics.fmean(finite)
    std = statistics.pstdev(finite) if len(finite) > 1 else None
    return mean, std, len(finite)


def _group(record: Mapping[str, Any]) -> str:
    """The row label of a record: its attack, with protocol and malicious fraction when they vary."""
    return f"{record['attack']} | {record['protocol']} | f={record['malicious']:.0%}"


def pivot(
    records: Iterable[Mapping[str, Any]], metric: str
) -> tuple[list[str], list[str], dict[tuple[str, str], tuple[float | None, float | None, int]]]:
    """Rows (attack | protocol | fraction), columns (defense) and (mean, std, n) over seeds per cell."""
    rows: list[str] = []
    cols: list[str] = []
    values: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r.get("error"):
            continue
        row, col = _group(r), str(r["defense"])
        if row not in rows:
            rows.append(row)
        if col not in cols:
            cols.append(col)
        v = r.get(metric)
        values.setdefault((row, col), [])
        if v is not None:
            values[(row, col)].append(v)
    return rows, cols, {k: _stat(v) for k, v in values.items()}


def _fmt(metric: str, mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    if metric == "bytes_uploaded":
        text = f"{mean / 1e6:.2f} MB"
    elif metric == "wall_seconds":
        text = f"{mean:.1f}"
    else:
        text = f"{mean:.3f}"
    if std is not None and metric not in ("bytes_uploaded",):
        text += f" ± {std:.3f}" if metric != "wall_seconds" else f" ± {std:.1f}"
    return text


def _metric_name(records: Sequence[Mapping[str, Any]]) -> str:
    names: set[str] = {r["metric"] for r in records if r.get("metric")}
    return names.pop() if len(names) == 1 else "score"


def markdown_table(records: Sequence[Mapping[str, Any]], metric: str) -> str:
    """One Markdown table: rows attack | protocol | malicious fraction, columns defense."""
    rows, cols, cells = pivot(records, metric)
    if not rows:
        return ""
    head = "| attack \\| protocol \\| malicious | " + " | ".join(c.replace("|", "\\|") for c in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    body = []
    for row in rows:
        entries = [_fmt(metric, *cells.get((row, c), (None, None, 0))[:2]) for c in cols]
        body.append("| " + row.replace("|", "\\|") + " | " + " | ".join(entries) + " |")
    return "\n".join([head, sep, *body])


def _has_values(records: Sequence[Mapping[str, Any]], metric: str) -> bool:
    return any(stat[0] is not None for stat in pivot(records, metric)[2].values())


def _markdown(records: Sequence[Mapping[str, Any]], metrics: Sequence[str], title: str) -> str:
    name = _metric_name(records)
    seeds = sorted({r["seed"] for r in records})
    parts = [f"# {title}", ""]
    parts.append(
        f"{len(records)} cells; seeds {seeds}"
        + ("; entries are mean ± population std over seeds." if len(seeds) > 1 else ".")
    )
    for metric in metrics:
        if not _has_values(records, metric):
            continue
        table = markdown_table(records, metric)
        parts += ["", f"## {TITLES.get(metric, metric).format(metric=name)}", "", table]
    resistance = resistance_markdown(records, "personalized_last_k") if name == "accuracy" else ""
    if resistance:
        parts += ["", "## resistance: clean, worst case over attacks, drop (mean ± 95% t-interval over seeds)",
                  "", resistance]
    errors = [r for r in records if r.get("error")]
    if errors:
        parts += ["", "## cells that could not run", ""]
        parts += [f"- {r['attack']} / {r['defense']} / {r['protocol']}: {r['error']}" for r in errors]
    return "\n".join(parts) + "\n"


def _csv(records: Sequence[Mapping[str, Any]]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


#: Axis titles of the heatmaps: what a row and a column of the table are.
ROW_AXIS = "attack | protocol | malicious fraction"
COLUMN_AXIS = "defense"


def heatmap_figure(records: Sequence[Mapping[str, Any]], metric: str) -> Any:
    """The attack x defense heatmap of ``metric`` as a matplotlib ``Figure``, or ``None`` without values.

    Rows are attack | protocol | malicious fraction, columns defenses (both axes titled), colour
    and cell text the mean over seeds; the colour scale runs towards "better" for the metric.
    matplotlib (Agg backend) is imported here, only when a plot is drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, cols, cells = pivot(records, metric)
    grid = np.full((len(rows), len(cols)), np.nan)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            mean = cells.get((row, col), (None, None, 0))[0]
            if mean is not None:
                grid[i, j] = mean
    if not rows or np.isnan(grid).all():
        return None
    name = _metric_name(records)
    higher = HIGHER_IS_BETTER.get(metric, True)
    if metric in ("personalized", "personalized_last_k", "global") and name == "mse":
        higher = False
    fig, ax = plt.subplots(figsize=(2.0 + 1.1 * len(cols), 1.2 + 0.5 * len(rows)), dpi=110)
    bounded = name != "mse" and metric in (
        "personalized", "personalized_last_k", "global", "asr_personalized", "asr_global", "tpr", "fpr")
    im = ax.imshow(grid, cmap="viridis" if higher else "viridis_r", aspect="auto",
                   vmin=0.0 if bounded else None, vmax=1.0 if bounded else None)
    ax.set_xticks(range(len(cols)), labels=cols, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=8)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not np.isnan(grid[i, j]):
                text = f"{grid[i, j] / 1e6:.1f}M" if metric == "bytes_uploaded" else f"{grid[i, j]:.2f}"
                shade = float(cast(float, im.norm(grid[i, j])))  # a scalar in, a numpy scalar out
                light = shade > 0.6 if higher else shade < 0.4  # viridis is light at its top end
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="k" if light else "w")
    ax.set_title(TITLES.get(metric, metric).format(metric=name), fontsize=9)
    ax.set_xlabel(COLUMN_AXIS, fontsize=8)
    ax.set_ylabel(ROW_AXIS, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return fig


def _heatmap(records: Sequence[Mapping[str, Any]], metric: str, path: Path) -> bool:
    fig = heatmap_figure(records, metric)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True


def write_reports(
    records: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    metrics: Sequence[str] = METRICS,
    title: str = "securefml attack x defense evaluation",
    plots: bool = True,
    archived: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Path]:
    """Write ``eval.json``, ``eval.csv``, ``eval.md`` and ``heatmap_<metric>.png`` into ``out_dir``.

    A heatmap is drawn only for metrics with at least one value (e.g. no attack success rate
    plot when no backdoor ran).  Returns the written paths by name (``"json"``, ``"csv"``,
    ``"md"``, ``"heatmap_<metric>"``).  ``archived`` records are kept in ``eval.json`` only
    (see ``save_records``).
    """
    out = Path(out_dir)
    clean = _clean(list(records))
    paths = {"json": save_records(clean, out, archived=archived)}
    paths["csv"] = out / "eval.csv"
    _atomic_write(paths["csv"], _csv(clean))
    paths["md"] = out / "eval.md"
    _atomic_write(paths["md"], _markdown(clean, metrics, title))
    if plots:
        for metric in metrics:
            target = out / f"heatmap_{metric}.png"
            if _heatmap(clean, metric, target):
                paths[f"heatmap_{metric}"] = target
    return paths
