"""A client half's state between protocol stages as versioned bytes (Flower's ``Context.state``).

A SuperNode in deployment starts a fresh ClientApp process for every message, so a multi-stage
protocol's client half (SecAgg+: ``advertise`` ... ``unmask``; CKKS: ``announce`` -> ``update``)
cannot live in process memory from one stage to the next.  ``securefml_mod`` therefore writes the
half's state into the node's ``Context.state`` after every stage, as bytes from ``dump_half``,
and a process that finds no half in memory rebuilds it with ``load_half``.

Format (version 1, never pickle)::

    b"SFMLHALF" | u16 version | u32 header length | header (UTF-8 JSON) | float32 update bytes

The header names the half's kind (``"secagg"``, ``"ckks"``), round, party, layers, weight and the
kind's own fields (byte strings as hex).  The update travels as raw little-endian float32.

Where it lives, and the threat model: Flower keeps a node's ``Context`` in the SuperNode's own
state store and hands it to the ClientApp process it starts on the same machine; the SuperLink
and the ServerApp never receive it.  It holds the node's secrets for the round: SecAgg+'s X25519
private keys, its self-mask seed, the Shamir shares it holds for its neighbours and its pairwise
channel keys, and the raw update; they stay on the node as they would in memory.  Protect the
SuperNode's machine as you would its memory (a node-local disk of Flower's state, if configured,
holds them too).  Bytes that do not decode, of another version or for another round or party,
raise ``MalformedMessageError`` before anything is rebuilt (the node then stops for the round:
a dropout, never a wrong answer).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from securefml.errors import MalformedMessageError, ProtocolError
from securefml.flower.client_types import ClientHalves
from securefml.protocols.ckks_client_half import CKKSClientHalf
from securefml.protocols.halves import ClientHalf
from securefml.protocols.secagg_client import ClientState, SecAggClient, _Step
from securefml.protocols.secagg_crypto import KeyPair
from securefml.protocols.secagg_halves import SecAggClientHalf
from securefml.protocols.secagg_plan import RoundPlan
from securefml.protocols.secagg_stats import SecAggClientStats
from securefml.rounds import ClientUpdate
from securefml.updates import LayerLayout

__all__ = ["MAGIC", "VERSION", "dump_half", "load_half", "can_dump"]

MAGIC = b"SFMLHALF"
VERSION = 1
_HEAD = struct.Struct(">HI")
#: a header larger than this is not one this library wrote (a cohort of 10,000 peers fits)
MAX_HEADER = 1 << 24


def can_dump(half: ClientHalf) -> bool:
    """Whether ``dump_half`` knows this half's kind (single-stage halves need no state)."""
    return isinstance(half, (SecAggClientHalf, CKKSClientHalf))


def _hex_pairs(d: Mapping[int, tuple[bytes, bytes]]) -> dict[str, list[str]]:
    return {str(k): [a.hex(), b.hex()] for k, (a, b) in d.items()}


def _keypair(kp: KeyPair | None) -> list[str] | None:
    return None if kp is None else [kp.private.hex(), kp.public.hex()]


def _identity_of(half: SecAggClientHalf) -> str | None:
    """The public half of the node's identity key (hex), to check the rebuilt half has the same key."""
    if half.identity is None:
        return None
    raw = half.identity.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return bytes(raw).hex()


def _secagg_fields(half: SecAggClientHalf) -> dict[str, Any]:
    stats = half._stats
    out: dict[str, Any] = {"identity": _identity_of(half), "seconds": half._seconds,
                           "stats": [stats.entries, stats.clipped_entries, stats.weight_clipped]}
    cl = half.client
    if cl is None:
        return out
    st = cl.state
    out["plan"] = cl.plan.to_bytes().hex()
    out["state"] = {
        "step": int(st.step), "c_keys": _keypair(st.c_keys), "s_keys": _keypair(st.s_keys), "seed": st.seed.hex(),
        "peer_keys": _hex_pairs(st.peer_keys), "channel": {str(k): v.hex() for k, v in st.channel.items()},
        "held": _hex_pairs(st.held), "mask_seeds": {str(k): v.hex() for k, v in st.mask_seeds.items()},
        "peers": list(st.peers), "survivors": list(st.survivors),
        "errors": {str(k): str(e) for k, e in st.errors.items()},
    }
    return out


def _vector_of(half: SecAggClientHalf | CKKSClientHalf) -> np.ndarray:
    vec = half.update.vector if isinstance(half, CKKSClientHalf) else half.vector
    if isinstance(vec, torch.Tensor):
        vec = vec.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(np.asarray(vec, dtype="<f4").reshape(-1))


