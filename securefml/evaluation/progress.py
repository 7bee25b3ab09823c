"""Progress bars for a running evaluation matrix (tqdm on stderr).

Used by ``securefml.evaluation.evaluate(progress=True)`` and hence by ``securefml eval``; kept
out of the CLI module so the library never imports the command line.
"""

from __future__ import annotations

import sys
from typing import Any

from securefml.evaluation.matrix import Cell
from securefml.server import RoundRecord

__all__ = ["ProgressBars"]


class ProgressBars:
    """Two tqdm bars on stderr: cells of the matrix, and rounds of the running cell."""

    def __init__(self, cells: int, rounds: int) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.rounds = rounds
        self.cells = tqdm(total=cells, desc="cells", unit="cell", file=sys.stderr, position=0)
        self.inner: Any = None

    def round_done(self, cell: Cell, rec: RoundRecord) -> None:
        if self.inner is None:
            label = f"{cell.attack_label} vs {cell.defense_label}"
            self.inner = self._tqdm(total=self.rounds, desc=label[:40], unit="round", file=sys.stderr,
                                    position=1, leave=False)
        self.inner.set_postfix(loss=f"{rec.train_loss:.3f}", flagged=len(rec.flagged))
        self.inner.update(1)

    def cell_done(self, cell: Cell, record: dict[str, Any], reused: bool) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None
        score = record.get("global")
        if reused:
            status = "reused"
        elif record.get("error"):
            status = "error"
        else:
            status = f"global={score:.3f}" if score is not None else "-"
        self.cells.set_postfix_str(f"{cell.attack_label} / {cell.defense_label}: {status}")
        self.cells.update(1)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
        self.cells.close()
