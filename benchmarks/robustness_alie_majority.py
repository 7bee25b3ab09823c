"""Re-run the ``recommended`` ALIE runs of the robustness matrix that raised before ALIE handled a
Byzantine-majority cohort (``ALIE.z_for``); one JSON.

    nice -n 10 python benchmarks/robustness_alie_majority.py --out benchmarks/json/robustness_alie_majority.json

The runs are the matrix's own configurations (``robustness.matrix_config``: 50 rounds, 10 per
round, last-5 accuracy), so each number slots into the matrix's ALIE column for its seed.  The
matrix's other runs are not redone here: the JSON reports each run beside the matrix's clean
mean and worst case of its (setting, fraction) row, which were computed without it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from peers import write_report
from robustness import _machine, matrix_config, summarize

# (setting, fraction, seed) of the `recommended` ALIE runs listed as raised in robustness.json
RAISED = [("digits-fewshot/fomaml", 0.25, 1), ("digits-fewshot/fomaml", 0.2, 2), ("digits-fewshot/fomaml", 0.25, 2),
          ("digits-fewshot/maml", 0.25, 1), ("digits-fewshot/maml", 0.2, 2), ("digits-fewshot/maml", 0.25, 2),
          ("digits-skew/fedavg", 0.25, 2)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", type=Path, default=Path("benchmarks/json/robustness.json"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    matrix = json.loads(args.matrix.read_text())
    margs = argparse.Namespace(**matrix["args"])
    rows = {(f"{m['dataset']}/{m['algorithm']}", m["malicious"]): next(r for r in m["rows"]
                                                                          if r["defense"] == "recommended")
            for m in matrix["matrix"]}
    before = _machine()
    runs: list[dict[str, Any]] = []
    for setting, frac, seed in RAISED:
        rec = summarize(matrix_config(margs, setting, frac, "recommended", "alie", seed))
        row = rows[(setting, frac)]
        runs.append({"setting": setting, "malicious": frac, "seed": seed, "error": rec.get("error"),
                     "alie_last_k": rec.get("last_k"), "seconds": rec.get("seconds"),
                     "matrix_clean_mean": row["clean"]["mean"], "matrix_worst_case_mean": row["worst_case"]["mean"],
                     "matrix_alie_mean_other_seeds": row["per_attack"]["alie"]["mean"]})
        print(json.dumps(runs[-1]), flush=True)
    write_report({"machine_before": before, "machine_after": _machine(), "runs": runs}, args.out, indent=1)


if __name__ == "__main__":
    main()
