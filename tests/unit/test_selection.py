import pytest
import torch

from securefml.errors import ConfigError
from securefml.selection import (
    AllLayers,
    NamedLayers,
    RepresentationalChange,
    TopKImportance,
    make_selector,
    rdm_change,
)
from securefml.updates import LayerLayout, ParamRole, Role

_ENTRIES = [("a.w", (10,)), ("b.w", (10,)), ("c.w", (40,)), ("d.w", (40,)),
            ("alpha.a.w", (10,)), ("alpha.b.w", (10,)), ("alpha.c.w", (40,)), ("alpha.d.w", (40,))]
#: the rates declared as roles, as Meta-SGD's ``layout()`` does
LAYOUT = LayerLayout(_ENTRIES, roles={f"alpha.{n}.w": ParamRole(Role.LEARNED_RATE, of=f"{n}.w") for n in "abcd"})
#: the same names without roles (a layout built from params alone): every layer is a weight, no name rule
LEGACY = LayerLayout(_ENTRIES)


def test_all_and_named():
    g = torch.ones(LAYOUT.numel)
    assert AllLayers().select(LAYOUT, g, g) == LAYOUT.layer_names
    assert NamedLayers(["a", "c"]).select(LAYOUT, g, g) == ("a", "c", "alpha.a", "alpha.c")
    assert NamedLayers(["a", "c"]).select(LEGACY, g, g) == ("a", "c")  # names tie nothing
    with pytest.raises(ConfigError, match="no layer matches"):
        NamedLayers("zzz").select(LAYOUT, g, g)


def test_topk_respects_byte_budget_and_ranks_by_relative_change():
    g = torch.ones(LAYOUT.numel)
    upd = torch.zeros(LAYOUT.numel)
    s = LAYOUT.slices()
    upd[s["b"]] = 5.0
    upd[s["d"]] = 1.0
    chosen = TopKImportance(0.25).select(LAYOUT, upd, g)
    assert "b" in chosen and "alpha.b" in chosen
    assert "d" not in chosen  # d (80 entries with its rates) would exceed 25% of 200 after b
    assert LAYOUT.numel_of(chosen) <= 0.25 * LAYOUT.numel
    assert TopKImportance(1.0).select(LAYOUT, upd, g) == LAYOUT.canonical(LAYOUT.layer_names)


def test_rdm_change_zero_for_same_representation_and_positive_otherwise():
    x = torch.randn(8, 5)
    assert rdm_change(x, x) == pytest.approx(0.0, abs=1e-9)
    assert rdm_change(x, 2 * x) == pytest.approx(0.0, abs=1e-9)  # scale does not change structure
    assert rdm_change(x, torch.randn(8, 5)) > 0.05


def test_cedar_withholds_least_changed_layers():
    changed = {"a": 0.0, "b": 1.0, "c": 0.5, "d": 0.0}
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(16, 4, generator=gen)

    def probe(vec):
        scale = float(vec[0])  # 0 for global, 1 for local
        return {n: base + scale * changed[n] * torch.randn(16, 4, generator=gen) for n in "abcd"}

    g = torch.zeros(LAYOUT.numel)
    upd = torch.zeros(LAYOUT.numel)
    upd[0] = 1.0
    out = RepresentationalChange(withhold=2).select(LAYOUT, upd, g, probe=probe)
    assert out == ("b", "c", "alpha.b", "alpha.c")
    assert RepresentationalChange().n_withheld(12) == 3 and RepresentationalChange().n_withheld(4) == 1


def test_make_selector_specs():
    assert isinstance(make_selector("topk:0.3"), TopKImportance)
    assert make_selector("topk:fraction=0.3,server_dictated=true").server_dictated
    assert make_selector("cedar:1").withhold == 1
    with pytest.raises(ConfigError):
        make_selector("topk:2.0")
