"""The attack x defense evaluation harness: real tiny runs, reports, resumability, users' own classes."""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from securefml.attacks import Attack, AttackContext
from securefml.defenses import AggregationResult, CenteredClipping, Defense
from securefml.errors import ConfigError, DataError
from securefml.evaluation import (
    METRICS,
    Matrix,
    add_eval_parser,
    cell_key,
    evaluate,
    load_records,
    run_eval,
)
from securefml.experiment import RunConfig

TINY: dict[str, Any] = dict(
    dataset="digits-skew",
    algorithm="fedavg",
    rounds=2,
    clients_per_round=6,
    inner_steps=2,
    server_opt="adam",
    server_lr=0.02,
    dataset_options={"n_clients": 6, "n_heldout": 2, "classes_per_client": 2},
)


class Huge(Attack):
    """Send a large constant vector; every call is logged on the class (instances are deep-copied)."""

    name = "huge"
    calls: list[tuple[int, int]] = []

    def __init__(self, value: float = 1e3) -> None:
        self.value = value

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        Huge.calls.append((context.round, own.shape[0]))
        return torch.full_like(own, self.value)


class FlagAll(Defense):
    """A user's rule: the mean, flagging every client (visible in the detection rates)."""

    name = "flagall"

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        w = weights / weights.sum()
        return AggregationResult((w[:, None] * updates).sum(0), client_ids, flagged=tuple(client_ids))


