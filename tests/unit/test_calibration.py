"""Calibration metrics on hand-computed examples, and their wiring into every classification run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from securefml.calibration import (
    auroc,
    brier_score,
    expected_calibration_error,
    negative_log_likelihood,
    predictive_entropy,
    reliability_bins,
    selective_accuracy,
)
from securefml.errors import ConfigError


def test_ece_equal_width_hand_computed() -> None:
    # confidences 0.95 (right), 0.95 (wrong), 0.55 (right), 0.55 (wrong: predicts class 1), 15 bins:
    # bin (14/15, 1]: acc 0.5, conf 0.95 -> 0.45 * 2/4; bin (8/15, 9/15]: acc 0.5, conf .55 -> .05 * 2/4
    # ECE = 0.225 + 0.025 = 0.25
    p = torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.55, 0.45], [0.45, 0.55]])
    y = torch.tensor([0, 0, 0, 0])
    assert expected_calibration_error(p, y) == pytest.approx(0.25)
    bins = reliability_bins(p, y)
    assert sum(bins.counts) == 4 and bins.counts[14] == 2 and bins.counts[8] == 2
    assert bins.accuracy[14] == 0.5 and bins.confidence[8] == pytest.approx(0.55)


def test_ece_bin_edges_are_right_closed() -> None:
    # confidence exactly 0.6 with 5 bins falls in (0.4, 0.6], not (0.6, 0.8]
    p = torch.tensor([[0.6, 0.4]])
    assert reliability_bins(p, torch.tensor([0]), n_bins=5).counts == (0, 0, 1, 0, 0)


def test_adaptive_ece_hand_computed() -> None:
    # 4 predictions, 2 equal-mass bins: {0.55 wrong(y=1), 0.6 right} and {0.8 right, 0.9 wrong}
    # bin 1: acc .5, conf .575 -> .075; bin 2: acc .5, conf .85 -> .35; ECE = (.075 + .35) / 2
    p = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.8, 0.2], [0.6, 0.4]])
    y = torch.tensor([1, 1, 0, 0])
    assert expected_calibration_error(p, y, n_bins=2, adaptive=True) == pytest.approx(0.2125)
    # equal-width with 2 bins puts all four in (0.5, 1]: acc .5, conf .7125
    assert expected_calibration_error(p, y, n_bins=2) == pytest.approx(0.2125)
    assert expected_calibration_error(p, y, n_bins=4) == pytest.approx(
        0.5 * abs(0.5 - 0.575) + 0.5 * abs(0.5 - 0.85))


def test_perfectly_calibrated_has_zero_ece() -> None:
    p = torch.tensor([[0.5, 0.5]] * 4)
    assert expected_calibration_error(p, torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0)


def test_nll_and_brier_hand_computed() -> None:
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    y = torch.tensor([0, 1])
    assert negative_log_likelihood(p, y) == pytest.approx(-(math.log(0.7) + math.log(0.1)) / 2)
    # (0.09 + 0.04 + 0.01) and (0.01 + 0.81 + 0.64)
    assert brier_score(p, y) == pytest.approx((0.14 + 1.46) / 2)
    # a confident mistake costs a large finite amount, not inf
    assert math.isfinite(negative_log_likelihood(torch.tensor([[1.0, 0.0]]), torch.tensor([1])))


def test_entropy_selective_accuracy_and_auroc() -> None:
    assert predictive_entropy(torch.tensor([[0.5, 0.5]]))[0].item() == pytest.approx(math.log(2))
    p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.55, 0.45]])
    y = torch.tensor([0, 0, 0, 1, 0])  # the fourth most confident is wrong
    assert selective_accuracy(p, y, coverage=0.8) == pytest.approx(0.75)
    assert selective_accuracy(p, y, coverage=0.6) == pytest.approx(1.0)
    assert selective_accuracy(p, y, coverage=1.0) == pytest.approx(0.8)
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auroc(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5


@pytest.mark.parametrize(
    "probs, labels",
    [
        (torch.ones(3), torch.tensor([0, 0, 0])),                 # not [n, C]
        (torch.full((2, 2), 0.5), torch.tensor([0])),             # length mismatch
        (torch.full((2, 2), 0.5), torch.tensor([0, 2])),          # label out of range
        (torch.tensor([[float("nan"), 0.5]]), torch.tensor([0])),  # not finite
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)),    # empty
    ],
)
def test_bad_input_is_a_config_error(probs: torch.Tensor, labels: torch.Tensor) -> None:
    with pytest.raises(ConfigError):
        expected_calibration_error(probs, labels)


def test_every_classification_run_reports_calibration(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from securefml.cli import main

    out = tmp_path / "run"
    rc = main(["run", "--algorithm", "fomaml", "--rounds", "2", "--clients-per-round", "3", "--no-progress",
               "--dataset-option", "n_train=6", "--dataset-option", "n_heldout=4", "--plots", "--out", str(out)])
    assert rc == 0
    pers = json.loads((out / "result.json").read_text())["metrics"]["personalized"]
    for key in ("ece", "ece_adaptive", "nll", "brier", "selective_accuracy", "ood_auroc"):
        assert isinstance(pers[key], float)
        dist = pers["calibration"]["per_client"][key]
        assert len(dist["per_client"]) == 4 and dist["q10"] <= dist["median"] <= dist["q90"]
    assert sum(pers["calibration"]["reliability"]["counts"]) == 4 * 50
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_out_of_task_inputs_are_outside_the_task() -> None:
    from securefml.data import load_dataset
    from securefml.personalize import out_of_task_inputs

    data = load_dataset("digits-fewshot", n_train=2, n_heldout=5, seed=3)
    task = data.heldout[0]
    outside = out_of_task_inputs(task, data.heldout)
    assert outside is not None and outside.shape[0] == task.query_x.shape[0]
    # every returned input is a query input of another client, of a class this client lacks
    own = set(task.classes or ())
    allowed = [o.query_x[i] for o in data.heldout[1:] for i, c in enumerate(o.query_y.tolist())
               if (o.classes or ())[c] not in own]
    for row in outside:
        assert any(torch.equal(row, a) for a in allowed)


# -- the estimator's floor ------------------------------------------------------------------------
def test_calibrated_ece_floor_is_zero_for_certain_predictions_and_matches_a_simulation() -> None:
    from securefml.calibration import calibrated_ece_floor, expected_calibration_error

    onehot = torch.eye(3)[torch.tensor([0, 1, 2, 1])]
    assert calibrated_ece_floor(onehot, draws=5) == 0.0  # certain and right whatever is drawn
    # the floor is what ECE reports on predictions whose labels really are drawn from them
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(2.0 * torch.randn(50, 5, generator=g), dim=1)
    sims = [expected_calibration_error(p, torch.multinomial(p, 1, generator=g).squeeze(1)) for _ in range(400)]
    floor = calibrated_ece_floor(p, draws=400, generator=torch.Generator().manual_seed(2))
    assert floor == pytest.approx(sum(sims) / len(sims), abs=0.01)
    assert 0.05 < floor < 0.3  # 50 predictions of moderate confidence: far from 0
    with pytest.raises(ConfigError):
        calibrated_ece_floor(p, draws=0)
    with pytest.raises(ConfigError):
        calibrated_ece_floor(torch.full((2, 3), float("nan")))


def test_personalized_probabilities_are_what_personalize_scores() -> None:
    from securefml.bayes import BayesMetaSGD
    from securefml.calibration import calibration_summary
    from securefml.data import make_digits_fewshot
    from securefml.meta import MetaConfig
    from securefml.models import make_model
    from securefml.personalize import personalize, personalized_probabilities

    data = make_digits_fewshot(n_train=2, n_heldout=2, k_shot=3, query=4, seed=0)
    learner = BayesMetaSGD(make_model(data, hidden=(16, 16)), MetaConfig(inner_steps=2, inner_lr=0.1))
    params = learner.init_params()
    rep = personalize(learner, params, data.heldout, steps=2)
    assert rep.calibration is not None
    for i, t in enumerate(data.heldout):
        p = personalized_probabilities(learner, params, t, steps=2)
        assert torch.allclose(p.sum(1), torch.ones(p.shape[0], dtype=p.dtype))
        assert calibration_summary(p, t.query_y)["ece"] == pytest.approx(rep.calibration.per_client["ece"][i])


# -- the debiased squared calibration error (Kumar, Liang & Ma, NeurIPS 2019) ---------------------
def test_squared_calibration_error_hand_computed() -> None:
    from securefml.calibration import debiased_calibration_error, squared_calibration_error

    # equal-mass bins of 2: {0.6 (wrong), 0.7 (right)}, {0.8 (right), 0.9 (right)}
    p = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])
    y = torch.tensor([1, 0, 0, 0])
    # plug-in: 0.5 * (0.5 - 0.65)^2 + 0.5 * (1 - 0.85)^2 = 0.0225
    assert squared_calibration_error(p, y, n_bins=2, debiased=False) == pytest.approx(0.0225)
    # debiased: minus 0.5 * 0.5 * 0.5 / 1 in the first bin, 0 in the second (accuracy 1)
    assert squared_calibration_error(p, y, n_bins=2) == pytest.approx(0.0225 - 0.125)
    assert debiased_calibration_error(p, y, n_bins=2) == 0.0  # negative estimate -> 0
    # a one-prediction bin gets no correction (|B| - 1 = 0)
    assert squared_calibration_error(p[:1], y[:1], n_bins=1) == pytest.approx(0.36)
    with pytest.raises(ConfigError):
        squared_calibration_error(p, y[:2])


def test_debiased_estimator_has_no_floor_where_ece_has_one() -> None:
    """On exactly calibrated predictions (labels drawn from them) the debiased mean is ~0 at any size.

    The plug-in squared error and ECE are far above 0 on 50 predictions and fall with n; the
    debiased estimate's mean over 300 draws is within 3 standard errors of 0 at both sizes.
    """
    from securefml.calibration import squared_calibration_error

    g = torch.Generator().manual_seed(0)
    for n in (50, 250):
        deb, plug, ece = [], [], []
        for _ in range(300):
            p = torch.softmax(3 * torch.randn(n, 5, generator=g), dim=1)
            y = torch.multinomial(p, 1, generator=g).squeeze(1)
            deb.append(squared_calibration_error(p, y))
            plug.append(squared_calibration_error(p, y, debiased=False))
            ece.append(expected_calibration_error(p, y))
        d = torch.tensor(deb, dtype=torch.float64)
        assert abs(float(d.mean())) < 3 * float(d.std()) / math.sqrt(len(deb))
        assert sum(plug) / len(plug) > 0.005 and sum(ece) / len(ece) > 0.04
    # and it sees a real miscalibration: confidences 0.9 that are right 70% of the time
    p = torch.tensor([[0.9, 0.1]] * 400, dtype=torch.float64)
    y = (torch.rand(400, generator=g) > 0.7).long()
    assert squared_calibration_error(p, y) == pytest.approx((0.9 - float((y == 0).double().mean())) ** 2, abs=0.01)


def test_personalize_reports_the_debiased_error_per_client_and_pooled() -> None:
    from securefml.calibration import calibration_summary, squared_calibration_error
    from securefml.data import make_digits_fewshot
    from securefml.meta import MetaConfig, MetaSGD
    from securefml.models import make_model
    from securefml.personalize import personalize, personalized_probabilities

    data = make_digits_fewshot(n_train=2, n_heldout=2, k_shot=3, query=6, seed=0)
    learner = MetaSGD(make_model(data, hidden=(16, 16)), MetaConfig(inner_steps=2, inner_lr=0.1))
    params = learner.init_params()
    rep = personalize(learner, params, data.heldout, steps=2)
    assert rep.calibration is not None
    for i, t in enumerate(data.heldout):
        p = personalized_probabilities(learner, params, t, steps=2)
        assert rep.calibration.per_client["sq_ce_debiased"][i] == pytest.approx(squared_calibration_error(p, t.query_y))
    assert "sq_ce_debiased" in rep.calibration.pooled
    assert rep.to_dict()["sq_ce_debiased"] == pytest.approx(rep.calibration.mean("sq_ce_debiased"))
    assert set(calibration_summary(p, t.query_y)) >= {"ece", "ece_adaptive", "sq_ce_debiased", "nll", "brier"}


def test_debiased_never_exceeds_plug_in_and_plug_in_is_a_squared_error() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from securefml.calibration import squared_calibration_error

    @settings(max_examples=40, deadline=None)
    @given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 80), bins=st.integers(1, 15), adaptive=st.booleans())
    def check(seed: int, n: int, bins: int, adaptive: bool) -> None:
        g = torch.Generator().manual_seed(seed)
        p = torch.softmax(3 * torch.randn(n, 4, generator=g), dim=1)
        y = torch.randint(0, 4, (n,), generator=g)
        plug = squared_calibration_error(p, y, n_bins=bins, adaptive=adaptive, debiased=False)
        deb = squared_calibration_error(p, y, n_bins=bins, adaptive=adaptive)
        b = reliability_bins(p, y, n_bins=bins, adaptive=adaptive)
        by_hand = sum(c / n * (a - f) ** 2 for c, a, f in zip(b.counts, b.accuracy, b.confidence) if c)
        assert plug == pytest.approx(by_hand) and 0 <= plug <= 1
        assert deb <= plug + 1e-12

    check()
