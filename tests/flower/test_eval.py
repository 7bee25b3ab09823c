"""``securefml eval --engine flower``: the attack x defense matrix through Flower's simulation runtime.

Every cell is a ``run_simulation`` run (Ray starts once per cell), so the test is ``slow``; it runs
the CLI end to end on a tiny 2 x 2 matrix and compares each cell with the in-process matrix of
the same seed (same cohorts, same attack, so the same accuracy up to float rounding).
"""

from __future__ import annotations

import pytest  # noqa: I001

pytest.importorskip("flwr", reason="Flower is the optional extra: pip install 'securefml[flower]'")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from securefml.cli import main  # noqa: E402

ARGS = ["--attacks", "none", "signflip", "--defenses", "mean", "median", "--malicious", "0.25", "--rounds", "1",
        "--clients-per-round", "4", "--dataset", "digits-fewshot", "--dataset-option", "n_train=4",
        "--dataset-option", "n_heldout=2", "--no-plots", "--no-progress"]


@pytest.mark.slow
def test_eval_engine_flower_writes_the_in_process_matrix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray", reason="run_simulation needs Flower's simulation runtime: "
                                      "pip install 'securefml[flower]'")
    assert main(["eval", *ARGS, "--engine", "flower", "--out", str(tmp_path / "flower")]) == 0
    printed = capsys.readouterr().out
    assert "4 cells (0 reused, 0 failed)" in printed and "| signflip | plaintext | f=25% |" in printed.replace("\\", "")
    assert main(["eval", *ARGS, "--out", str(tmp_path / "inprocess")]) == 0
    flower = {r["key"]: r for r in json.loads((tmp_path / "flower" / "eval.json").read_text())["records"]}
    inproc = {r["key"]: r for r in json.loads((tmp_path / "inprocess" / "eval.json").read_text())["records"]}
    assert len(flower) == len(inproc) == 4 and not set(flower) & set(inproc)  # the engine is part of a cell's key
    by_cell = {(r["attack"], r["defense"]): r for r in inproc.values()}
    for rec in flower.values():
        assert rec["config"]["engine"] == "flower" and not rec.get("error")
        ref = by_cell[(rec["attack"], rec["defense"])]
        for metric in ("personalized", "global"):
            assert abs(rec[metric] - ref[metric]) <= 0.01 + 1e-6, (rec["attack"], rec["defense"], metric)
    assert main(["eval", *ARGS, "--engine", "flower", "--out", str(tmp_path / "flower")]) == 0  # resumes: no run
    assert "4 cells (4 reused" in capsys.readouterr().out
