"""Versioned byte encodings of every CKKS message that is not a client's upload.

Why: the key holder is its own party, so what the server asks it and what it answers must
cross as bytes (never pickle).  Each message is a ``wire`` envelope (magic, version, kind,
round, sender, length-checked fields); a decoder checks kind, round and sender, every field's
presence and length, and raises ``MalformedMessageError`` / ``ReplayError`` naming the sender.
The key holder decodes a request only into the typed ``GramRequest`` / ``AggregateRequest`` its
policy checks; it decides nothing from the bytes themselves.

Kinds (all bound to the round in the envelope header):

* ``ckks-plan`` (server -> client, stage ``announce``): layout and context fingerprints, mode.
* ``ckks-announce`` (client -> server): the client's layer manifest and weight (the declared
  leakage).
* ``ckks-upload-plan`` (server -> client / reference party, stage ``update``): the packing frame
  (``PackingFrame.to_bytes``) and the public weight normalizer W (0 in a robust round).
* ``ckks-gram-request`` / ``ckks-aggregate-request`` (server -> key holder): the frame, the
  signed uploads (``ckks-signed-upload`` each), the reference, coefficients and chunks.
* ``ckks-gram`` / ``ckks-chunks`` / ``ckks-blame`` (key holder -> server): the decrypted Gram,
  the decrypted chunks, or which upload failed verification (so the server drops that client
  and asks again; the key holder decrypted nothing).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from securefml.errors import MalformedMessageError, ProtocolError
from securefml.gram import Gram
from securefml.protocols.ckks_auth import SIGNATURE_BYTES, SignedUpload
from securefml.protocols.ckks_params import SERVER, ct_field, wire_id
from securefml.protocols.ckks_policy import AggregateRequest, GramRequest
from securefml.protocols.ckks_stats import PackingFrame
from securefml.protocols.plaintext_codec import decode_manifest, encode_manifest
from securefml.protocols.wire import Envelope, decode, encode, pack_array, unpack_array
from securefml.updates import LayerLayout

__all__ = [
    "RoundPlan",
    "Announcement",
    "UploadPlan",
    "Blame",
    "encode_plan",
    "decode_plan",
    "encode_announcement",
    "decode_announcement",
    "encode_upload_plan",
    "decode_upload_plan",
    "encode_signed_upload",
    "decode_signed_upload",
    "encode_gram_request",
    "decode_gram_request",
    "encode_aggregate_request",
    "decode_aggregate_request",
    "encode_gram",
    "decode_gram",
    "encode_chunks",
    "decode_chunks",
    "encode_blame",
    "decode_reply",
]

PLAN, ANNOUNCE, UPLOAD_PLAN = "ckks-plan", "ckks-announce", "ckks-upload-plan"
SIGNED, GRAM_REQ, AGG_REQ = "ckks-signed-upload", "ckks-gram-request", "ckks-aggregate-request"
GRAM, CHUNKS, BLAME = "ckks-gram", "ckks-chunks", "ckks-blame"
MODES = ("mean", "gram")
_F64 = struct.Struct(">d")
_I64 = struct.Struct(">q")
_SMALL = 1 << 20


def _f64(env: Envelope, name: str) -> float:
    raw = env.field(name)
    if len(raw) != _F64.size:
        raise MalformedMessageError(f"field {name!r} must be 8 bytes", sender=env.sender)
    return float(_F64.unpack(raw)[0])


def _i64(env: Envelope, name: str) -> int:
    raw = env.field(name)
    if len(raw) != _I64.size:
        raise MalformedMessageError(f"field {name!r} must be 8 bytes", sender=env.sender)
    return int(_I64.unpack(raw)[0])


def _exact_fields(env: Envelope, names: set[str] | frozenset[str]) -> None:
    if set(env.fields) != set(names):
        raise MalformedMessageError(f"{env.kind!r} message has unexpected or missing fields", sender=env.sender)


# -- server <-> client ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundPlan:
    """What the server announces first: the model, the key set, and mean or Gram mode."""

    round_idx: int
    layout: bytes
    context: bytes
    mode: str


def encode_plan(plan: RoundPlan) -> bytes:
    fields = {"layout": plan.layout, "ctx": plan.context, "mode": plan.mode.encode("ascii")}
    return encode(Envelope(PLAN, plan.round_idx, SERVER, fields))


def decode_plan(data: bytes, round_idx: int) -> RoundPlan:
    env = decode(data, sender=SERVER, max_bytes=_SMALL).expect(kind=PLAN, round=round_idx, sender=SERVER)
    _exact_fields(env, {"layout", "ctx", "mode"})
    mode = env.field("mode").decode("ascii", "replace")
    if mode not in MODES:
        raise MalformedMessageError(f"unknown CKKS round mode {mode!r}", sender=SERVER)
    return RoundPlan(round_idx, env.field("layout"), env.field("ctx"), mode)


@dataclass(frozen=True)
class Announcement:
    """A client's declared leakage: the layers it will send and its weight."""

    layers: tuple[str, ...]
    weight: float


