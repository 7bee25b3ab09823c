"""Reports from hand-made records: seed statistics, missing metrics, strict JSON, the heatmap colours."""

from __future__ import annotations

import json
import math

import pytest

from securefml.evaluation import markdown_table, pivot, write_reports


def record(attack: str, defense: str, seed: int, acc: float, **extra) -> dict:
    base = {"key": f"{attack}-{defense}-{seed}", "attack": attack, "defense": defense, "protocol": "plaintext",
            "malicious": 0.0 if attack == "none" else 0.2, "seed": seed, "metric": "accuracy",
            "personalized": acc, "global": acc, "asr_personalized": None, "asr_global": None, "tpr": None,
            "fpr": None, "bytes_uploaded": 1000, "wall_seconds": 1.0}
    return {**base, **extra}


def test_pivot_averages_over_seeds_and_keeps_row_and_column_order() -> None:
    recs = [record("none", "mean", 0, 0.8), record("none", "mean", 1, 0.6), record("ipm", "krum", 0, 0.2),
            record("ipm", "mean", 0, 0.5)]
    rows, cols, cells = pivot(recs, "global")
    assert rows == ["none | plaintext | f=0%", "ipm | plaintext | f=20%"] and cols == ["mean", "krum"]
    mean, std, n = cells[(rows[0], "mean")]
    assert mean == pytest.approx(0.7) and std == pytest.approx(0.1) and n == 2
    assert cells[(rows[1], "krum")][:2] == (0.2, None)
    table = markdown_table(recs, "global")
    assert "0.700 ± 0.100" in table and "| - |" in table  # none x krum never ran


def test_reports_skip_empty_metrics_write_strict_json_and_list_failures(tmp_path) -> None:
    recs = [record("none", "mean", 0, 0.8, tpr=float("nan")),
            record("backdoor", "mean", 0, 0.7, asr_personalized=0.9, asr_global=0.95),
            {"key": "x", "attack": "none", "defense": "median", "protocol": "ckks", "malicious": 0.0, "seed": 0,
             "error": "ConfigError: defense cannot run under protocol 'ckks'"}]
    paths = write_reports(recs, tmp_path)
    text = (tmp_path / "eval.json").read_text()
    assert "NaN" not in text and json.loads(text)["records"][0]["tpr"] is None
    md = (tmp_path / "eval.md").read_text()
    assert "attack success rate" in md and "true-positive" not in md  # no TPR value anywhere
    assert "could not run" in md and "ckks" in md
    assert "heatmap_asr_personalized" in paths and "heatmap_tpr" not in paths
    assert all(p.exists() for p in paths.values())
    assert not math.isnan(json.loads(text)["records"][1]["asr_personalized"])
