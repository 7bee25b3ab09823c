"""The DP mechanism a run uses is the one its accountant assumes (issue 11, finding 5).

One test per sub-finding, each written against the public API:

1. distributed DP only where the protocol reveals the sum alone, with the weighted mean;
2. cohorts sampled the way the accountant assumes (Poisson, secret seed);
3. equal client weights under user-level DP (the noise is sized for one client's share 1/m);
4. distributed DP under SecAgg is a discrete (Skellam) mechanism in the integer ring: nothing is
   clipped per coordinate or rounded after the noise is added;
5. DP noise from a secret CSPRNG by default; a reproducible generator only behind a flag.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from securefml.data import make_digits_fewshot, make_digits_skew
from securefml.defenses import Mean, make_defense
from securefml.errors import ConfigError
from securefml.experiment import RunConfig, run_experiment
from securefml.meta import LEARNERS, MetaConfig
from securefml.models import make_model
from securefml.privacy import PrivacyConfig, check_mechanism, secagg_clip_range, setup_privacy
from securefml.protocols import CKKS, Plaintext, SecAggPlus
from securefml.protocols.base import ClientUpdate, Transport
from securefml.protocols.wire import decode as wire_decode
from securefml.updates import LayerLayout

TINY = {"n_train": 8, "n_heldout": 2, "k_shot": 3, "query": 3}
DIST = dict(mode="user", noise_multiplier=1.0, delta=1e-3, placement="distributed")


def _learner(data):  # type: ignore[no-untyped-def]
    return LEARNERS.create("fomaml", model=make_model(data, hidden=(8,)), config=MetaConfig(inner_steps=1))


# -- 1. distributed DP only with a protocol that reveals the sum alone ------------------------------------
@pytest.mark.parametrize(
    ("protocol", "defense", "match"),
    [
        ("plaintext", "mean", r"plaintext.*every client's update"),
        ("secagg:buckets=2", "median", r"bucket sums"),
        ("secagg:buckets=2", "mean", r"bucket sums"),
        ("secagg", "median", r"weighted mean"),
        ("ckks:preset=add-only", "mean", r"SecAgg"),
    ],
)
def test_distributed_dp_is_refused_where_more_than_the_sum_is_revealed(protocol: str, defense: str,
                                                                        match: str) -> None:
    cfg = RunConfig(dataset="digits-fewshot", rounds=1, clients_per_round=4, dataset_options=TINY,
                    protocol=protocol, defense=defense, privacy=dict(DIST))
    with pytest.raises(ConfigError, match=match):
        run_experiment(cfg)


def test_check_mechanism_names_what_is_accepted() -> None:
    cfg = PrivacyConfig(**DIST)  # type: ignore[arg-type]
    check_mechanism(cfg, SecAggPlus(), Mean())  # the one accepted combination
    with pytest.raises(ConfigError, match="Krum"):
        check_mechanism(cfg, SecAggPlus(), make_defense("krum:f=1"))
    with pytest.raises(ConfigError, match="gram|Gram|norms"):
        check_mechanism(cfg, CKKS(preset="add-only"), make_defense("krum:f=1"))
    # user-level DP with a rule other than the mean: the sensitivity analysis does not hold either
    with pytest.raises(ConfigError, match="weighted mean"):
        check_mechanism(PrivacyConfig(mode="user", noise_multiplier=1.0, delta=1e-3), Plaintext(),
                        make_defense("median"))


# -- 2. cohort sampling matches the accountant --------------------------------------------------------------
def test_user_level_cohorts_are_poisson_samples_from_a_secret_seed() -> None:
    data = make_digits_fewshot(**TINY, seed=0)

    def setup(**extra: object):  # type: ignore[no-untyped-def]
        cfg = PrivacyConfig(mode="user", noise_multiplier=1.0, delta=1e-3, **extra)  # type: ignore[arg-type]
        return setup_privacy(cfg, _learner(data), n_train_clients=8, clients_per_round=4, rounds=400,
                             generator=torch.Generator().manual_seed(1))

    seeded = setup(insecure_seeded_noise=True)  # deterministic coins, so the statistics below are fixed
    cohorts = [seeded.sample_cohort(r, 8) for r in range(400)]
    assert cohorts is not None
    sizes = np.array([len(c) for c in cohorts])  # type: ignore[arg-type]
    assert len(set(sizes.tolist())) > 3  # a fixed-size draw has one size
    assert abs(sizes.mean() - 4) < 0.35 and abs(sizes.var() - 8 * 0.5 * 0.5) < 0.6  # Binomial(8, 1/2)
    freq = np.zeros(8)
    for c in cohorts:
        freq[c] += 1
    assert np.all(np.abs(freq / 400 - 0.5) < 0.1)
    # by default the coins are secret: the same run seed does not give the same cohorts
    a, b = setup(), setup()
    assert [a.sample_cohort(r, 8) for r in range(20)] != [b.sample_cohort(r, 8) for r in range(20)]


def test_runs_under_user_level_dp_use_the_poisson_sampler() -> None:
    cfg = RunConfig(dataset="digits-fewshot", rounds=6, clients_per_round=4, dataset_options=TINY,
                    privacy=dict(mode="user", noise_multiplier=1.0, delta=1e-3, insecure_seeded_noise=True))
    res = run_experiment(cfg)
    sizes = {len(r["cohort"]) for r in res.history}
    assert len(sizes) > 1
    assert res.metrics["privacy"]["cohort_sampling"].startswith("poisson")


# -- 3. equal weights under user-level DP -------------------------------------------------------------------
class _RecordingWeights(Transport):
    """Reads the weight each plaintext update message declares (the server-side view)."""

    def __init__(self) -> None:
        self.seen: dict[int, list[float]] = {}

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        env = wire_decode(data, sender=sender)
        self.seen.setdefault(env.round, []).append(struct.unpack(">d", env.field("weight"))[0])
        return data


def test_user_level_dp_gives_every_client_the_same_weight() -> None:
    data = make_digits_skew(n_clients=8, n_heldout=2, alpha=0.5, seed=0)
    assert len({t.n_samples for t in data.train}) > 1  # the support sizes differ
    seen = _RecordingWeights()
    cfg = RunConfig(dataset="digits-skew", rounds=3, clients_per_round=6,
                    privacy=dict(mode="user", noise_multiplier=0.5, delta=1e-3))
    run_experiment(cfg, dataset=data, transport=seen)
    assert seen.seen and all(len(set(ws)) == 1 for ws in seen.seen.values())


# -- 4. a discrete mechanism in the SecAgg ring ----------------------------------------------------------------
def test_distributed_noise_under_secagg_is_integer_skellam_without_clipping() -> None:
    data = make_digits_fewshot(**TINY, seed=0)
    learner = _learner(data)
    layout = LayerLayout.from_params(learner.init_params())
    n, z, clip = 6, 4.0, 1.0  # a large noise multiplier: per-entry clipping of float shares would show
    proto, defense = SecAggPlus(clip_range=secagg_clip_range(clip=clip, cohort=n, dim=layout.numel)), Mean()
    cfg = PrivacyConfig(mode="user", noise_multiplier=z, delta=1e-3, placement="distributed", clip=clip,
                        insecure_seeded_noise=True)
    setup = setup_privacy(cfg, learner, n_train_clients=12, clients_per_round=n, rounds=3, protocol=proto,
                          defense=defense, generator=torch.Generator().manual_seed(0))
    assert setup.report()["mechanism"] == "skellam"
    cohort = list(range(n))
    d = layout.numel
    updates = [ClientUpdate(c, setup.update_hook(c, torch.zeros(d)), layout.layer_names, 1.0) for c in cohort]
    out = proto.run_round(0, updates, layout, defense=defense)
    released = setup.aggregate_hook(len(out.accepted), out.aggregate)
    setup.end_round(0, accepted=out.accepted)
    scale = proto.plan(0, cohort, d, max_weight=1.0).fixed_point.scale
    ring = released.double().numpy() * setup.expected_cohort * scale
    assert np.allclose(ring, np.round(ring), atol=0.05)  # integer noise, nothing rounded after it
    # the released noise has exactly the variance the ledger accounts (no per-entry clipping)
    var = setup.report()["noise_variance_per_round"][-1]  # in ring units, summed over the contributors
    assert abs(ring.var() / var - 1) < 0.2
    assert np.abs(ring).max() > clip * scale  # float shares would have been clipped to the entry range


# -- 5. secure randomness by default ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["user", "record"])
def test_dp_noise_is_not_reproducible_from_the_run_seed_by_default(mode: str) -> None:
    data = make_digits_fewshot(**TINY, seed=0)

    def noise(**extra: object) -> torch.Tensor:
        cfg = PrivacyConfig(mode=mode, noise_multiplier=1.0, delta=1e-3, **extra)  # type: ignore[arg-type]
        s = setup_privacy(cfg, _learner(data), n_train_clients=8, clients_per_round=4, rounds=2,
                          local_dataset_size=6, generator=torch.Generator().manual_seed(7))
        assert s.report()["noise_source"] == ("seeded (insecure)" if extra else "os-csprng")
        if mode == "user":
            assert s.aggregate_hook is not None
            return s.aggregate_hook(4, torch.zeros(50))
        learner = s.learner
        params = learner.init_params()
        upd, _ = learner.update(params, data.train[0])
        return torch.cat([v.flatten() for v in upd.values()])

    assert not torch.equal(noise(), noise())
    assert torch.equal(noise(insecure_seeded_noise=True), noise(insecure_seeded_noise=True))


def test_cli_has_an_explicit_flag_for_seeded_noise() -> None:
    from securefml.cli import build_parser, config_from_args

    args = build_parser().parse_args(["run", "--dp", "user", "--target-epsilon", "3", "--delta", "1e-5",
                                      "--dp-insecure-seeded-noise"])
    assert config_from_args(args).privacy_config().insecure_seeded_noise is True
    args = build_parser().parse_args(["run", "--dp", "user", "--target-epsilon", "3", "--delta", "1e-5"])
    assert config_from_args(args).privacy_config().insecure_seeded_noise is False



def test_user_level_dp_needs_a_server_dictated_layer_selection() -> None:
    cfg = RunConfig(dataset="digits-fewshot", rounds=1, clients_per_round=4, dataset_options=TINY,
                    select="topk:0.5", privacy=dict(mode="user", noise_multiplier=1.0, delta=1e-3))
    with pytest.raises(ConfigError, match="client-chosen layer selection"):
        run_experiment(cfg)
