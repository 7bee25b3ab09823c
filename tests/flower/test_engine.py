"""The Flower engine trains the same model as the in-process engine for the same seed.

Fast tests drive the engine's strategy and ClientApp through Flower's own round loop
(``Strategy.start``) over ``LocalGrid``; the ``slow`` ones go through
``flwr.simulation.run_simulation`` (Ray), as ``securefml run --engine flower`` does.
"""

from __future__ import annotations

import pytest  # noqa: I001

pytest.importorskip("flwr", reason="Flower is the optional extra: pip install 'securefml[flower]'")

import dataclasses  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from securefml.errors import ConfigError  # noqa: E402
from securefml.experiment import RunConfig, run_experiment  # noqa: E402
from securefml.flower import LocalGrid, forget_halves  # noqa: E402
from securefml.flower.engine import prepare, run  # noqa: E402
from securefml.rounds import Transport  # noqa: E402
from tests.flower.halves_adapters import SecAggHalves  # noqa: E402

N_TRAIN, N_HELDOUT = 12, 4
ONE_POINT = 0.01 + 1e-6  # accuracy within one point, allowing for float32 rounding of that point


class DropEveryRound(Transport):
    """One honest client's reply at ``stage`` never arrives, in every round (it is in every cohort)."""

    def __init__(self, victim: int, stage: str) -> None:
        self.victim, self.stage = victim, stage

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        return None if sender == self.victim and str(getattr(stage, "value", stage)) == self.stage else data


def _config(protocol: str, defense: str) -> RunConfig:
    return RunConfig(dataset="digits-fewshot", dataset_options={"n_train": N_TRAIN, "n_heldout": N_HELDOUT},
                     rounds=3, clients_per_round=N_TRAIN, protocol=protocol, defense=defense, attack="signflip",
                     malicious=0.2, engine="flower")


def _honest_victim(config: RunConfig) -> int:
    gen = torch.Generator().manual_seed(config.seed)
    n_mal = int(round(config.malicious * N_TRAIN))
    mal = set(torch.randperm(N_TRAIN, generator=gen)[:n_mal].tolist())
    return min(c for c in range(N_TRAIN) if c not in mal)


def _on_local_grid(config: RunConfig, **kwargs):  # type: ignore[no-untyped-def]
    forget_halves()
    prepared = prepare(config, **kwargs)
    grid = LocalGrid({100 + p: prepared.client_app for p in range(prepared.num_supernodes)},
                     {100 + p: cfg for p, cfg in prepared.node_config.items()})
    started = time.perf_counter()
    prepared.strategy.start(grid, prepared.initial_as_arrays(), num_rounds=config.rounds)
    return prepared.finish(time.perf_counter() - started)


def _assert_same_run(flower, inproc, stage: str, victim: int) -> None:  # type: ignore[no-untyped-def]
    assert flower.config["engine"] == "flower"
    for rec_f, rec_i in zip(flower.history, inproc.history):
        assert rec_f["cohort"] == rec_i["cohort"]
        assert rec_f["accepted"] == rec_i["accepted"] and victim not in rec_f["accepted"]
        assert rec_f["dropped"] == {victim: stage}
    for key in ("personalized", "global"):
        assert abs(flower.metrics[key]["accuracy"] - inproc.metrics[key]["accuracy"]) <= ONE_POINT


def test_plaintext_median_with_attackers_and_a_dropout_matches_in_process() -> None:
    cfg = _config("plaintext", "median")
    victim = _honest_victim(cfg)
    flower = _on_local_grid(cfg, transport=DropEveryRound(victim, "update"))
    inproc = run_experiment(dataclasses.replace(cfg, engine="inprocess"), transport=DropEveryRound(victim, "update"))
    _assert_same_run(flower, inproc, "update", victim)


def test_bucketed_secagg_median_with_attackers_and_a_dropout_matches_in_process() -> None:
    cfg = _config("secagg:buckets=3", "median")
    victim = _honest_victim(cfg)
    flower = _on_local_grid(cfg, protocol=SecAggHalves(buckets=3), transport=DropEveryRound(victim, "masked"))
    inproc = run_experiment(dataclasses.replace(cfg, engine="inprocess"), transport=DropEveryRound(victim, "masked"))
    _assert_same_run(flower, inproc, "masked", victim)
    assert all(r["stages"] == ["advertise", "share", "complaints", "masked", "unmask"] for r in flower.history)


