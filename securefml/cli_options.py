"""Command-line options that ``securefml run`` and ``securefml eval`` share (one definition each)."""

from __future__ import annotations

import argparse

__all__ = ["add_learning_options"]


def add_learning_options(p: argparse.ArgumentParser) -> None:
    """The learner's and server optimizer's step sizes and counts; unset means the preset's value."""
    p.add_argument("--inner-steps", type=int)
    p.add_argument("--inner-lr", type=float)
    p.add_argument("--outer-lr", type=float)
    p.add_argument("--server-opt", choices=["sgd", "adam"])
    p.add_argument("--server-lr", type=float)
    p.add_argument("--finetune-steps", type=int, help="personalization steps on held-out clients")
