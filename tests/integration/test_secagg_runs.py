"""``securefml run --protocol secagg`` end to end: same personalized accuracy as plaintext."""

from __future__ import annotations

import pytest

from securefml.experiment import RunConfig, run_experiment

TINY = {"n_train": 6, "n_heldout": 3, "k_shot": 3, "query": 3}


@pytest.mark.parametrize("protocol", ["secagg", "secagg:buckets=2"])
def test_secagg_matches_plaintext_within_quantization(protocol: str) -> None:
    def run(proto: str):  # noqa: ANN202
        cfg = RunConfig(dataset="digits-fewshot", algorithm="fomaml", rounds=2, clients_per_round=4,
                        protocol=proto, dataset_options=TINY)
        return run_experiment(cfg)

    plain, secure = run("plaintext"), run(protocol)
    p, s = plain.metrics["personalized"], secure.metrics["personalized"]
    # the masked sum differs from the plain one by ~1e-8 per entry: accuracies agree
    assert abs(p["accuracy"] - s["accuracy"]) <= 1e-6
    assert all(len(h["accepted"]) == 4 for h in secure.history)
    assert secure.metrics["rejected"] == 0
