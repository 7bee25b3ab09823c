"""The README's robustness tables are rendered from benchmarks/robustness.py's JSON, nothing typed."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]



def _iv(m, h=None):
    return {"mean": m, "ci95": h}


DATA = {
    "args": {"last_k": 5, "selection_rounds": 200, "detection_rounds": 100, "detector": "reputation>>mean",
             "attacks": ["alie", "ipm"], "rounds": 50, "clients_per_round": 10},
    "machine_before": {"utc": "2026-12-02T00:30:00+00:00", "cpus": 2, "load_avg": [14.0]},
    "machine_after": {"utc": "2026-12-02T01:40:00+00:00", "cpus": 2, "load_avg": [12.0]},
    "runs_planned": 10, "runs_done": 9,
    "selection": [{"select": "chunks:0.5", "rounds": 200, "seeds": [0, 1], "last_k": _iv(0.8, 0.05),
                   "final": _iv(0.79), "bytes_vs_all": 0.506, "minus_all_layers": _iv(-0.1, 0.02)}],
    "detection": [{"protocol": "plaintext", "seed": 0, "defense": "reputation>>mean",
                   "final_cumulative": {"tpr": 0.72, "fpr": 0.093},
                   "cumulative_every_10": [{"round": 9, "tpr": 0.1, "fpr": 0.0},
                                           {"round": 49, "tpr": 0.5, "fpr": 0.05}],
                   "pooled_per_round": {"tpr": 0.5, "fpr": 0.07}, "accuracy_last_k": 0.766, "target_met": False}],
    "matrix": [{"dataset": "digits-fewshot", "algorithm": "fomaml", "malicious": 0.2, "rows": [
        {"defense": "recommended", "seeds": [0, 1, 2], "clean": _iv(0.7, 0.1), "worst_case": _iv(0.65, 0.1),
         "worst_attack": "alie", "drop_from_clean": _iv(0.05, 0.02), "clean_minus_mean_clean": _iv(0.01, 0.03),
         "per_attack": {"alie": _iv(0.65), "ipm": _iv(0.68)}, "complete": True},
        {"defense": "mean", "seeds": [0, 1, 2], "clean": _iv(0.69, 0.1), "worst_case": _iv(0.2, 0.0),
         "worst_attack": "ipm", "drop_from_clean": _iv(0.49, 0.02), "clean_minus_mean_clean": _iv(0.0, 0.0),
         "per_attack": {"alie": _iv(0.6), "ipm": _iv(0.2)}, "complete": True}]}],
    "protocols": [{"protocol": "ckks", "defense": "recommended:ckks", "attack": "signflip:scale=10",
                   "setting": "digits-fewshot/fomaml", "rounds": 20, "malicious": 0.2, "seeds": [0, 1, 2],
                   "last_k": _iv(0.61, 0.02), "plaintext_last_k": _iv(0.615, 0.02),
                   "minus_plaintext": _iv(-0.005, 0.01), "within_1_point": True}],
}


def test_every_section_renders_from_its_json(tmp_path, readme_tables):
    mod = readme_tables
    (tmp_path / "robustness.json").write_text(json.dumps(DATA))
    text = "a\n<!-- bench:robustness -->\nold\n<!-- /bench:robustness -->\nb\n"
    new, updated, _ = mod.regenerate(text, tmp_path)
    assert updated == ["robustness"] and "old" not in new
    assert "9 of 10 planned runs finished" in new
    assert "| `chunks:0.5` | 200 | 0.800 ± 0.050 | -0.100 ± 0.020 | 0.51 | 2 |" in new
    assert "| plaintext | 0 | 0.10 / 0.00 | 0.50 / 0.05 | 0.72 / 0.09 | no | 0.50 / 0.07 | 0.766 |" in new
    assert ("| digits-fewshot fomaml | 20% | `recommended` | 0.700 ± 0.100 | 0.650 ± 0.100 | alie | "
            "0.050 ± 0.020 | 0.010 ± 0.030 | 3 |") in new
    assert "| digits-fewshot fomaml | 20% | `mean` | 0.600 | 0.200 |" in new  # per attack
    assert ("| ckks | `recommended:ckks` | digits-fewshot/fomaml | 20% | signflip:scale=10 | 20 | 0.610 ± 0.020 | "
            "0.615 ± 0.020 | -0.005 ± 0.010 | yes | 3 |") in new
    assert ("clean 0.700, +1.0 points against the mean's (met); worst case 0.650 (alie), drop 5.0 points (met); "
            "best other rule's worst case 0.200: met.") in new
    assert "plaintext: met in 0 of 1 seeds." in new
    assert mod.regenerate(new, tmp_path)[1] == []  # idempotent