def dump_half(half: ClientHalf, *, round_idx: int) -> bytes:
    """The half's state as bytes (see the module docstring); ``TypeError`` for a kind it does not know."""
    if isinstance(half, SecAggClientHalf):
        layers, weight = list(half.layers or ()), half.weight
        head: dict[str, Any] = {"kind": "secagg", **_secagg_fields(half)}
    elif isinstance(half, CKKSClientHalf):
        layers, weight = list(half.update.layers), float(half.update.weight)
        head = {"kind": "ckks", "mode": half._mode}
    else:
        raise TypeError(f"no state codec for {type(half).__name__}")
    head.update({"round": int(round_idx), "party": int(half.party), "layers": layers, "weight": float(weight)})
    header = json.dumps(head, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return MAGIC + _HEAD.pack(VERSION, len(header)) + header + _vector_of(half).tobytes()


def _parse(data: bytes) -> tuple[dict[str, Any], np.ndarray]:
    if not isinstance(data, bytes) or len(data) < len(MAGIC) + _HEAD.size or not data.startswith(MAGIC):
        raise MalformedMessageError("the saved half state is not securefml's", sender=None)
    version, size = _HEAD.unpack_from(data, len(MAGIC))
    if version != VERSION:
        raise MalformedMessageError(f"saved half state of version {version}, this library reads {VERSION}",
                                    sender=None)
    start = len(MAGIC) + _HEAD.size
    if size > MAX_HEADER or start + size > len(data) or (len(data) - start - size) % 4:
        raise MalformedMessageError("the saved half state is truncated", sender=None)
    try:
        head = json.loads(data[start:start + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise MalformedMessageError("the saved half state's header does not decode", sender=None) from None
    if not isinstance(head, dict):
        raise MalformedMessageError("the saved half state's header is not an object", sender=None)
    return head, np.frombuffer(data[start + size:], dtype="<f4").astype(np.float32)


def _pairs(d: Mapping[str, list[str]]) -> dict[int, tuple[bytes, bytes]]:
    return {int(k): (bytes.fromhex(a), bytes.fromhex(b)) for k, (a, b) in d.items()}


def _restore_secagg(half: SecAggClientHalf, head: Mapping[str, Any], round_idx: int) -> None:
    if head.get("identity") != _identity_of(half):
        raise MalformedMessageError("the protocol gives this node another identity key than the one it advertised "
                                    "with (provision identity keys for signatures=True on real SuperNodes)",
                                    sender=None)
    half._seconds = float(head.get("seconds", 0.0))
    entries, clipped, over = head.get("stats", [0, 0, False])
    half._stats = SecAggClientStats(entries=int(entries), clipped_entries=int(clipped), weight_clipped=bool(over))
    if "plan" not in head:
        return
    plan = RoundPlan.from_bytes(bytes.fromhex(head["plan"]), round_idx=round_idx)
    cl = SecAggClient(half.party, plan, identity=half.identity, checks=half.checks)
    s = head["state"]
    c_keys, s_keys = s["c_keys"], s["s_keys"]
    cl.state = ClientState(
        step=_Step(int(s["step"])),
        c_keys=None if c_keys is None else KeyPair(bytes.fromhex(c_keys[0]), bytes.fromhex(c_keys[1])),
        s_keys=None if s_keys is None else KeyPair(bytes.fromhex(s_keys[0]), bytes.fromhex(s_keys[1])),
        seed=bytes.fromhex(s["seed"]),
        peer_keys=_pairs(s["peer_keys"]),
        channel={int(k): bytes.fromhex(v) for k, v in s["channel"].items()},
        held=_pairs(s["held"]),
        mask_seeds={int(k): bytes.fromhex(v) for k, v in s["mask_seeds"].items()},
        peers=tuple(int(p) for p in s["peers"]),
        survivors=tuple(int(p) for p in s["survivors"]),
        errors={int(k): ProtocolError(str(v), sender=int(k)) for k, v in s["errors"].items()},
    )
    half.client = cl


def load_half(data: bytes, protocol: ClientHalves, layout: LayerLayout, *, round_idx: int, party: int) -> ClientHalf:
    """Rebuild the half ``dump_half`` wrote, through ``protocol.client_half`` and its saved state.

    Raises
    ------
    MalformedMessageError
        If the bytes do not decode, or are for another round, party or kind than ``protocol`` builds.
    """
    head, vector = _parse(data)
    try:
        if head["round"] != round_idx or head["party"] != party:
            raise MalformedMessageError(f"the saved half state is for round {head['round']} party {head['party']}, "
                                        f"not round {round_idx} party {party}", sender=None)
        update = ClientUpdate(party, torch.from_numpy(vector), tuple(str(n) for n in head["layers"]),
                              float(head["weight"]))
        half = protocol.client_half(round_idx, layout, update)
        if head["kind"] == "secagg" and isinstance(half, SecAggClientHalf):
            _restore_secagg(half, head, round_idx)
        elif head["kind"] == "ckks" and isinstance(half, CKKSClientHalf):
            mode = head["mode"]
            half._mode = None if mode is None else str(mode)
        else:
            raise MalformedMessageError(f"saved half state of kind {head['kind']!r} does not fit "
                                        f"{type(half).__name__}", sender=None)
    except MalformedMessageError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise MalformedMessageError(f"the saved half state is malformed: {type(exc).__name__}: {exc}",
                                    sender=None) from None
    return half