def test_tiny_matrix_writes_every_report_and_they_parse(tmp_path) -> None:
    ev = evaluate(["none", "signflip:scale=5", "backdoor"], ["mean", "median"], out=tmp_path, **TINY)
    assert len(ev.records) == 6 and ev.reused == 0
    assert all(not r.get("error") for r in ev.records)
    for r in ev.records:
        assert r["metric"] == "accuracy" and 0.0 <= r["personalized"] <= 1.0 and 0.0 <= r["global"] <= 1.0
        assert r["bytes_uploaded"] > 0 and r["rounds"] == 2 and r["wall_seconds"] > 0
        assert r["malicious"] == (0.0 if r["attack"] == "none" else 0.2)
        if r["attack"] == "backdoor":
            assert 0.0 <= r["asr_personalized"] <= 1.0 and 0.0 <= r["asr_global"] <= 1.0
            assert len(r["asr_personalized_per_client"]) == 2
        else:
            assert r["asr_personalized"] is None
    data = json.loads((tmp_path / "eval.json").read_text())
    assert [r["key"] for r in data["records"]] == [r["key"] for r in ev.records]
    with open(tmp_path / "eval.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and {r["defense"] for r in rows} == {"mean", "median"}
    assert float(rows[0]["global"]) == pytest.approx(ev.records[0]["global"])
    md = (tmp_path / "eval.md").read_text()
    assert "| mean | median |" in md and "backdoor attack success rate" in md
    for metric in ("global", "personalized", "asr_personalized", "bytes_uploaded"):
        png = tmp_path / f"heatmap_{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(ev.paths) >= {"json", "csv", "md", "heatmap_global"}
    assert ev.value("signflip:scale=5", "mean") == ev.records[2]["global"]


def test_rerun_reuses_recorded_cells_and_runs_only_new_ones(tmp_path) -> None:
    first = evaluate(["none", "ipm"], ["mean"], out=tmp_path, plots=False, **TINY)
    again = evaluate(["none", "ipm"], ["mean"], out=tmp_path, plots=False, **TINY)
    assert again.reused == 2 and again.records == first.records
    grown = evaluate(["none", "ipm"], ["mean", "median"], out=tmp_path, plots=False, **TINY)
    assert grown.reused == 2 and len(grown.records) == 4
    changed = evaluate(["none", "ipm"], ["mean"], out=tmp_path, plots=False, **{**TINY, "rounds": 1})
    assert changed.reused == 0  # any knob changes the key
    assert len(load_records(tmp_path)) == 2 and len(load_records(tmp_path, archived=True)) == 6
    back = evaluate(["none", "ipm"], ["mean", "median"], out=tmp_path, plots=False, **TINY)
    assert back.reused == 4 and back.records == grown.records  # earlier matrices stay reusable


def test_interrupted_evaluation_resumes_from_the_saved_cells(tmp_path) -> None:
    class Stop(Exception):
        pass

    def stop_after_first(cell, record, reused) -> None:
        raise Stop

    with pytest.raises(Stop):
        evaluate(["none", "signflip"], ["mean"], out=tmp_path, on_cell=stop_after_first, **TINY)
    saved = load_records(tmp_path)
    assert len(saved) == 1 and saved[0]["attack"] == "none"
    resumed = evaluate(["none", "signflip"], ["mean"], out=tmp_path, plots=False, **TINY)
    assert resumed.reused == 1 and resumed.records[0] == saved[0] and len(resumed.records) == 2


def test_cell_key_is_stable_and_covers_every_knob() -> None:
    a = RunConfig(**TINY)
    assert cell_key(a) == cell_key(RunConfig(**TINY))
    assert len(cell_key(a)) == 16
    assert cell_key(a) != cell_key(RunConfig(**{**TINY, "server_lr": 0.03}))
    options = {**TINY["dataset_options"], "n_heldout": 3}
    assert cell_key(a) != cell_key(RunConfig(**{**TINY, "dataset_options": options}))


def test_users_own_attack_and_defense_classes_run_in_the_matrix() -> None:
    clip = CenteredClipping(tau=1.0)
    Huge.calls.clear()
    ev = evaluate(["none", Huge()], ["mean", FlagAll(), clip], seeds=(0, 1), **TINY)
    labels = {(r["attack"], r["defense"]) for r in ev.records}
    assert ("Huge(value=1000.0)", "FlagAll()") in labels and ("none", repr(clip)) in labels
    assert len(ev.records) == 12 and not any(r.get("error") for r in ev.records)
    # the user's attack ran in every round of its 6 cells, for the 20% malicious clients (1 of 6)
    assert sorted(Huge.calls) == sorted([(0, 1), (1, 1)] * 6)
    # the user's defense decided: it flagged everyone, so both detection rates are 1
    flag_all = [r for r in ev.records if r["defense"] == "FlagAll()" and r["attack"] != "none"]
    assert all(r["tpr"] == 1.0 and r["fpr"] == 1.0 for r in flag_all)
    mean = [r for r in ev.records if r["defense"] == "mean" and r["attack"] != "none"]
    assert all(r["tpr"] == 0.0 and r["fpr"] == 0.0 for r in mean)
    # the user's instance is deep-copied for every cell: its state is untouched
    assert clip.state_dict()["center"] is None


def test_matrix_validates_specs_before_running() -> None:
    with pytest.raises(ConfigError, match="ipm"):
        Matrix(("no-such-attack",), ("mean",))
    with pytest.raises(ConfigError, match="median"):
        Matrix(("none",), ("no-such-defense",))
    with pytest.raises(ConfigError, match="at least one"):
        Matrix((), ("mean",))
    with pytest.raises(ConfigError, match="malicious"):
        Matrix(("ipm",), ("mean",), malicious=(1.5,))
    with pytest.raises(ConfigError):
        Matrix((42,), ("mean",))  # type: ignore[arg-type]


def test_clean_baseline_runs_once_and_attacks_need_attackers() -> None:
    m = Matrix(("none", "ipm"), ("mean",), malicious=(0.0, 0.2, 0.4), seeds=(0,), base=RunConfig(**TINY))
    coords = [(c.attack_label, c.malicious) for c in m.cells()]
    assert coords == [("none", 0.0), ("ipm", 0.2), ("ipm", 0.4)]
    assert len({c.key for c in m.cells()}) == 3


def test_a_defense_the_protocol_cannot_run_becomes_an_error_record(tmp_path) -> None:
    ev = evaluate(["none"], ["mean", "median"], protocols=("ckks",), out=tmp_path, plots=False, **TINY)
    by_defense = {r["defense"]: r for r in ev.records}
    assert not by_defense["mean"].get("error")
    assert "median" in by_defense["median"]["error"].lower() or "ckks" in by_defense["median"]["error"].lower()
    assert "could not run" in (tmp_path / "eval.md").read_text()
    # failed cells are retried on the next run, never reused
    again = evaluate(["none"], ["mean", "median"], protocols=("ckks",), out=tmp_path, plots=False, **TINY)
    assert again.reused == 1


def test_load_records_rejects_a_foreign_file(tmp_path) -> None:
    (tmp_path / "eval.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="records"):
        load_records(tmp_path)
    (tmp_path / "eval.json").write_text("{not json")
    with pytest.raises(DataError):
        load_records(tmp_path)
    assert load_records(tmp_path / "missing") == []


def test_cli_parser_and_runner(tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser(prog="securefml")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    args = parser.parse_args([
        "eval", "--quick", "--attacks", "none", "gaussian:std=0.5", "--defenses", "mean", "bucketing:size=2>>median",
        "--rounds", "1", "--clients-per-round", "6", "--dataset-option", "n_clients=6",
        "--dataset-option", "n_heldout=2", "--out", str(tmp_path), "--no-progress", "--no-plots",
    ])
    assert args.handler is run_eval
    assert run_eval(args) == 0
    out = capsys.readouterr().out
    assert "bucketing:size=2>>median" in out and "4 cells (0 reused, 0 failed)" in out
    records = load_records(tmp_path)
    assert {r["attack"] for r in records} == {"none", "gaussian:std=0.5"}
    assert records[0]["config"]["dataset_options"] == {"n_clients": 6, "n_heldout": 2}
    assert set(METRICS) <= set(records[0])
