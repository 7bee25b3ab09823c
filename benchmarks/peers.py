"""Shared helpers of the benchmarks: peer libraries loaded when installed, interleaved timing.

Peers are optional.  A benchmark measures a peer in the same run, on the same input, only
when the peer imports; otherwise its JSON says ``"anchor": "not measured"`` and no ratio is
computed.  No timing is ever compared with a number typed in from an earlier run.

ByzFL 0.0.11 (``pip install --no-deps byzfl==0.0.11 scipy``): its package ``__init__``
imports its training harness, which needs torchvision (which does not import beside the CPU
torch), so only ``byzfl.aggregators`` is loaded, under a bare namespace for ``byzfl``.

Timing on a shared machine: ``interleaved`` runs every candidate once per repeat, in turn,
so a burst of load from other processes hits all candidates alike, and reports medians.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

NOT_MEASURED = "not measured"


def load_byzfl() -> tuple[Any, str] | None:
    """``(byzfl.aggregators.aggregators, version)`` when ByzFL is installed, else None."""
    try:
        spec = importlib.util.find_spec("byzfl")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.submodule_search_locations is None:
        return None
    if "byzfl" not in sys.modules:
        pkg = types.ModuleType("byzfl")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["byzfl"] = pkg
    try:
        mod = importlib.import_module("byzfl.aggregators.aggregators")
    except ImportError:
        return None
    return mod, importlib.metadata.version("byzfl")


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(
    candidates: Mapping[str, Callable[[], object]], reps: int, *, device: torch.device | str = "cpu"
) -> dict[str, dict[str, float | list[float]]]:
    """Median wall time of each candidate over ``reps`` rounds that run every candidate in turn.

    Each candidate runs once untimed first (warm-up: allocations, lazy imports).
    """
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "runs_s": [round(t, 5) for t in v]}
            for k, v in times.items()}


def machine() -> dict[str, object]:
    """What the timings depend on, including the load other processes put on the machine."""
    return {
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_report(report: Mapping[str, Any], out: str | os.PathLike[str] | None, *, indent: int = 2,
                 default: Callable[[Any], Any] | None = None) -> None:
    """Print a benchmark's JSON report and, when ``out`` is given, write it there (folders created).

    The README tables are regenerated from these files (``readme_tables.py``), so every benchmark
    writes them the same way: one JSON document and a trailing newline.
    """
    text = json.dumps(report, indent=indent, default=default)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text)
