"""A CKKS packing frame travels as bytes: a remote client rebuilds it over its own model's layout."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.errors import MalformedMessageError, ProtocolError, ReplayError
from securefml.protocols import PackingFrame
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("fc1.weight", (8, 4)), ("fc1.bias", (8,)), ("head.weight", (3, 8))])


def test_a_frame_round_trips_over_the_clients_own_layout() -> None:
    frame = PackingFrame(LAYOUT, ("head", "fc1"), 16)
    back = PackingFrame.from_bytes(frame.to_bytes(4), LAYOUT, round_idx=4)
    assert back.layers == frame.layers and back.slots == 16 and back.fingerprint() == frame.fingerprint()
    assert back.spans == frame.spans


def test_a_frame_for_another_model_or_round_is_refused() -> None:
    data = PackingFrame(LAYOUT, LAYOUT.layer_names, 16).to_bytes(1)
    with pytest.raises(ProtocolError, match="another model"):
        PackingFrame.from_bytes(data, LayerLayout([("fc1.weight", (8, 5))]))
    with pytest.raises(ReplayError):
        PackingFrame.from_bytes(data, LAYOUT, round_idx=2)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_tampered_frame_bytes_are_refused_or_decode_to_a_consistent_frame(data: st.DataObject) -> None:
    frame = PackingFrame(LAYOUT, ("fc1", "head"), 32)
    raw = bytearray(frame.to_bytes(0))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        back = PackingFrame.from_bytes(bytes(raw[:cut]), LAYOUT)
    except (MalformedMessageError, ProtocolError):
        return  # typed refusal (ReplayError is a ProtocolError)
    # anything accepted is self-consistent: its fingerprint names exactly its content
    assert back.fingerprint() == PackingFrame(LAYOUT, back.layers, back.slots).fingerprint()
