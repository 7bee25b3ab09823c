import torch
from hypothesis import given
from hypothesis import strategies as st

from securefml.updates import LayerLayout

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
modules = st.lists(
    st.tuples(st.sampled_from(["conv", "fc", "head", "blk.0", "blk.1"]), st.lists(shapes, min_size=1, max_size=3)),
    min_size=1, max_size=5, unique_by=lambda t: t[0],
)


@given(modules, st.integers(0, 2**31 - 1), st.data())
def test_flatten_unflatten_roundtrip_exact(mods, seed, data):
    params = [(f"{m}.p{i}", shape) for m, shp in mods for i, shape in enumerate(shp)]
    layout = LayerLayout(params)
    gen = torch.Generator().manual_seed(seed)
    values = {n: torch.randn(s, generator=gen) for n, s in params}
    chosen = data.draw(st.lists(st.sampled_from(layout.layer_names), unique=True, min_size=1))
    flat = layout.flatten(values, chosen)
    assert flat.numel() == layout.numel_of(chosen)
    back = layout.unflatten(flat, chosen)
    assert set(back) == {p.name for n in layout.canonical(chosen) for p in layout.layer(n).params}
    for name, tensor in back.items():
        assert torch.equal(tensor, values[name])
    full = layout.flatten(values)
    assert torch.equal(layout.gather(full, chosen), flat)
    assert torch.equal(layout.gather(layout.scatter(flat, chosen), chosen), flat)
