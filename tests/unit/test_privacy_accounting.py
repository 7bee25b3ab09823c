"""Reported epsilons equal Opacus' accountants fed the same (sigma, sample rate, steps), end to end."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from securefml.client import Client
from securefml.data import make_sine
from securefml.defenses import make_defense
from securefml.errors import PrivacyBudgetExceeded
from securefml.meta import LEARNERS, MetaConfig
from securefml.models import make_model
from securefml.privacy import (
    Ledger,
    PrivacyConfig,
    epsilon_for,
    noise_for_target,
    rounded_sensitivity,
    secagg_clip_range,
    setup_privacy,
    skellam_epsilon,
)
from securefml.protocols import PROTOCOLS, SecAggPlus, Transport
from securefml.server import Server

SINE = make_sine(n_train=12, n_heldout=1, seed=0)
ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}


def _opacus_epsilon(name: str, steps: list[tuple[float, float]], delta: float) -> float:
    acc = ACCOUNTANTS[name]()
    for sigma, q in steps:
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=delta))


@pytest.mark.parametrize("name", ["rdp", "prv"])
@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.0, 0.05, 100), (2.3, 0.5, 7)])
def test_ledger_equals_opacus_accountant(name: str, sigma: float, q: float, steps: int) -> None:
    ledger = Ledger(name, 1e-5)
    ledger.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
    assert ledger.epsilon() == pytest.approx(_opacus_epsilon(name, [(sigma, q)] * steps, 1e-5), rel=1e-9)
    assert ledger.steps == steps
    restored = Ledger(name, 1e-5)
    restored.load_state_dict(ledger.state_dict())
    assert restored.epsilon() == ledger.epsilon()


def test_zero_noise_is_unbounded_and_no_step_is_free() -> None:
    assert epsilon_for("rdp", ((0.0, 0.1, 3),), 1e-5) == math.inf
    assert Ledger("rdp", 1e-5).epsilon() == 0.0


def test_noise_for_target_is_opacus_get_noise_multiplier() -> None:
    got = noise_for_target(target_epsilon=1.0, delta=1e-5, sample_rate=0.05, steps=100, accountant="rdp")
    assert got == get_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.05, steps=100,
                                       accountant="rdp")
    assert noise_for_target(target_epsilon=math.inf, delta=1e-5, sample_rate=0.05, steps=100, accountant="rdp") == 0


class _DropOne(Transport):
    """Drops client ``victim``'s message (dropout), to check distributed-noise accounting."""

    def __init__(self, victim: int) -> None:
        self.victim = victim

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        return None if sender == self.victim else data


def _run(cfg: PrivacyConfig, *, rounds: int = 3, per_round: int = 4, algorithm: str = "fomaml",
         transport: Transport | None = None):  # type: ignore[no-untyped-def]
    learner = LEARNERS.create(algorithm, model=make_model(SINE, hidden=(8,), seed=0),
                              config=MetaConfig(inner_steps=1, inner_lr=0.05, outer_lr=0.1))
    train = list(SINE.train)
    setup = setup_privacy(cfg, learner, n_train_clients=len(train), clients_per_round=per_round, rounds=rounds,
                          dataset_kind="regression", algorithm_name=algorithm, local_dataset_size=20,
                          generator=torch.Generator().manual_seed(0))
    server = Server(setup.learner, PROTOCOLS.create("plaintext"), make_defense("mean"),
                    update_hook=setup.update_hook, aggregate_hook=setup.aggregate_hook)
    clients = [Client.build(t) for t in train]
    gen = torch.Generator().manual_seed(3)
    records = []
    for r in range(rounds):
        idx = torch.randperm(len(clients), generator=gen)[:per_round].tolist()
        records.append(server.run_round(r, [clients[i] for i in sorted(idx)], transport=transport, generator=gen))
        setup.end_round(r)
    return setup, records, server


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_record_level_epsilon_per_client_equals_accountant(name: str) -> None:
    cfg = PrivacyConfig(mode="record", noise_multiplier=1.3, delta=1e-3, sample_rate=0.4, accountant=name)
    setup, records, _ = _run(cfg, rounds=3)
    report = setup.report()
    joined = Counter(cid for rec in records for cid in rec.cohort)
    per_round = report["steps_per_participation"]
    assert per_round == 2  # FOMAML: one inner DP step + the query DP step
    assert set(report["epsilon_per_client"]) == {str(c) for c in joined}
    for cid, times in joined.items():
        expected = _opacus_epsilon(name, [(1.3, 0.4)] * (per_round * times), 1e-3)
        assert report["epsilon_per_client"][str(cid)] == pytest.approx(expected, rel=1e-9)
    assert report["epsilon_max"] == pytest.approx(max(report["epsilon_per_client"].values()))
    assert report["mode"] == "record" and report["accountant"] == name and report["delta"] == 1e-3


def test_user_level_epsilon_equals_accountant_fed_cohort_sampling() -> None:
    cfg = PrivacyConfig(mode="user", target_epsilon=5.0, delta=1e-3, clip=0.5)
    setup, records, _ = _run(cfg, rounds=3, per_round=4)
    q = 4 / 12
    z = get_noise_multiplier(target_epsilon=5.0, target_delta=1e-3, sample_rate=q, steps=3, accountant="rdp")
    assert setup.noise_multiplier == z
    report = setup.report()
    assert report["epsilon_max"] == pytest.approx(_opacus_epsilon("rdp", [(z, q)] * 3, 1e-3), rel=1e-9)
    assert report["epsilon_max"] <= 5.0
    assert report["rounds_accounted"] == 3 and report["cohort_sample_rate"] == pytest.approx(q)
    assert setup.epsilon_history == sorted(setup.epsilon_history)


