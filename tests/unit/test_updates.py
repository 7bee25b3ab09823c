import pytest
import torch

from securefml.errors import ConfigError, InvalidUpdateError
from securefml.models import MLP
from securefml.updates import LayerLayout, layer_of


def test_layers_grouped_by_module_in_order():
    layout = LayerLayout.from_module(MLP(3, [4], 2))
    assert layout.layer_names == ("layers.0", "layers.2")
    assert layout.param_names == ("layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias")
    assert layout.numel == 3 * 4 + 4 + 4 * 2 + 2
    assert layer_of("w") == "w"


def test_subset_flatten_scatter_gather_roundtrip():
    model = MLP(3, [4], 2)
    layout = LayerLayout.from_module(model)
    params = dict(model.named_parameters())
    full = layout.flatten(params)
    part = layout.flatten(params, ["layers.2"])
    assert part.numel() == 10
    assert torch.equal(layout.gather(full, ["layers.2"]), part)
    scattered = layout.scatter(part, ["layers.2"])
    assert torch.equal(scattered[layout.slices(["layers.2"])["layers.2"]], part)
    assert scattered[:16].abs().sum() == 0
    back = layout.unflatten(part, ["layers.2"])
    assert torch.equal(back["layers.2.weight"], params["layers.2.weight"])


def test_bad_inputs_are_typed():
    layout = LayerLayout([("a.w", (2, 2))])
    with pytest.raises(ConfigError, match="unknown layer"):
        layout.canonical(["nope"])
    with pytest.raises(InvalidUpdateError):
        layout.unflatten(torch.zeros(3))
    with pytest.raises(ConfigError, match="shape"):
        layout.flatten({"a.w": torch.zeros(3)})
    with pytest.raises(ConfigError, match="twice"):
        LayerLayout([("a", (1,)), ("a", (1,))])


def test_fingerprint_changes_with_shape_and_order():
    a = LayerLayout([("x.w", (2,)), ("y.w", (3,))])
    assert a.fingerprint() == LayerLayout([("x.w", (2,)), ("y.w", (3,))]).fingerprint()
    assert a.fingerprint() != LayerLayout([("y.w", (3,)), ("x.w", (2,))]).fingerprint()
    assert a.fingerprint() != LayerLayout([("x.w", (2,)), ("y.w", (4,))]).fingerprint()
