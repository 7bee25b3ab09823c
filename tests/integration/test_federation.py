import json

import pytest
import torch

from securefml.cli import main
from securefml.client import Client
from securefml.data import make_digits_fewshot, make_sine
from securefml.defenses import Mean
from securefml.errors import ConfigError, DataError
from securefml.experiment import RunConfig, run_experiment
from securefml.meta import FOMAML, MetaConfig
from securefml.models import make_model
from securefml.protocols import Plaintext
from securefml.server import Server

TINY = {"n_train": 6, "n_heldout": 3, "k_shot": 3, "query": 3}


@pytest.mark.parametrize("algorithm", ["fedavg", "maml", "fomaml", "metasgd", "reptile"])
@pytest.mark.parametrize("dataset", ["digits-fewshot", "sine"])
def test_three_real_rounds_each_algorithm(algorithm, dataset):
    opts = TINY if dataset == "digits-fewshot" else {"n_train": 6, "n_heldout": 3, "k_shot": 5}
    cfg = RunConfig(dataset=dataset, algorithm=algorithm, rounds=3, clients_per_round=3, dataset_options=opts)
    res = run_experiment(cfg)
    metric = "accuracy" if dataset == "digits-fewshot" else "mse"
    pers = res.metrics["personalized"]
    assert len(pers["per_client"]) == 3 and pers[metric] >= 0
    assert len(res.history) == 3 and all(len(h["accepted"]) == 3 for h in res.history)
    assert res.metrics["bytes_uploaded"] > 0


def test_same_seed_same_result():
    cfg = RunConfig(dataset="digits-fewshot", algorithm="fomaml", rounds=2, clients_per_round=3, dataset_options=TINY)
    a, b = run_experiment(cfg), run_experiment(cfg)
    assert a.metrics["personalized"]["per_client"] == b.metrics["personalized"]["per_client"]


def test_signflip_attack_moves_mean_and_is_recorded():
    cfg = RunConfig(dataset="digits-fewshot", algorithm="fomaml", rounds=2, clients_per_round=6,
                    dataset_options=TINY, attack="signflip", malicious=0.34)
    res = run_experiment(cfg)
    assert len(res.metrics["detection"]["malicious_ids"]) == 2
    assert all(len(h["malicious"]) == 2 for h in res.history)


def test_invalid_client_update_dropped_round_continues():
    data = make_sine(n_train=4, n_heldout=1, seed=0)
    learner = FOMAML(make_model(data), MetaConfig(inner_steps=1))
    server = Server(learner, Plaintext(), Mean())
    bad = data.train[1].with_data(support_y=torch.full_like(data.train[1].support_y, float("nan")))
    cohort = [Client(data.train[0]), Client(bad), Client(data.train[2])]
    before = server.global_vector.clone()
    rec = server.run_round(0, cohort)
    assert rec.accepted == [0, 2]
    assert "InvalidUpdateError" in rec.rejected[1] and "client 1" in rec.rejected[1]
    assert not torch.equal(before, server.global_vector)
    assert torch.isfinite(server.global_vector).all()


def test_empty_support_is_a_data_error():
    data = make_sine(n_train=2, n_heldout=1)
    with pytest.raises(DataError, match="client 0 has an empty support"):
        data.train[0].with_data(support_x=torch.zeros(0, 1), support_y=torch.zeros(0, 1))


def test_bad_run_config():
    with pytest.raises(ConfigError, match="rounds must be positive"):
        RunConfig(rounds=0)
    with pytest.raises(ConfigError, match="choose one of"):
        RunConfig(algorithm="protonet")
    with pytest.raises(ConfigError, match="malicious"):
        RunConfig(attack="signflip")


def test_detection_metrics_in_results():
    cfg = RunConfig(dataset="digits-fewshot", algorithm="fomaml", rounds=2, clients_per_round=6,
                    dataset_options=TINY, attack="signflip:scale=5", malicious=0.34, defense="krum:f=1")
    det = run_experiment(cfg).metrics["detection"]
    assert len(det["per_round"]) == 2 and {"tp", "fp", "fn", "tn"} <= set(det["overall"])
    assert det["tpr"] == det["overall"]["tpr"] and 0 <= det["tpr"] <= 1


