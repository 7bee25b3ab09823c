"""Resistance table: clean, worst case over attacks (per seed), drop, sorted by worst case."""

from __future__ import annotations

import pytest

from securefml.evaluation import resistance_markdown, resistance_rows, t_interval


def rec(attack, defense, seed, acc, malicious=0.2):
    return {"attack": attack, "defense": defense, "seed": seed, "personalized": acc, "protocol": "plaintext",
            "malicious": 0.0 if attack == "none" else malicious, "metric": "accuracy"}


def test_worst_case_is_taken_per_seed_and_rows_sort_by_it():
    records = [
        rec("none", "mean", 0, 0.90), rec("none", "mean", 1, 0.92),
        rec("signflip", "mean", 0, 0.30), rec("signflip", "mean", 1, 0.50),
        rec("alie", "mean", 0, 0.80), rec("alie", "mean", 1, 0.40),
        rec("none", "robust", 0, 0.85), rec("none", "robust", 1, 0.87),
        rec("signflip", "robust", 0, 0.80), rec("signflip", "robust", 1, 0.82),
        rec("alie", "robust", 0, 0.84), rec("alie", "robust", 1, 0.80),
    ]
    rows = resistance_rows(records)
    assert [r.defense for r in rows] == ["robust", "mean"]
    mean_row = rows[1]
    assert mean_row.worst[0] == pytest.approx((0.30 + 0.40) / 2)  # per-seed minima: 0.30, 0.40
    assert mean_row.drop[0] == pytest.approx(((0.90 - 0.30) + (0.92 - 0.40)) / 2)
    assert mean_row.worst_attack == "signflip"
    assert rows[0].clean[0] == pytest.approx(0.86)
    table = resistance_markdown(records)
    assert table.index("robust") < table.index("| mean")


def test_t_interval_single_value_has_no_width():
    assert t_interval([0.5]) == (0.5, None)
    m, h = t_interval([1.0, 2.0])
    assert m == 1.5 and h == pytest.approx(12.706 * 0.7071067811865476 / 2**0.5)
