import struct

import pytest
import torch

from securefml.defenses import Mean
from securefml.errors import ConfigError, InvalidUpdateError, MalformedMessageError, ProtocolError, ReplayError
from securefml.protocols import ClientUpdate, Plaintext, Transport
from securefml.protocols.wire import Envelope, decode, encode
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("a.w", (3,)), ("b.w", (2,))])


def test_envelope_roundtrip_and_checks():
    env = Envelope("k", 3, 7, {"x": b"\x00\x01", "y": b""})
    back = decode(encode(env))
    assert back == env
    back.expect(kind="k", round=3, sender=7)
    with pytest.raises(ReplayError, match="round 3"):
        back.expect(kind="k", round=4, sender=7)
    with pytest.raises(ReplayError, match="sender 7"):
        back.expect(kind="k", round=3, sender=8)


@pytest.mark.parametrize("mutate", [lambda b: b[:-1], lambda b: b + b"\x00", lambda b: b"JUNK" + b[4:],
                                    lambda b: b[:4] + b"\x09" + b[5:], lambda b: b""])
def test_malformed_bytes_rejected(mutate):
    data = encode(Envelope("k", 1, 2, {"x": b"abc"}))
    with pytest.raises(MalformedMessageError):
        decode(mutate(data), sender=2)


def test_oversized_rejected():
    with pytest.raises(MalformedMessageError, match="exceeds"):
        decode(b"\x00" * 100, sender=1, max_bytes=10)


class Tamper(Transport):
    def __init__(self, victim, fn):
        self.victim, self.fn = victim, fn

    def deliver(self, sender, stage, data):
        return self.fn(data) if sender == self.victim else data


def _updates():
    return [ClientUpdate(i, torch.arange(5.0) + i, LAYOUT.layer_names, 1.0 + i) for i in range(3)]


def test_plaintext_weighted_mean():
    out = Plaintext().run_round(0, _updates(), LAYOUT, defense=Mean())
    expected = sum((1 + i) * (torch.arange(5.0) + i) for i in range(3)) / 6
    assert torch.allclose(out.aggregate, expected)
    assert out.accepted == (0, 1, 2)


@pytest.mark.parametrize(
    "fn,err",
    [
        (lambda d: d[:-3], MalformedMessageError),
        (lambda d: encode(Envelope("plain-update", 9, 1, dict(decode(d).fields))), ReplayError),
        (lambda d: encode(Envelope("plain-update", 0, 2, dict(decode(d).fields))), ReplayError),
        (lambda d: encode(Envelope("plain-update", 0, 1, {**decode(d).fields, "layout": b"x" * 16})), ProtocolError),
        (lambda d: encode(Envelope("plain-update", 0, 1, {**decode(d).fields, "weight": struct.pack(">d", -1)})),
         MalformedMessageError),
    ],
)
def test_bad_client_rejected_round_continues(fn, err):
    p = Plaintext()
    out = p.run_round(0, _updates(), LAYOUT, defense=Mean(), transport=Tamper(1, fn))
    assert out.accepted == (0, 2)
    assert 1 in out.rejected and err.__name__ in out.rejected[1]
    expected = (1 * torch.arange(5.0) + 3 * (torch.arange(5.0) + 2)) / 4
    assert torch.allclose(out.aggregate, expected)


def test_nan_update_rejected_naming_client():
    ups = _updates()
    ups[2].vector = torch.tensor([1.0, float("nan"), 0, 0, 0])
    out = Plaintext().run_round(0, ups, LAYOUT, defense=Mean())
    assert out.accepted == (0, 1)
    assert "client 2" in out.rejected[2] and InvalidUpdateError.__name__ in out.rejected[2]


def test_partial_layers_aggregated_per_layer():
    ups = [ClientUpdate(0, torch.ones(3), ("a",), 1.0), ClientUpdate(1, 3 * torch.ones(5), ("a", "b"), 1.0)]
    layout = LayerLayout([("a.w", (3,)), ("b.w", (2,))])
    out = Plaintext().run_round(0, ups, layout, defense=Mean())
    assert torch.allclose(out.aggregate, torch.tensor([2.0, 2, 2, 3, 3]))
    assert out.layer_weight == {"a": 2.0, "b": 1.0}


def test_robust_rule_refuses_mixed_layer_sets():
    class Robust(Mean):
        name = "robust"
        is_weighted_mean = False

    ups = [ClientUpdate(0, torch.ones(3), ("a",), 1.0), ClientUpdate(1, torch.ones(5), ("a", "b"), 1.0)]
    with pytest.raises(ConfigError, match="same layers"):
        Plaintext().run_round(0, ups, LayerLayout([("a.w", (3,)), ("b.w", (2,))]), defense=Robust())