def encode_announcement(round_idx: int, party: int, layers: Sequence[str], weight: float) -> bytes:
    fields = {"layers": encode_manifest(layers), "weight": _F64.pack(float(weight))}
    return encode(Envelope(ANNOUNCE, round_idx, wire_id(party), fields))


def decode_announcement(data: bytes, round_idx: int, party: int, layout: LayerLayout) -> Announcement:
    env = decode(data, sender=party, max_bytes=_SMALL).expect(kind=ANNOUNCE, round=round_idx, sender=wire_id(party))
    _exact_fields(env, {"layers", "weight"})
    layers = decode_manifest(env.field("layers"), layout, sender=party)
    weight = _f64(env, "weight")
    if not math.isfinite(weight) or weight <= 0:
        raise MalformedMessageError(f"weight must be positive and finite, got {weight}", sender=party)
    return Announcement(layers, weight)


@dataclass(frozen=True)
class UploadPlan:
    """The round's packing frame and its public weight normalizer (0: a robust round, scale 1)."""

    frame: PackingFrame
    normalizer: float


def encode_upload_plan(round_idx: int, frame: PackingFrame, normalizer: float) -> bytes:
    fields = {"frame": frame.to_bytes(round_idx), "normalizer": _F64.pack(float(normalizer))}
    return encode(Envelope(UPLOAD_PLAN, round_idx, SERVER, fields))


def decode_upload_plan(data: bytes, round_idx: int, layout: LayerLayout) -> UploadPlan:
    env = decode(data, sender=SERVER, max_bytes=2 * _SMALL).expect(kind=UPLOAD_PLAN, round=round_idx, sender=SERVER)
    _exact_fields(env, {"frame", "normalizer"})
    frame = PackingFrame.from_bytes(env.field("frame"), layout, round_idx=round_idx)
    norm = _f64(env, "normalizer")
    if not math.isfinite(norm) or norm < 0:
        raise MalformedMessageError(f"weight normalizer must be finite and >= 0, got {norm}", sender=SERVER)
    return UploadPlan(frame, norm)


# -- server -> key holder ------------------------------------------------------------------------
def encode_signed_upload(u: SignedUpload) -> bytes:
    """One signed upload, every field of the statement it signs, as bytes."""
    fields: dict[str, bytes] = {
        "party": _I64.pack(int(u.sender)),
        "frame": bytes(u.frame),
        "layers": encode_manifest(u.layers),
        "weight": _F64.pack(float(u.weight)),
        "scale": _F64.pack(float(u.prescale)),
        "chunks": pack_array(np.asarray(sorted(u.chunks), dtype=np.uint32)),
        "sig": bytes(u.signature),
    }
    for k in sorted(u.chunks):
        fields[ct_field(int(k))] = cast(bytes, u.chunks[k])  # a view stays a view: ``encode`` joins it once
    return encode(Envelope(SIGNED, int(u.round_idx), wire_id(u.sender), fields))