def test_unsupported_settings_fail_before_anything_starts() -> None:
    with pytest.raises(ConfigError, match="differential privacy"):
        prepare(dataclasses.replace(_config("plaintext", "mean"), privacy={"mode": "user", "noise_multiplier": 1.0}))
    with pytest.raises(ConfigError, match="clients_per_round"):
        prepare(dataclasses.replace(_config("plaintext", "mean"), clients_per_round=N_TRAIN + 1))
    with pytest.raises(ConfigError, match="engine"):
        RunConfig(engine="spark")
    with pytest.raises(ConfigError, match="flower"):
        run_experiment(_config("plaintext", "mean"))


@pytest.mark.slow
def test_ckks_multikrum_on_the_encrypted_gram_over_flower() -> None:
    """CKKS + MultiKrum on the Gram, the key holder on its own node: the in-process run's accuracy."""
    from securefml.flower.ckks_parties import PublicCKKS, forget_parties

    forget_parties()
    cfg = _config("ckks:preset=stats", "multikrum")
    victim = _honest_victim(cfg)
    prepared = prepare(cfg, transport=DropEveryRound(victim, "update"))
    assert isinstance(prepared.strategy.protocol, PublicCKKS)
    assert prepared.strategy.protocol.key_holder is None and not prepared.strategy.protocol.server.context.is_private()
    assert prepared.num_supernodes == N_TRAIN + N_HELDOUT + 1  # the key holder's own SuperNode
    forget_halves()
    grid = LocalGrid({100 + p: prepared.client_app for p in range(prepared.num_supernodes)},
                     {100 + p: cfg for p, cfg in prepared.node_config.items()})
    prepared.strategy.start(grid, prepared.initial_as_arrays(), num_rounds=cfg.rounds)
    flower = prepared.finish(1.0)
    inproc = run_experiment(dataclasses.replace(cfg, engine="inprocess"), transport=DropEveryRound(victim, "update"))
    _assert_same_run(flower, inproc, "update", victim)
    assert all(r["stages"] == ["announce", "update", "gram", "decrypt"] for r in flower.history)
    keys = prepared.owned_keys
    assert keys is not None
    prepared.close()  # the temporary key set, secret key included, is gone
    assert not Path(keys).exists()
    forget_parties()


@pytest.mark.slow
def test_run_simulation_secagg_buckets_ckks_and_plaintext_match_in_process() -> None:
    """Must show: >= 10 SuperNodes, 3 rounds, 20% malicious, one dropout per round, through run_simulation."""
    pytest.importorskip("ray", reason="run_simulation needs Flower's simulation runtime: "
                                      "pip install 'securefml[flower]'")
    from securefml.flower.ckks_parties import _KEY_HOLDERS

    for spec, proto, defense, stage in (("secagg:buckets=3", SecAggHalves(buckets=3), "median", "masked"),
                                        ("ckks:preset=stats", None, "multikrum", "update"),
                                        ("plaintext", None, "trimmedmean:f=2", "update")):
        cfg = _config(spec, defense)
        victim = _honest_victim(cfg)
        forget_halves()
        flower = run(cfg, protocol=proto, transport=DropEveryRound(victim, stage))
        inproc = run_experiment(dataclasses.replace(cfg, engine="inprocess"), transport=DropEveryRound(victim, stage))
        assert N_TRAIN + N_HELDOUT >= 10
        _assert_same_run(flower, inproc, stage, victim)
        assert not _KEY_HOLDERS  # the CKKS secret key was loaded in the key holder's actor, never in this process


def test_the_secagg_spec_drives_secaggplus_own_halves_and_matches_in_process() -> None:
    """``--protocol secagg:buckets=2`` builds ``SecAggPlus`` itself (its ``layers`` stage first), no adapter."""
    cfg = RunConfig(dataset="digits-fewshot", dataset_options={"n_train": 8, "n_heldout": 2}, rounds=2,
                    clients_per_round=8, protocol="secagg:buckets=2", defense="median", attack="signflip",
                    malicious=0.25, engine="flower")
    flower = _on_local_grid(cfg)
    inproc = run_experiment(dataclasses.replace(cfg, engine="inprocess"))
    assert all(r["stages"] == ["layers", "advertise", "share", "complaints", "masked", "unmask"]
               for r in flower.history)
    for rec_f, rec_i in zip(flower.history, inproc.history):
        assert rec_f["cohort"] == rec_i["cohort"] and rec_f["accepted"] == rec_i["accepted"]
    for key in ("personalized", "global"):
        assert abs(flower.metrics[key]["accuracy"] - inproc.metrics[key]["accuracy"]) <= ONE_POINT
