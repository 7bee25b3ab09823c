"""Layer roles on the layout: declared by the learner, queried by selection and the server, never by name."""

from __future__ import annotations

import pytest
import torch

from securefml.bayes import BayesMetaSGD
from securefml.data import make_digits_fewshot, make_sine
from securefml.errors import ConfigError
from securefml.meta import LEARNERS, MetaConfig, MetaSGD
from securefml.models import make_model
from securefml.privacy import RecordLevelDP
from securefml.selection import NamedLayers, RepresentationalChange, TopKImportance
from securefml.updates import LayerLayout, ParamRole, Role

SINE = make_sine(n_train=2, n_heldout=1, seed=0)
RATE = Role.LEARNED_RATE


def test_a_plain_layouts_fingerprint_is_unchanged_by_roles() -> None:
    # the bytes the fingerprint had before roles existed (same names, shapes, order)
    plain = LayerLayout([("a.w", (2, 3)), ("a.b", (2,)), ("b.w", (4,))])
    assert plain.fingerprint().hex() == "a94832aea9f7569657257e035b14462b"
    assert not plain.has_roles and plain.layers_with_role(Role.WEIGHT) == ("a", "b")
    declared = LayerLayout([("a.w", (2, 3)), ("r.w", (2, 3))], roles={"r.w": ParamRole(RATE, of="a.w")})
    undeclared = LayerLayout([("a.w", (2, 3)), ("r.w", (2, 3))])
    assert declared.fingerprint() != undeclared.fingerprint() and declared != undeclared
    as_logvar = LayerLayout([("a.w", (2, 3)), ("r.w", (2, 3))], roles={"r.w": ParamRole(Role.LOG_VARIANCE, of="a.w")})
    assert as_logvar.fingerprint() != declared.fingerprint()


def test_roles_are_validated_naming_the_culprit() -> None:
    entries = [("a.w", (3,)), ("a.b", (2,)), ("r.w", (3,)), ("r.b", (2,))]
    with pytest.raises(ConfigError, match="'x.w'.*not parameters"):
        LayerLayout(entries, roles={"x.w": ParamRole(RATE, of="a.w")})
    with pytest.raises(ConfigError, match="layer 'r' declare different roles"):
        LayerLayout(entries, roles={"r.w": ParamRole(RATE, of="a.w")})
    with pytest.raises(ConfigError, match="shape"):
        LayerLayout(entries, roles={"r.w": ParamRole(RATE, of="a.b"), "r.b": ParamRole(RATE, of="a.w")})
    with pytest.raises(ConfigError, match="'nope'"):
        LayerLayout(entries, roles={"r.w": ParamRole(RATE, of="nope"), "r.b": ParamRole(RATE, of="a.b")})
    with pytest.raises(ConfigError, match="cycle"):
        LayerLayout([("p.w", (2,)), ("q.w", (2,))],
                    roles={"p.w": ParamRole(RATE, of="q.w"), "q.w": ParamRole(RATE, of="p.w")})
    with pytest.raises(ConfigError, match="needs an `of`"):
        ParamRole(RATE)
    with pytest.raises(ConfigError, match="takes no `of`"):
        ParamRole(Role.WEIGHT, of="a.w")


def test_selection_follows_declared_roles_not_names() -> None:
    """Rates named anything at all follow their weight's layer; an ``alpha.`` name without a role does not."""
    layout = LayerLayout([("enc.w", (10,)), ("head.w", (30,)), ("lr_enc.w", (10,)), ("lr_head.w", (30,)),
                          ("alpha.free.w", (5,))],
                         roles={"lr_enc.w": ParamRole(RATE, of="enc.w"), "lr_head.w": ParamRole(RATE, of="head.w")})
    assert layout.owner("lr_head") == "head" and layout.owner("alpha.free") == "alpha.free"
    g = torch.ones(layout.numel)
    assert NamedLayers("head").select(layout, g, g) == ("head", "lr_head")
    upd = torch.zeros(layout.numel)
    upd[layout.slices()["enc"]] = 3.0
    # budget 25 of 85 entries: enc with its rates (20), then the 5-entry weight layer "alpha.free" fits
    assert TopKImportance(0.3).select(layout, upd, g) == ("enc", "lr_enc", "alpha.free")
    feats = {n: torch.randn(8, 3, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(layout.layer_names)}
    out = RepresentationalChange(withhold=0).select(layout, upd, g, probe=lambda v: feats)
    assert out == layout.layer_names  # the probe is asked for weight layers only; the rates follow


def test_meta_sgd_declares_its_rates_and_the_dp_wrapper_keeps_them() -> None:
    learner = MetaSGD(make_model(SINE, hidden=(8,), seed=0), MetaConfig(inner_steps=1), first_order=True)
    layout = learner.layout()
    assert layout == LayerLayout.from_params(learner.init_params(), roles=learner.layer_roles())
    assert layout.layers_with_role(RATE) == ("alpha.layers.0", "alpha.layers.2")
    assert all(layout.owner(n) == n.removeprefix("alpha.") for n in layout.layers_with_role(RATE))
    assert set(learner.model_params(learner.init_params())) == {
        p.name for n in layout.layers_with_role(Role.WEIGHT) for p in layout.layer(n).params}
    dp = RecordLevelDP(learner, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5)
    assert dp.layout() == layout
    for name in ("maml", "fomaml", "reptile", "fedavg"):
        plain = LEARNERS.create(name, model=make_model(SINE, hidden=(8,), seed=0)).layout()
        assert not plain.has_roles


def test_bayesian_layouts_declare_log_variances_and_their_rates() -> None:
    data = make_digits_fewshot(n_train=2, n_heldout=1, k_shot=2, query=2, seed=0)
    layout = BayesMetaSGD(make_model(data, seed=0), MetaConfig(inner_steps=1)).layout()
    logvars = layout.layers_with_role(Role.LOG_VARIANCE)
    assert logvars == ("logvar.layers.0", "logvar.layers.2", "logvar.layers.4")
    assert layout.owner("alpha.logvar.layers.4") == "layers.4"
    assert layout.layer("alpha.logvar.layers.4").of == "logvar.layers.4"
    vec = torch.zeros(layout.numel)
    chosen = set(NamedLayers("layers.4").select(layout, vec, vec))
    assert chosen == {"layers.4", "logvar.layers.4", "alpha.layers.4", "alpha.logvar.layers.4"}