def decode_signed_upload(data: bytes, *, max_bytes: int) -> SignedUpload:
    """Inverse of ``encode_signed_upload``; the key holder then verifies the signature itself."""
    env = decode(data, sender=SERVER, max_bytes=max_bytes)
    if env.kind != SIGNED:
        raise MalformedMessageError(f"expected a {SIGNED!r} message, got {env.kind!r}", sender=SERVER)
    party = _i64(env, "party")
    try:
        names = env.field("layers").decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessageError("layer manifest is not UTF-8", sender=SERVER) from None
    chunks = tuple(int(k) for k in unpack_array(env.field("chunks"), sender=SERVER))
    if len(set(chunks)) != len(chunks):
        raise MalformedMessageError("an upload lists a chunk twice", sender=SERVER)
    _exact_fields(env, {"party", "frame", "layers", "weight", "scale", "chunks", "sig"} | {ct_field(k) for k in chunks})
    sig = env.field("sig")
    if len(sig) != SIGNATURE_BYTES:
        raise MalformedMessageError("an upload's signature must be 64 bytes", sender=SERVER)
    return SignedUpload(party, int(env.round), env.field("frame"), tuple(names.split("\n")) if names else (),
                        _f64(env, "weight"), _f64(env, "scale"), {k: env.field(ct_field(k)) for k in chunks}, sig)


def _uploads_fields(uploads: Sequence[SignedUpload]) -> dict[str, bytes]:
    fields = {"n": struct.pack(">I", len(uploads))}
    for i, u in enumerate(uploads):
        fields[f"up.{i}"] = encode_signed_upload(u)
    return fields


def _uploads(env: Envelope, max_bytes: int) -> tuple[SignedUpload, ...]:
    raw = env.field("n")
    if len(raw) != 4:
        raise MalformedMessageError("upload count must be 4 bytes", sender=SERVER)
    (n,) = struct.unpack(">I", raw)
    if n > len(env.fields):
        raise MalformedMessageError("upload count exceeds the message's fields", sender=SERVER)
    return tuple(decode_signed_upload(env.field(f"up.{i}"), max_bytes=max_bytes) for i in range(n))


def encode_gram_request(req: GramRequest) -> bytes:
    fields = {"frame": req.frame.to_bytes(req.round_idx), **_uploads_fields(req.uploads)}
    if req.reference is not None:
        fields["ref"] = encode_signed_upload(req.reference)
    return encode(Envelope(GRAM_REQ, req.round_idx, SERVER, fields))


def decode_gram_request(data: bytes, round_idx: int, layout: LayerLayout, *, max_bytes: int) -> GramRequest:
    env = decode(data, sender=SERVER, max_bytes=max_bytes).expect(kind=GRAM_REQ, round=round_idx, sender=SERVER)
    frame = PackingFrame.from_bytes(env.field("frame"), layout, round_idx=round_idx)
    uploads = _uploads(env, max_bytes)
    ref = decode_signed_upload(env.fields["ref"], max_bytes=max_bytes) if "ref" in env.fields else None
    _exact_fields(env, {"frame", "n"} | {f"up.{i}" for i in range(len(uploads))} | ({"ref"} if ref else set()))
    return GramRequest(round_idx, frame, uploads, ref)


def encode_aggregate_request(req: AggregateRequest) -> bytes:
    coeffs = dict(req.coefficients)
    fields = {
        "frame": req.frame.to_bytes(req.round_idx),
        **_uploads_fields(req.uploads),
        "parties": pack_array(np.asarray(list(coeffs), dtype=np.int64)),
        "coeffs": pack_array(np.asarray([float(coeffs[c]) for c in coeffs], dtype=np.float64)),
    }
    if req.chunks is not None:
        fields["wanted"] = pack_array(np.asarray(req.chunks, dtype=np.uint32))
    return encode(Envelope(AGG_REQ, req.round_idx, SERVER, fields))


def decode_aggregate_request(data: bytes, round_idx: int, layout: LayerLayout, *, max_bytes: int) -> AggregateRequest:
    env = decode(data, sender=SERVER, max_bytes=max_bytes).expect(kind=AGG_REQ, round=round_idx, sender=SERVER)
    frame = PackingFrame.from_bytes(env.field("frame"), layout, round_idx=round_idx)
    uploads = _uploads(env, max_bytes)
    parties = [int(p) for p in unpack_array(env.field("parties"), sender=SERVER)]
    coeffs = [float(c) for c in unpack_array(env.field("coeffs"), expected_len=len(parties), sender=SERVER)]
    if len(set(parties)) != len(parties):
        raise MalformedMessageError("a coefficient names a party twice", sender=SERVER)
    wanted = None
    if "wanted" in env.fields:
        wanted = tuple(int(k) for k in unpack_array(env.fields["wanted"], sender=SERVER))
    names = {"frame", "n", "parties", "coeffs"} | {f"up.{i}" for i in range(len(uploads))}
    _exact_fields(env, names | ({"wanted"} if wanted is not None else set()))
    return AggregateRequest(round_idx, frame, uploads, dict(zip(parties, coeffs)), wanted)


