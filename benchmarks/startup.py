"""Start-up time of the installed wheel: ``securefml --help`` against bare-interpreter floors.

Builds the wheel, installs it into a fresh virtualenv (``benchmarks/wheelenv.py``), then times,
from a directory outside the checkout, ``repeats`` runs each of: the interpreter doing nothing
(the floor), ``securefml --help``, ``python -m securefml --help``, ``securefml run --help`` (which
lists the registries and so imports torch and the protocols) and ``python -c "import torch"``
(the peer: what any torch-based CLI pays).  Prints one JSON object: medians and ratios to the
floor and to the torch import measured in the same run.  Timings depend on the machine's
load (shown as ``load_avg``); compare ratios, within one run.

Usage: ``python benchmarks/startup.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wheelenv import make_wheel_env  # noqa: E402


def wall(cmd: list[str], cwd: Path, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = make_wheel_env(work / "wheel")
        outside = work / "cwd"
        outside.mkdir()
        py, cli = str(env.python), str(env.script)
        cases = {
            "python_nothing": [py, "-c", "pass"],
            "securefml_help": [cli, "--help"],
            "python_m_securefml_help": [py, "-m", "securefml", "--help"],
            "securefml_run_help": [cli, "run", "--help"],
            "python_import_torch": [py, "-c", "import torch"],
        }
        wall(cases["securefml_help"], outside, 1)  # warm the page cache once
        runs = {name: wall(cmd, outside, args.repeats) for name, cmd in cases.items()}
    med = {name: statistics.median(t) for name, t in runs.items()}
    out = {
        "repeats": args.repeats,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "runs_s": {k: [round(x, 4) for x in v] for k, v in runs.items()},
        "securefml_help_over_python_nothing": round(med["securefml_help"] / med["python_nothing"], 2),
        "securefml_help_over_import_torch": round(med["securefml_help"] / med["python_import_torch"], 3),
        "run_help_over_import_torch": round(med["securefml_run_help"] / med["python_import_torch"], 2),
        "load_avg": os.getloadavg(),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
