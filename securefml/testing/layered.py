"""Hypothesis strategies for layered client updates: random layer shapes, weights and subsets.

Use them to test a protocol or a defense against its plaintext reference::

    @given(layer_layouts(), st.data())
    def test_my_protocol(layout, data):
        updates = data.draw(layered_updates(layout, 3))
        ...

Entries are drawn from a seeded normal generator (one seed per update), not element by
element, so vectors of thousands of entries cost no more to generate than short ones; they
shrink towards fewer and smaller layers, fewer clients, weight 1 and the first layers.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from securefml.errors import ConfigError
from securefml.protocols.base import ClientUpdate
from securefml.updates import LayerLayout

__all__ = ["layer_layouts", "layer_subsets", "layered_updates"]


def _check_range(name: str, lo: int, hi: int, minimum: int) -> None:
    if lo < minimum or hi < lo:
        raise ConfigError(f"{name}: need {minimum} <= min <= max, got min={lo}, max={hi}")


def layer_layouts(
    *, min_layers: int = 1, max_layers: int = 4, max_layer_size: int = 64, max_params_per_layer: int = 2
) -> st.SearchStrategy[LayerLayout]:
    """Layouts of ``min_layers..max_layers`` layers named ``l0, l1, ...``.

    Each layer owns one or more parameters (``l0.p0``, ``l0.p1``) of 1-D or 2-D shape, with at
    most ``max_layer_size`` entries per parameter.
    """
    _check_range("layers", min_layers, max_layers, 1)
    _check_range("params per layer", 1, max_params_per_layer, 1)
    if max_layer_size < 1:
        raise ConfigError(f"max_layer_size must be >= 1, got {max_layer_size}")

    side = max(1, int(max_layer_size**0.5))
    shape: st.SearchStrategy[tuple[int, ...]] = st.one_of(
        st.tuples(st.integers(1, max_layer_size)),
        st.tuples(st.integers(1, side), st.integers(1, side)),
    )
    layer = st.lists(shape, min_size=1, max_size=max_params_per_layer)

    def build(layers: list[list[tuple[int, ...]]]) -> LayerLayout:
        return LayerLayout((f"l{i}.p{j}", s) for i, params in enumerate(layers) for j, s in enumerate(params))

    return st.lists(layer, min_size=min_layers, max_size=max_layers).map(build)


def layer_subsets(layout: LayerLayout, *, min_size: int = 1) -> st.SearchStrategy[tuple[str, ...]]:
    """Non-empty (by default) subsets of ``layout``'s layers, in layout order."""
    names = layout.layer_names
    if not 0 <= min_size <= len(names):
        raise ConfigError(f"min_size must be in [0, {len(names)}], got {min_size}")
    return st.lists(st.sampled_from(names), unique=True, min_size=min_size, max_size=len(names)).map(
        layout.canonical
    )


def layered_updates(
    layout: LayerLayout,
    n: int | st.SearchStrategy[int],
    *,
    scale: float = 1.0,
    max_weight: int = 100,
    same_layers: bool = False,
    first_id: int = 0,
) -> st.SearchStrategy[list[ClientUpdate]]:
    """Lists of ``n`` ``ClientUpdate`` over ``layout``, each with its own layer subset and weight.

    Parameters
    ----------
    layout:
        The model layout the updates follow.
    n:
        Number of clients (a value or a strategy).
    scale:
        Standard deviation of the entries.
    max_weight:
        Weights are integers in ``[1, max_weight]`` (sample counts).
    same_layers:
        Every client uploads the same subset (a server-dictated plan) instead of its own.
    first_id:
        Client ids are ``first_id, first_id + 1, ...``.
    """
    if isinstance(n, int) and n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    if max_weight < 1 or not scale > 0:
        raise ConfigError(f"need max_weight >= 1 and scale > 0, got {max_weight}, {scale}")
    counts = n if isinstance(n, st.SearchStrategy) else st.just(n)

    @st.composite
    def draw(data: st.DrawFn) -> list[ClientUpdate]:
        k = data(counts)
        shared = data(layer_subsets(layout)) if same_layers else None
        out = []
        for i in range(k):
            layers = shared if shared is not None else data(layer_subsets(layout))
            seed = data(st.integers(0, 2**31 - 1))
            gen = torch.Generator().manual_seed(seed)
            vec = torch.randn(layout.numel_of(layers), generator=gen) * scale
            weight = float(data(st.integers(1, max_weight)))
            out.append(ClientUpdate(first_id + i, vec, layers, weight))
        return out

    return draw()
