"""``evaluate``: the Python entry point of the attack x defense evaluation.

Pass spec strings for the built-in attacks and defenses, or instances of your own ``Attack``
/ ``Defense`` subclasses; every cell is a real federated run.  With ``out`` the records are
saved after every cell and reused on the next call (an interrupted evaluation resumes), and
the JSON/CSV/Markdown/PNG reports are written at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securefml.evaluation.matrix import AttackLike, Cell, DefenseLike, Matrix, run_matrix
from securefml.evaluation.metrics import METRICS
from securefml.evaluation.progress import ProgressBars
from securefml.evaluation.report import load_records, markdown_table, save_records, write_reports
from securefml.experiment import RunConfig

__all__ = ["Evaluation", "evaluate"]


@dataclass
class Evaluation:
    """The outcome of ``evaluate``: one record per cell, and the report files if written.

    Attributes
    ----------
    records:
        One flat dict per cell (coordinates, ``key``, the ``METRICS`` and details).
    matrix:
        The evaluated grid.
    paths:
        Written files by name (``"json"``, ``"csv"``, ``"md"``, ``"heatmap_<metric>"``).
    reused:
        How many cells came from an earlier run in the same output folder.
    """

    records: list[dict[str, Any]]
    matrix: Matrix
    paths: dict[str, Path] = field(default_factory=dict)
    reused: int = 0

    def table(self, metric: str = "global") -> str:
        """A Markdown attack x defense table of ``metric`` (means over seeds)."""
        return markdown_table(self.records, metric)

    def value(self, attack: str, defense: str, metric: str = "global", **where: Any) -> float | None:
        """Mean of ``metric`` over the matching cells (filter further with protocol=, malicious=, seed=)."""
        vals = [
            r[metric]
            for r in self.records
            if r["attack"] == attack and r["defense"] == defense and r.get(metric) is not None
            and all(r.get(k) == v for k, v in where.items())
        ]
        return sum(vals) / len(vals) if vals else None


def evaluate(
    attacks: Sequence[AttackLike],
    defenses: Sequence[DefenseLike],
    *,
    protocols: Sequence[str] = ("plaintext",),
    malicious: Sequence[float] = (0.2,),
    seeds: Sequence[int] = (0,),
    out: str | Path | None = None,
    resume: bool = True,
    plots: bool = True,
    threads: int | None = 1,
    progress: bool = False,
    on_cell: Callable[[Cell, dict[str, Any], bool], None] | None = None,
    metrics: Sequence[str] = METRICS,
    **config: Any,
) -> Evaluation:
    """Evaluate every attack against every defense (x protocols x malicious fractions x seeds).

    Parameters
    ----------
    attacks, defenses:
        Spec strings (``"ipm:epsilon=0.1"``, ``"bucketing:size=2>>krum:f=5"``) or instances of
        ``Attack`` / ``Defense`` subclasses (deep-copied for each cell; named by their repr).
        Include ``"none"`` among the attacks for the clean baseline.
    protocols, malicious, seeds:
        The other axes of the grid.
    out:
        Folder for ``eval.json`` (saved after every cell), ``eval.csv``, ``eval.md`` and the
        heatmaps.  None keeps everything in memory.
    resume:
        Reuse the cells already recorded in ``out/eval.json`` (same configuration hash).  Cells
        of an earlier, different matrix in the same folder are kept there as archived records
        (reusable, not in the tables).
    threads:
        torch intra-op threads during the runs (1 is fastest for these small models).
    progress:
        Show tqdm bars per cell and per round on stderr.
    **config:
        Any other ``RunConfig`` field: ``dataset``, ``algorithm``, ``rounds``,
        ``clients_per_round``, ``dataset_options``, ``server_lr``...

    Returns
    -------
    Evaluation
        The records (and written paths).

    Examples
    --------
    >>> from securefml.attacks import Attack
    >>> class Zero(Attack):
    ...     name = "zero"
    ...     def poison_updates(self, own, context):
    ...         return own * 0
    >>> ev = evaluate(["none", Zero()], ["mean"], rounds=1, clients_per_round=4, dataset="digits-skew",
    ...               algorithm="fedavg", dataset_options={"n_clients": 4, "n_heldout": 1})
    >>> [(r["attack"], r["defense"], r["malicious"]) for r in ev.records]
    [('none', 'mean', 0.0), ('Zero()', 'mean', 0.2)]
    """
    base = RunConfig.from_dict(dict(config)) if config else RunConfig()
    matrix = Matrix(tuple(attacks), tuple(defenses), tuple(protocols), tuple(malicious), tuple(seeds), base)
    previous = load_records(out, archived=True) if (out is not None and resume) else []
    bars = None
    if progress:
        bars = ProgressBars(len(matrix.cells()), base.rounds)
    done: list[dict[str, Any]] = []
    reused = 0

    def after_cell(cell: Cell, record: dict[str, Any], was_reused: bool) -> None:
        nonlocal reused
        reused += int(was_reused)
        done.append(record)
        if out is not None and not was_reused:
            keys = {r["key"] for r in done}
            save_records(done, out, archived=[r for r in previous if r.get("key") not in keys])
        if bars is not None:
            bars.cell_done(cell, record, was_reused)
        if on_cell is not None:
            on_cell(cell, record, was_reused)

    try:
        records = run_matrix(
            matrix, previous=previous, on_cell=after_cell, threads=threads,
            on_round=None if bars is None else bars.round_done,
        )
    finally:
        if bars is not None:
            bars.close()
    paths: dict[str, Path] = {}
    if out is not None:
        keys = {r["key"] for r in records}
        archived = [r for r in previous if r.get("key") not in keys]
        paths = write_reports(records, out, metrics=metrics, plots=plots, archived=archived)
    return Evaluation(records, matrix, paths, reused)

