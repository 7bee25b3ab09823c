"""The README's performance tables are generated from benchmark JSON, never typed by hand."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]



MACHINE = {"utc": "2026-12-01T22:00:00+00:00", "cpus": 2, "load_avg": [3.5, 3, 3], "torch": "2.13.0",
           "torch_threads": 2}


def test_regions_are_rewritten_from_json_and_nothing_else_changes(tmp_path, readme_tables):
    mod = readme_tables
    data = {
        "setup": {"n": 4, "d": 1000, "f": 1, "reps": 3}, "byzfl": "0.0.11", "machine_before": MACHINE,
        "machine_after": MACHINE, "floor": {"sum_float32_s": 0.5},
        "rules": {"median": {"seconds": 0.25, "over_floor": 0.5, "byzfl_s": {"byzfl_numpy": 1.0, "byzfl_torch": 2.0},
                             "target": "<= 1.0x fastest ByzFL path", "met": True},
                  "cclip": {"seconds": 0.75, "over_floor": 1.5, "anchor": "not measured"}},
    }
    (tmp_path / "defenses.json").write_text(__import__("json").dumps(data))
    text = "intro\n<!-- bench:defenses -->\nold 123\n<!-- /bench:defenses -->\n<!-- bench:other -->\nkeep\n" \
           "<!-- /bench:other -->\noutro\n"
    new, updated, skipped = mod.regenerate(text, tmp_path)
    assert updated == ["defenses"] and skipped == ["other"]
    assert "old 123" not in new and new.startswith("intro\n") and new.endswith("keep\n<!-- /bench:other -->\noutro\n")
    assert "| median | 0.250 | 0.50x | 1.000 | 2.000 | 0.25x | <= 1.0x fastest ByzFL path | yes |" in new
    assert "| cclip | 0.750 | 1.50x | - | - | not measured |" in new
    again, updated, _ = mod.regenerate(new, tmp_path)
    assert again == new and updated == []


def test_readme_tables_match_the_committed_benchmark_json(readme_tables):
    mod = readme_tables
    readme = (ROOT / "README.md").read_text()
    _, updated, _ = mod.regenerate(readme, ROOT / "benchmarks" / "json")
    assert updated == [], f"README regions {updated} differ from benchmarks/json: run benchmarks/readme_tables.py"
