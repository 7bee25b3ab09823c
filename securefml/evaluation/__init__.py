"""Attack x defense evaluation (``securefml.evaluation``): the matrix, its metrics and its reports.

``evaluate(attacks, defenses, ...)`` runs every cell as a real federated run and returns the
records; ``securefml eval`` does the same from the command line (``add_eval_parser`` /
``run_eval``).  Attacks and defenses are spec strings or instances of users' own classes.
Each cell records the final personalized score and the mean over its last ``last_k`` rounds
(``personalized_last_k``; ``securefml eval --last-k``, default 5), which the resistance table uses.
"""

from securefml.evaluation.api import Evaluation, evaluate
from securefml.evaluation.cli import add_eval_parser, run_eval
from securefml.evaluation.matrix import Cell, Matrix, cell_key, label_of, run_cell, run_matrix
from securefml.evaluation.metrics import METRICS, backdoor_success, cell_metrics, is_backdoor
from securefml.evaluation.presets import PRESETS, preset
from securefml.evaluation.progress import ProgressBars
from securefml.evaluation.reliability import reliability_diagram
from securefml.evaluation.report import load_records, markdown_table, pivot, save_records, write_reports
from securefml.evaluation.resistance import ResistanceRow, resistance_markdown, resistance_rows, t_interval

__all__ = [
    "Evaluation",
    "evaluate",
    "Matrix",
    "Cell",
    "cell_key",
    "label_of",
    "run_cell",
    "run_matrix",
    "METRICS",
    "backdoor_success",
    "cell_metrics",
    "is_backdoor",
    "reliability_diagram",
    "load_records",
    "save_records",
    "write_reports",
    "markdown_table",
    "pivot",
    "PRESETS",
    "preset",
    "add_eval_parser",
    "run_eval",
    "ProgressBars",
    "ResistanceRow",
    "resistance_rows",
    "resistance_markdown",
    "t_interval",
]