def test_distributed_noise_accounts_dropouts_as_less_noise() -> None:
    """Per-client Skellam RDP over the rounds each client contributed to, with the variance actually released."""
    learner = LEARNERS.create("fomaml", model=make_model(SINE, hidden=(8,), seed=0),
                              config=MetaConfig(inner_steps=1, inner_lr=0.05, outer_lr=0.1))
    dim = sum(p.numel() for p in learner.init_params().values())
    proto, defense = SecAggPlus(clip_range=secagg_clip_range(clip=0.5, cohort=4, dim=dim)), make_defense("mean")
    cfg = PrivacyConfig(mode="user", noise_multiplier=1.5, delta=1e-3, clip=0.5, placement="distributed",
                        min_survivors=4)
    setup = setup_privacy(cfg, learner, n_train_clients=12, clients_per_round=4, rounds=3, dataset_kind="regression",
                          protocol=proto, defense=defense)
    server = Server(setup.learner, proto, defense, update_hook=setup.update_hook,
                    aggregate_hook=setup.aggregate_hook, equal_weights=setup.equal_weights)
    clients = [Client.build(t) for t in SINE.train]
    drop = _DropOne(victim=-1)
    released: dict[int, list[tuple[float, float, float]]] = {}
    for r, cohort in enumerate(([0, 1, 2, 3], [0, 1, 4, 5], [2, 3, 4, 5])):
        drop.victim = cohort[0]  # one dropout per round: 3 contributors, noise sized for 4
        rec = server.run_round(r, [clients[i] for i in cohort], transport=drop)
        assert len(rec.accepted) == 3
        scale = proto.plan(r, cohort, dim, max_weight=1.0).fixed_point.scale
        l1, l2 = rounded_sensitivity(scale=scale, clip=0.5, dim=dim)
        for c in rec.accepted:
            released.setdefault(c, []).append((l1, l2, 3 * (1.5 * l2) ** 2 / 4))
        setup.end_round(r, accepted=rec.accepted)
    report = setup.report()
    assert report["deficit_rounds"] == [0, 1, 2] and report["min_survivors"] == 4
    for c, rel in released.items():
        assert report["epsilon_per_client"][str(c)] == pytest.approx(skellam_epsilon(rel, 1e-3), rel=1e-9)
    assert report["epsilon_max"] == pytest.approx(max(skellam_epsilon(rel, 1e-3) for rel in released.values()))
    # without the deficit the same releases cost less
    full = max(skellam_epsilon([(a, b, v * 4 / 3) for a, b, v in rel], 1e-3) for rel in released.values())
    assert report["epsilon_max"] > full


def test_user_level_updates_reaching_the_protocol_are_clipped() -> None:
    cfg = PrivacyConfig(mode="user", noise_multiplier=0.0, delta=1e-3, clip=1e-3)
    setup, records, server = _run(cfg, rounds=1, per_round=4)
    # the plain mean of clipped updates has norm <= S, and without noise the aggregate is that mean
    assert records[0].update_norm <= 1e-3 * (1 + 1e-5)


def test_record_level_budget_is_enforced_per_client() -> None:
    cfg = PrivacyConfig(mode="record", target_epsilon=2.0, delta=1e-3, sample_rate=0.5)
    learner = LEARNERS.create("reptile", model=make_model(SINE, hidden=(8,)), config=MetaConfig(inner_steps=2))
    setup = setup_privacy(cfg, learner, n_train_clients=12, clients_per_round=4, rounds=3, dataset_kind="regression",
                          local_dataset_size=20)
    limit = setup.report()["max_participations"]
    assert limit is not None and limit >= setup.report()["planned_participations"]
    params = setup.learner.init_params()
    task = SINE.train[0]
    for _ in range(limit):
        setup.learner.update(params, task)
    setup.end_round(0)
    assert setup.report()["epsilon_max"] <= 2.0
    with pytest.raises(PrivacyBudgetExceeded, match=f"client {task.client_id}"):
        setup.learner.update(params, task)


def test_seeded_noise_is_reproducible_only_behind_the_insecure_flag() -> None:
    outs = {}
    for flag in (False, True):
        cfg = PrivacyConfig(mode="user", noise_multiplier=1.0, delta=1e-3, insecure_seeded_noise=flag)
        outs[flag] = []
        for _ in range(2):
            learner = LEARNERS.create("reptile", model=make_model(SINE, hidden=(8,)), config=MetaConfig())
            s = setup_privacy(cfg, learner, n_train_clients=12, clients_per_round=4, rounds=2,
                              generator=torch.Generator().manual_seed(0))
            assert s.aggregate_hook is not None
            outs[flag].append(s.aggregate_hook(4, torch.zeros(50)))
    assert not torch.equal(outs[False][0], outs[False][1])
    assert torch.equal(outs[True][0], outs[True][1])


@pytest.mark.parametrize(("rounds", "q"), [(20, 0.1), (30, 1 / 3), (5, 0.05), (7, 1.0)])
def test_record_noise_is_calibrated_for_a_high_participation_quantile(rounds: int, q: float) -> None:
    from securefml.privacy.setup import PARTICIPATION_QUANTILE, participation_quantile

    k = participation_quantile(rounds, q, PARTICIPATION_QUANTILE)

    def cdf(j: int) -> float:
        return sum(math.comb(rounds, i) * q**i * (1 - q) ** (rounds - i) for i in range(j + 1))

    assert cdf(k) >= PARTICIPATION_QUANTILE - 1e-12
    assert k == 1 or cdf(k - 1) < PARTICIPATION_QUANTILE