def test_cli_run_writes_result(tmp_path, capsys):
    rc = main(["run", "--dataset", "digits-fewshot", "--algorithm", "reptile", "--rounds", "2",
               "--clients-per-round", "3", "--out", str(tmp_path), "--no-progress",
               "--dataset-option", "n_train=6", "--dataset-option", "n_heldout=2", "--select", "topk:0.5"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "personalized accuracy" in out
    data = json.loads((tmp_path / "result.json").read_text())
    assert set(data) == {"config", "metrics", "history"}
    assert {"personalized", "global", "bytes_uploaded", "rounds", "wall_seconds"} <= set(data["metrics"])
    assert data["metrics"]["personalized"]["metric"] == "accuracy"


def test_cli_unknown_dataset_is_clear(capsys):
    assert main(["run", "--dataset", "nope", "--no-progress"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err


def test_fedavg_ft_is_fine_tuned_fedavg():
    data = make_digits_fewshot(**TINY)
    cfg = RunConfig(dataset="digits-fewshot", algorithm="fedavg", rounds=2, clients_per_round=3)
    res = run_experiment(cfg, dataset=data)
    assert res.metrics["global"]["steps"] == 0 and res.metrics["personalized"]["steps"] > 0


def test_user_level_dp_is_wired_into_runs_and_reported(tmp_path, capsys):
    rc = main(["run", "--dataset", "digits-fewshot", "--rounds", "2", "--clients-per-round", "3", "--no-progress",
               "--dataset-option", "n_train=6", "--dataset-option", "n_heldout=2", "--out", str(tmp_path),
               "--dp", "user", "--target-epsilon", "8", "--delta", "1e-5"])
    assert rc == 0
    assert "privacy epsilon" in capsys.readouterr().out
    priv = json.loads((tmp_path / "result.json").read_text())["metrics"]["privacy"]
    assert priv["mode"] == "user" and priv["delta"] == 1e-5
    assert 0 < priv["epsilon_max"] <= 8.0 + 1e-6


def test_record_level_dp_reports_per_client_epsilon():
    cfg = RunConfig(dataset="digits-fewshot", algorithm="fomaml", rounds=2, clients_per_round=3, dataset_options=TINY,
                    privacy={"mode": "record", "noise_multiplier": 1.0, "delta": 1e-3})
    priv = run_experiment(cfg).metrics["privacy"]
    assert priv["mode"] == "record" and len(priv["epsilon_per_client"]) >= 3
    assert priv["epsilon_max"] == max(priv["epsilon_per_client"].values())


def test_bad_privacy_config_is_a_config_error():
    with pytest.raises(ConfigError):
        RunConfig(privacy={"mode": "user", "target_epsilon": -1.0})


def test_aborted_round_keeps_model_and_is_recorded():
    from securefml.errors import ProtocolAbort
    from securefml.protocols.plaintext_halves import PlaintextServerHalf

    class AbortingServer(PlaintextServerHalf):
        def close_stage(self) -> None:
            raise ProtocolAbort("too few survivors")

    class AlwaysAbort(Plaintext):
        """The plaintext halves with a server half that aborts when its stage closes."""

        name = "abort"

        def server_half(self, round_idx, layout, cohort, *, setup):
            return AbortingServer(round_idx, layout, cohort)

    data = make_sine(n_train=3, n_heldout=1, seed=0)
    server = Server(FOMAML(make_model(data), MetaConfig(inner_steps=1)), AlwaysAbort(), Mean())
    before = server.global_vector.clone()
    rec = server.run_round(0, [Client(t) for t in data.train])
    assert rec.accepted == [] and "too few survivors" in rec.extras["aborted"]
    assert torch.equal(before, server.global_vector)


def test_error_feedback_keeps_what_topk_withholds():
    from securefml.selection import TopKImportance

    data = make_digits_fewshot(**TINY)
    learner = FOMAML(make_model(data), MetaConfig(inner_steps=1, inner_lr=0.1))
    server = Server(learner, Plaintext(), Mean(), selector=TopKImportance(0.1, error_feedback=True))
    client = Client(data.train[0])
    expected = client.local_update(learner, server.params, server.layout).update
    rec = server.run_round(0, [client, Client(data.train[1])])
    sent_layers = [n for n, c in rec.uploaded_layers.items() if c >= 1]
    assert client.residual is not None and len(sent_layers) < len(server.layout.layer_names)
    withheld = [n for n in server.layout.layer_names if n not in sent_layers]
    # the residual is exactly the withheld part of the update; the sent part left no residue
    for name, sl in server.layout.slices().items():
        part = client.residual[sl]
        assert torch.allclose(part, expected[sl], atol=1e-6) or bool((part == 0).all())
        if name in withheld:
            assert torch.allclose(part, expected[sl], atol=1e-6)
    assert bool((client.residual != 0).any())
    before = client.residual.clone()
    server.run_round(1, [client])
    assert not torch.equal(before, client.residual)  # the residual was added to the next upload


def test_cli_hidden_sizes_reach_the_model(tmp_path):
    rc = main(["run", "--dataset", "digits-fewshot", "--rounds", "1", "--clients-per-round", "2", "--no-progress",
               "--dataset-option", "n_train=4", "--dataset-option", "n_heldout=1", "--hidden", "8,8,8",
               "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "result.json").read_text())
    assert data["config"]["hidden"] == [8, 8, 8]
    assert set(data["history"][0]["uploaded_layers"]) == {"layers.0", "layers.2", "layers.4", "layers.6"}
