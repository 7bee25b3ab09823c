"""The examples in ``examples/`` run and do what their docstrings say."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_secagg_halves_over_bytes_recover_the_survivors_mean() -> None:
    out = load("secagg_halves").main()
    assert out["survivors"] == 4 and out["max_abs_error"] <= out["error_bound"]
    assert out["bytes_on_wire"] > 0


def test_ckks_parties_mean_and_gram_paths() -> None:
    out = load("ckks_parties").main()
    assert out["mean_max_abs_error"] < 1e-5 and out["robust_max_abs_error"] < 1e-5
    assert out["byzantine_weight"] == 0.0


def test_protocol_and_defense_in_a_plain_pytorch_loop() -> None:
    out = load("own_training_loop").main(rounds=3)
    assert out["final_test_mse"] < 0.5 * out["initial_test_mse"]


def test_custom_attack_example_still_runs() -> None:
    assert hasattr(load("custom_attack"), "OrthogonalDrift")