# -- key holder -> server ------------------------------------------------------------------------
@dataclass(frozen=True)
class Blame:
    """The key holder could not verify one party's upload: nothing was decrypted."""

    party: int
    error: str
    reason: str


def encode_gram(round_idx: int, sender: int, gram: Gram) -> bytes:
    fields = {
        "ids": pack_array(np.asarray(gram.client_ids, dtype=np.int64)),
        "inner": pack_array(gram.inner.detach().to(torch.float64).numpy().reshape(-1)),
    }
    if gram.reference is not None:
        fields["ref"] = pack_array(gram.reference.detach().to(torch.float64).numpy())
        fields["refsq"] = _F64.pack(float(gram.reference_sq_norm or 0.0))
    return encode(Envelope(GRAM, round_idx, wire_id(sender), fields))


def decode_gram(env: Envelope, sender: int) -> Gram:
    ids = tuple(int(c) for c in unpack_array(env.field("ids"), sender=sender))
    n = len(ids)
    inner = unpack_array(env.field("inner"), expected_len=n * n, sender=sender).reshape(n, n)
    has_ref = "ref" in env.fields
    _exact_fields(env, {"ids", "inner"} | ({"ref", "refsq"} if has_ref else set()))
    if not has_ref:
        return Gram(ids, torch.from_numpy(inner.copy()), None, None)
    ref = unpack_array(env.field("ref"), expected_len=n, sender=sender)
    return Gram(ids, torch.from_numpy(inner.copy()), torch.from_numpy(ref.copy()), _f64(env, "refsq"))


def encode_chunks(round_idx: int, sender: int, chunks: Mapping[int, np.ndarray]) -> bytes:
    order = sorted(chunks)
    values = np.concatenate([np.asarray(chunks[k], dtype=np.float64) for k in order]) if order else np.zeros(0)
    fields = {"chunks": pack_array(np.asarray(order, dtype=np.uint32)), "values": pack_array(values)}
    return encode(Envelope(CHUNKS, round_idx, wire_id(sender), fields))


def decode_chunks(env: Envelope, sender: int, slots: int) -> dict[int, np.ndarray]:
    _exact_fields(env, {"chunks", "values"})
    order = [int(k) for k in unpack_array(env.field("chunks"), sender=sender)]
    values = unpack_array(env.field("values"), expected_len=len(order) * slots, sender=sender)
    return {k: values[i * slots : (i + 1) * slots].astype(np.float64) for i, k in enumerate(order)}


def encode_blame(round_idx: int, sender: int, error: ProtocolError) -> bytes:
    if error.sender is None:
        raise ValueError("a blame names the party whose upload failed")
    fields = {"party": _I64.pack(int(error.sender)), "error": type(error).__name__.encode("ascii"),
              "reason": str(error).encode("utf-8")}
    return encode(Envelope(BLAME, round_idx, wire_id(sender), fields))


def decode_reply(data: bytes, round_idx: int, sender: int, *, expect: str) -> Envelope | Blame:
    """A key-holder reply: the envelope of kind ``expect`` (``GRAM`` or ``CHUNKS``), or a ``Blame``."""
    env = decode(data, sender=sender)
    if env.kind == BLAME:
        env.expect(kind=BLAME, round=round_idx, sender=wire_id(sender))
        _exact_fields(env, {"party", "error", "reason"})
        try:
            return Blame(_i64(env, "party"), env.field("error").decode("ascii"), env.field("reason").decode("utf-8"))
        except UnicodeDecodeError:
            raise MalformedMessageError("a blame's text is not UTF-8", sender=sender) from None
    return env.expect(kind=expect, round=round_idx, sender=wire_id(sender))
