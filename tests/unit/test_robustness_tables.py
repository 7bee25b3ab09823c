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


def _with_detector(row: dict, **extra) -> dict:
    """A detection row as ``benchmarks/robustness.py`` writes it once the runs record the detector's flags."""
    return {**row, "final_cumulative_detector": {"tpr": 0.84, "fpr": 0.04},
            "cumulative_every_10_detector": [{"round": 9, "tpr": 0.2, "fpr": 0.0},
                                             {"round": 49, "tpr": 0.6, "fpr": 0.05}],
            "pooled_per_round_detector": {"tpr": 0.55, "fpr": 0.08},
            "target_met_detector": True, "target_met_excluded": False, "target_met": True, **extra}


def test_the_detection_table_shows_both_counts_and_when_its_runs_ran(tmp_path, readme_tables):
    data = {**DATA, "detection": [_with_detector(DATA["detection"][0])],
            "detection_measured": {"first_start_utc": "2026-12-02T18:00:00+00:00",
                                   "last_finish_utc": "2026-12-02T18:30:00+00:00", "cpus": 2,
                                   "load_avg_1min_at_finish": [1.5, 3.25], "runs_done": 1, "runs_planned": 1}}
    (tmp_path / "robustness.json").write_text(json.dumps(data))
    text = "<!-- bench:robustness -->\nold\n<!-- /bench:robustness -->\n"
    new, _, _ = readme_tables.regenerate(text, tmp_path)
    # detector's flags first (round 10, 50, last, met), then the exclusions, the pooled rates, accuracy
    assert ("| plaintext | 0 | 0.20 / 0.00 | 0.60 / 0.05 | 0.84 / 0.04 | yes | 0.72 / 0.09 | no | "
            "0.55 / 0.08 | 0.50 / 0.07 | 0.766 |") in new
    assert ("Detection runs measured 2026-12-02T18:00:00+00:00 to 2026-12-02T18:30:00+00:00 on 2 CPUs shared with "
            "other work (1-min load average 1.50-3.25 as each run finished)") in new
    assert ("on the detector's flags, plaintext: met in 1 of 1 seeds; on the exclusions, plaintext: met in 0 of 1 "
            "seeds.") in new
    assert "Summarized" not in new and "Measured 2026-12-02T00:30:00+00:00" in new  # the other sections' date


def _robustness_script():
    import importlib.util
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports its sibling ``peers``
    spec = importlib.util.spec_from_file_location("robustness_bench", ROOT / "benchmarks" / "robustness.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_detection_is_counted_on_the_detectors_flags_and_merged_alone(tmp_path):
    """``detection`` scores one cached run both ways; ``merge_sections`` replaces only that section."""
    import argparse

    bench = _robustness_script()
    args = argparse.Namespace(detection_protocols=["plaintext"], seeds=[0], detection_rounds=2, detector="recommended",
                              last_k=1, sections=["detection"])
    cfg = bench.detection_config(args, "plaintext", 0)
    # two rounds; malicious 0, 1, 2; round 1 flags all three but the cap lets one through
    rounds = [{"cohort": [0, 1, 5, 6], "flagged": [], "suspected": [], "update_norm": 1.0},
              {"cohort": [0, 1, 2, 5, 6], "flagged": [0, 1], "suspected": [0, 1, 2], "update_norm": 1.0}]
    rec = {"key": bench.key_of(cfg), "rounds": rounds, "malicious_ids": [0, 1, 2], "final": 0.5, "last_k": 0.5,
           "cumulative": [{"round": 0, "tpr": 0.0, "fpr": 0.0}, {"round": 1, "tpr": 2 / 3, "fpr": 0.0}],
           "cumulative_detector": [{"round": 0, "tpr": 0.0, "fpr": 0.0}, {"round": 1, "tpr": 1.0, "fpr": 0.0}],
           "pooled_per_round": {"tpr": 0.4, "fpr": 0.0}, "pooled_per_round_detector": {"tpr": 0.6, "fpr": 0.0},
           "seconds": 60.0, "finished_utc": "2026-12-02T18:01:00+00:00", "load_avg_1min": 1.0}
    cache = tmp_path / "runs.jsonl"
    cache.write_text(json.dumps(rec) + "\n")
    runner = bench.Runner(cache, 1)
    (row,) = bench.detection(args, runner)
    assert row["per_round_detector"][1] == {"round": 1, "malicious": 3, "flagged": 3, "tpr": 1.0, "fpr": 0.0}
    assert row["per_round"][1]["tpr"] == 2 / 3
    assert row["target_met_detector"] and not row["target_met_excluded"] and row["target_met"]
    assert row["counted_on"] == "detector"
    target = tmp_path / "robustness.json"
    target.write_text(json.dumps({"matrix": [{"kept": True}], "detection": [{"old": True}], "args": {"x": 1}}))
    bench.merge_sections(target, {"detection": [row], "args": {"y": 2}}, args, runner, [cfg])
    merged = json.loads(target.read_text())
    assert merged["matrix"] == [{"kept": True}] and merged["args"] == {"x": 1}
    assert merged["detection"] == [row] and merged["detection_args"] == {"y": 2}
    assert merged["detection_measured"]["first_start_utc"] == "2026-12-02T18:00:00+00:00"
    assert merged["detection_measured"]["runs_done"] == 1
