"""The instrumented runs of ``benchmarks/robustness_decline.py`` measure the library's runs, not altered ones."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import securefml.experiment as experiment
from securefml.attacks import make_attack
from securefml.attacks.base import AttackContext
from securefml.experiment import RunConfig, run_experiment

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def decline() -> ModuleType:
    """``benchmarks/robustness_decline.py`` loaded by path (it imports its sibling ``peers``)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("robustness_decline", BENCH / "robustness_decline.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_windowed_attack_flips_inside_its_rounds_only(decline: ModuleType) -> None:
    attack = decline.WindowedAttack(make_attack("signflip:scale=10"), 3, 5)
    own = torch.randn(2, 7, generator=torch.Generator().manual_seed(0))
    for rnd in range(8):
        out = attack.poison_updates(own, AttackContext(round=rnd, n_clients=10, n_malicious=2))
        assert torch.equal(out, -10 * own if 3 <= rnd < 5 else own), rnd


def test_dead_units_counts_units_zero_on_every_input(decline: ModuleType) -> None:
    # layer 1: unit 0 always positive, unit 1 never (bias -100), unit 2 positive on some inputs
    w1 = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    b1 = torch.tensor([1.0, -100.0, 0.0])
    # layer 2 (on layer 1's output): unit 0 dead (negative weights, zero bias), unit 1 alive
    w2 = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 0.0, 0.0]])
    b2 = torch.zeros(2)
    params = {"layers.0.weight": w1, "layers.0.bias": b1, "layers.2.weight": w2, "layers.2.bias": b2,
              "layers.4.weight": torch.ones(1, 2), "layers.4.bias": torch.zeros(1)}
    x = torch.tensor([[1.0, 0.0], [-1.0, 2.0]])
    assert decline.dead_units(params, x) == pytest.approx([1 / 3, 1 / 2])


def test_rounded_rounds_every_float_and_keeps_the_rest(decline: ModuleType) -> None:
    value = {"a": 0.123456789, "b": [1, 2.0000004, {"c": "x", "d": None, "e": True}]}
    assert decline.rounded(value) == {"a": 0.123457, "b": [1, 2.0, {"c": "x", "d": None, "e": True}]}


def test_instrumented_server_reproduces_the_plain_run(decline: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same accuracy and the same exclusions per round as ``run_experiment`` with the library's server."""
    torch.set_num_threads(1)
    cfg = RunConfig(dataset="digits-fewshot", algorithm="fomaml", rounds=4, clients_per_round=10, seed=3,
                    defense="recommended", attack="signflip:scale=10", malicious=0.2, last_k=2)
    plain = run_experiment(cfg)
    args = argparse.Namespace(algorithm="fomaml", rounds=4, malicious=0.2, eval_every=2)
    monkeypatch.setattr(experiment, "Server", decline.DiagServer)
    rec = decline.run("attack", "recommended", "signflip:scale=10", 3, args)
    assert len(rec["rounds"]) == 4
    assert [r["attackers_excluded"] + r["honest_excluded"] for r in rec["rounds"]] == \
        [len(h["flagged"]) for h in plain.history]
    assert [r["aggregate_norm"] for r in rec["rounds"]] == [h["update_norm"] for h in plain.history]
    assert rec["rounds"][-1]["accuracy"] == pytest.approx(plain.metrics["personalized_last_k"]["values"][-1])
