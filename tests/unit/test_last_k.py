"""Last-k accuracy: the mean of the personalized score after each of the last k rounds."""

from __future__ import annotations

import pytest

from securefml.errors import ConfigError
from securefml.evaluation import cell_metrics, resistance_rows
from securefml.experiment import RunConfig, run_experiment

_BASE = dict(dataset="digits-skew", algorithm="fedavg", rounds=5, clients_per_round=6, seed=3,
             dataset_options={"n_clients": 12, "n_heldout": 3})


def test_last_k_scores_the_last_rounds_without_changing_the_run() -> None:
    one = run_experiment(RunConfig(**_BASE))
    three = run_experiment(RunConfig(**_BASE, last_k=3))
    lk = three.metrics["personalized_last_k"]
    assert lk["k"] == 3 and lk["rounds"] == [2, 3, 4] and len(lk["values"]) == 3
    # the final value is the reported final accuracy, and the mean is the mean of the values
    assert lk["values"][-1] == three.metrics["personalized"]["accuracy"]
    assert lk["mean"] == pytest.approx(sum(lk["values"]) / 3)
    # scoring in between does not perturb training: same trajectory, same final model
    assert [h["update_norm"] for h in one.history] == [h["update_norm"] for h in three.history]
    assert one.metrics["personalized"]["accuracy"] == three.metrics["personalized"]["accuracy"]
    # k = 1 (the default) is the final evaluation alone
    assert one.metrics["personalized_last_k"]["values"] == [one.metrics["personalized"]["accuracy"]]
    # the evaluation record carries it beside the final value
    rec = cell_metrics(three)
    assert rec["personalized_last_k"] == lk["mean"] and rec["last_k"] == 3
    assert rec["personalized"] == lk["values"][-1]


def test_last_k_matches_independent_shorter_runs() -> None:
    """Each in-between value is the final score of a run stopped at that round (same seed)."""
    three = run_experiment(RunConfig(**_BASE, last_k=2))
    shorter = run_experiment(RunConfig(**{**_BASE, "rounds": 4}))
    # a run stopped at round 4 sees the same cohorts for rounds 0..3: its final model is round 3's
    assert three.metrics["personalized_last_k"]["values"][0] == pytest.approx(
        shorter.metrics["personalized"]["accuracy"], abs=1e-6)


def test_last_k_larger_than_rounds_is_capped_and_nonpositive_refused() -> None:
    res = run_experiment(RunConfig(**{**_BASE, "rounds": 2}, last_k=9))
    assert res.metrics["personalized_last_k"]["k"] == 2
    with pytest.raises(ConfigError, match="last_k"):
        RunConfig(last_k=0)


def test_resistance_reads_the_last_k_mean() -> None:
    recs = [
        {"attack": a, "defense": "mean", "protocol": "plaintext", "malicious": 0.2, "seed": s,
         "personalized": 0.0, "personalized_last_k": v}
        for s, (a, v) in enumerate([("none", 0.9), ("alie", 0.7)])
    ] + [{"attack": "none", "defense": "mean", "protocol": "plaintext", "malicious": 0.2, "seed": 1,
          "personalized": 0.0, "personalized_last_k": 0.8},
         {"attack": "alie", "defense": "mean", "protocol": "plaintext", "malicious": 0.2, "seed": 0,
          "personalized": 0.0, "personalized_last_k": 0.6}]
    (row,) = resistance_rows(recs, "personalized_last_k")
    assert row.worst is not None and row.worst[0] == pytest.approx(0.65)
