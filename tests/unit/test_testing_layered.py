"""The public layered-update strategies: checked arguments, and updates that fit their layout."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.errors import ConfigError
from securefml.testing.layered import layer_layouts, layer_subsets, layered_updates
from securefml.updates import LayerLayout


@settings(max_examples=20, deadline=None)
@given(layer_layouts(max_layers=3, max_layer_size=50), st.data())
def test_updates_fit_their_layout(layout, data):
    ups = data.draw(layered_updates(layout, st.integers(1, 4), max_weight=7))
    assert 1 <= len(ups) <= 4
    assert [u.client_id for u in ups] == list(range(len(ups)))
    for u in ups:
        assert u.layers == layout.canonical(u.layers) and u.layers
        assert u.vector.numel() == layout.numel_of(u.layers)
        assert 1 <= u.weight <= 7 and float(u.weight).is_integer()
    same = data.draw(layered_updates(layout, 3, same_layers=True))
    assert len({u.layers for u in same}) == 1


def test_arguments_are_checked_eagerly():
    with pytest.raises(ConfigError):
        layer_layouts(min_layers=3, max_layers=2)
    with pytest.raises(ConfigError):
        layer_layouts(max_layer_size=0)
    layout = LayerLayout([("l0.p0", (3,)), ("l1.p0", (2, 2))])
    with pytest.raises(ConfigError):
        layer_subsets(layout, min_size=len(layout.layer_names) + 1)
    with pytest.raises(ConfigError):
        layered_updates(layout, 0)
    with pytest.raises(ConfigError):
        layered_updates(layout, 2, scale=0.0)
