"""A curious server against the CKKS key holder, its requests drawn by hypothesis.

The server holds the public context, every client's signed upload of the round (real TenSEAL
ciphertexts, real Ed25519 signatures) and whatever it can make itself: its own ciphertexts
(a dot product with a basis vector, say), its own signing key, altered copies of the uploads.
Hypothesis draws a sequence of requests per round: linear combinations over any subset (with
repeats) and any coefficients, any chunks, another round or frame, altered or re-attributed
uploads, bare ciphertexts with a claimed contributor count, Gram queries over any subset with
any reference.

Property: every request either raises ``PolicyViolation`` / ``DecryptionError`` (typed, nothing
decrypted) or returns exactly ``sum_i c_i * prescale_i * u_i`` over the round's genuine uploads
with every decrypted layer combining at least ``min_contributors`` clients of non-negligible
share and none above ``max_share`` (checked here from the ground truth, not with the library's
own policy code), each chunk at most once per round; a Gram is returned only as the true
inner products of >= ``min_contributors`` genuine uploads (and of the reference party's
signed reference), once per round.

The key holder is its own party: the same requests also reach it as bytes through its half
(``CKKSKeyHolderHalf``), and a server may send that half *any* bytes (random, truncated,
bit-flipped encodings of an honest request): it raises a typed ``ProtocolError`` or answers with
exactly what the decoded request may have, checked against the same ground truth.

CI runs 60 + 20 + 25 examples (about 15 s); ``SECUREFML_SLOW=1 pytest -m slow`` runs 600 more.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os

import numpy as np
import pytest
import tenseal as ts
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securefml.errors import DecryptionError, PolicyViolation, ProtocolError
from securefml.protocols.base import ClientUpdate
from securefml.protocols.ckks import CKKS, KEY_HOLDER_PARTY, REFERENCE_PARTY
from securefml.protocols.ckks_auth import SignedUpload, UploadSigner
from securefml.protocols.ckks_codec import (
    CHUNKS,
    GRAM,
    Blame,
    decode_aggregate_request,
    decode_chunks,
    decode_gram,
    decode_gram_request,
    decode_reply,
    encode_aggregate_request,
    encode_gram_request,
)
from securefml.protocols.ckks_key_holder_half import DECRYPT_STAGE, GRAM_STAGE, CKKSKeyHolderHalf
from securefml.protocols.ckks_keys import CKKSKeyHolder
from securefml.protocols.ckks_policy import AggregateRequest, GramRequest
from securefml.protocols.ckks_stats import PackingFrame
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("a.weight", (3, 4)), ("a.bias", (3,)), ("b.weight", (5,))])
FULL = ("a", "b")
N_CLIENTS = 4
MIN_CONTRIBUTORS = 2
MAX_SHARE = 0.5
NEGLIGIBLE = 1e-3
ROUNDS = itertools.count(1)
REFUSED = (PolicyViolation, DecryptionError)
OUTCOMES = {"refused": 0, "decrypted": 0, "gram refused": 0, "gram decrypted": 0}  # how often each branch ran
TOL = 1e-3  # CKKS error on these small sums and inner products is far below this

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def driver() -> CKKS:
    kh = CKKSKeyHolder.generate("stats", min_contributors=MIN_CONTRIBUTORS)
    proto = CKKS(kh)
    for cid in range(N_CLIENTS):
        proto.enroll(cid)
    proto.enroll(REFERENCE_PARTY)
    return proto


@dataclasses.dataclass
class Round:
    idx: int
    frame: PackingFrame
    uploads: dict[int, SignedUpload]
    truth: dict[int, np.ndarray]  # the frame-packed plaintext each client encrypted (prescaled)
    reference: SignedUpload
    ref_truth: np.ndarray


def make_round(driver: CKKS, layer_sets, prescales, seed: int) -> Round:
    idx = next(ROUNDS)
    frame = PackingFrame(LAYOUT, FULL, driver.preset.slots)
    rng = np.random.default_rng(seed)
    uploads, truth = {}, {}
    for cid in range(N_CLIENTS):
        layers = LAYOUT.canonical(layer_sets[cid])
        vec = torch.from_numpy(rng.uniform(-1, 1, LAYOUT.numel_of(layers)))
        upd = ClientUpdate(cid, vec.to(torch.float32), layers, 1.0)
        uploads[cid] = driver.client.encrypt(idx, upd, frame, signer=driver.enroll(cid), prescale=prescales[cid])
        packed = frame.pack(vec.to(torch.float32).double().numpy(), layers)
        truth[cid] = np.concatenate([packed.get(0, np.zeros(frame.slots))]) * prescales[cid]
    r = torch.from_numpy(rng.uniform(-1, 1, LAYOUT.numel)).to(torch.float32)
    ref = driver.client.encrypt(idx, ClientUpdate(REFERENCE_PARTY, r, FULL, 1.0), frame,
                                signer=driver.enroll(REFERENCE_PARTY))
    return Round(idx, frame, uploads, truth, ref, frame.pack(r.double().numpy(), FULL)[0])


def allowed(rnd: Round, coeffs: dict[int, float], chunks) -> bool:
    """The stated policy, recomputed from the ground truth (independent of the library's code)."""
    if any(not math.isfinite(c) or c < 0 for c in coeffs.values()):
        return False
    for name in FULL:
        eff = {c: w * rnd.uploads[c].prescale for c, w in coeffs.items() if name in rnd.uploads[c].layers}
        eff = {c: w for c, w in eff.items() if w > 1e-9}
        if not any(name in rnd.uploads[c].layers for c in coeffs):
            continue
        total = sum(eff.values())
        if total <= 0:
            return False
        shares = [w / total for w in eff.values()]
        if sum(s >= NEGLIGIBLE for s in shares) < MIN_CONTRIBUTORS or max(shares) > MAX_SHARE + 1e-12:
            return False
    return True


layer_sets = st.one_of(  # everyone sends every layer (robust rounds), or each client its own layers
    st.just([FULL] * N_CLIENTS),
    st.lists(st.sampled_from([FULL, ("a",), ("b",)]), min_size=N_CLIENTS, max_size=N_CLIENTS),
)
prescales = st.one_of(  # equal weights (mostly allowed), mild spread, or a skew the policy must catch
    st.floats(0.01, 1.0).map(lambda p: [p] * N_CLIENTS),
    st.lists(st.sampled_from([1.0, 0.5, 0.25]), min_size=N_CLIENTS, max_size=N_CLIENTS),
    st.lists(st.sampled_from([1.0, 0.5, 0.25, 0.01, 1e-5]), min_size=N_CLIENTS, max_size=N_CLIENTS),
)
coefficient = st.one_of(
    st.sampled_from([0.0, 1e-12, 1e-4, 1.0, -1.0, 1e6, float("nan"), float("inf")]),
    st.floats(0.0, 3.0, allow_nan=False),
)


@st.composite
def aggregate_requests(draw, rnd: Round, ctx_fp: bytes):
    """One request a deviating server might send (``ctx_fp``: the public context's fingerprint)."""
    kind = draw(st.sampled_from(["honest", "subset", "combination", "tampered", "foreign", "legacy", "wrong-frame",
                                 "garbage"]))
    if kind == "garbage":  # fields of the wrong type altogether
        junk = draw(st.sampled_from([{"coefficients": {"x": "y"}}, {"round_idx": str(rnd.idx)},
                                     {"chunks": ("zero",)}, {"uploads": [b"ct"]}, {"frame": None},
                                     {"uploads": (dataclasses.replace(rnd.uploads[0], sender="0"), rnd.uploads[1])},
                                     {"uploads": (dataclasses.replace(rnd.uploads[0], chunks={0: "ct"}),
                                                  rnd.uploads[1])}]))
        base = dict(round_idx=rnd.idx, frame=rnd.frame, uploads=tuple(rnd.uploads.values()),
                    coefficients=dict.fromkeys(rnd.uploads, 1.0), chunks=None)
        base.update(junk)
        return ("request", AggregateRequest(**base), None)
    if kind in ("honest", "subset"):  # distinct senders, the right round: the policy decides
        ids = draw(st.lists(st.integers(0, N_CLIENTS - 1), min_size=1 if kind == "subset" else 2,
                            max_size=N_CLIENTS, unique=True))
        weight = st.floats(0.9, 1.1) if kind == "honest" else coefficient
        coeffs = {i: draw(weight) for i in ids}
        chunks, round_idx = None, rnd.idx
    else:
        ids = draw(st.lists(st.integers(0, N_CLIENTS - 1), min_size=0, max_size=N_CLIENTS + 1))
        coeffs = {i: draw(coefficient) for i in set(ids)}
        if draw(st.booleans()):  # claim a client that sent nothing in this request
            coeffs[draw(st.integers(0, N_CLIENTS))] = draw(coefficient)
        chunks = draw(st.sampled_from([None, (0,), (0, 0), (1,), ()]))
        round_idx = rnd.idx if draw(st.integers(0, 5)) else rnd.idx + draw(st.sampled_from([-1, 1]))
    uploads = [rnd.uploads[i] for i in ids]
    frame = rnd.frame
    if kind == "tampered" and uploads:  # alter a signed field without re-signing
        i = draw(st.integers(0, len(uploads) - 1))
        field = draw(st.sampled_from(["prescale", "weight", "layers", "sender", "round_idx"]))
        change = {"prescale": uploads[i].prescale * 100, "weight": uploads[i].weight + 1,
                  "layers": ("a",) if uploads[i].layers != ("a",) else FULL,
                  "sender": (uploads[i].sender + 1) % N_CLIENTS, "round_idx": uploads[i].round_idx + 1}[field]
        uploads[i] = dataclasses.replace(uploads[i], **{field: change})
    if kind == "foreign" and uploads:  # the server signs its own ciphertexts in a client's name
        i = draw(st.integers(0, len(uploads) - 1))
        u = uploads[i]
        fake = UploadSigner.generate(u.sender)
        uploads[i] = fake.sign(context=ctx_fp, round_idx=u.round_idx, frame=u.frame, layers=u.layers,
                               weight=1.0, prescale=1.0, chunks=u.chunks)
    if kind == "wrong-frame":
        frame = PackingFrame(LAYOUT, ("a",), rnd.frame.slots)
    if kind == "legacy":
        return ("legacy", [u.chunks[0] for u in uploads if 0 in u.chunks], draw(st.integers(0, 10)))
    return ("request", AggregateRequest(round_idx, frame, tuple(uploads), coeffs, chunks), None)


@settings(max_examples=60, **SETTINGS)
@given(layer_sets, prescales, st.integers(0, 2**16), st.data())
def test_curious_server_gets_only_policy_combinations(driver, sets, scales, seed, data):
    check_combinations(driver, sets, scales, seed, data)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SECUREFML_SLOW"), reason="long run: SECUREFML_SLOW=1 pytest -m slow")
@settings(max_examples=600, **SETTINGS)
@given(layer_sets, prescales, st.integers(0, 2**16), st.data())
def test_curious_server_gets_only_policy_combinations_long(driver, sets, scales, seed, data):
    check_combinations(driver, sets, scales, seed, data)


def through_half(kh: CKKSKeyHolder, round_idx: int, stage: str, payload: bytes):
    """Send ``payload`` to the key holder's half; a blame (nothing decrypted) counts as refused."""
    reply = CKKSKeyHolderHalf(kh, LAYOUT, round_idx=round_idx).respond(stage, payload)
    got = decode_reply(reply, round_idx, KEY_HOLDER_PARTY, expect=CHUNKS if stage == DECRYPT_STAGE else GRAM)
    if isinstance(got, Blame):
        raise DecryptionError(got.reason, sender=got.party)
    if stage == DECRYPT_STAGE:
        return decode_chunks(got, KEY_HOLDER_PARTY, kh.preset.slots)
    return decode_gram(got, KEY_HOLDER_PARTY)


def encoded(encode, req) -> bytes | None:
    """The request's bytes, or None when it is not even encodable (ill-typed fields)."""
    try:
        return encode(req)
    except Exception:
        return None


def check_combinations(driver, sets, scales, seed, data):
    kh = driver.key_holder
    rnd = make_round(driver, sets, scales, seed)
    spent: set[int] = set()
    for _ in range(data.draw(st.integers(1, 3), label="requests")):
        kind, req, claim = data.draw(aggregate_requests(rnd, kh.fingerprint), label="request")
        if kind == "legacy":
            with pytest.raises(REFUSED):
                kh.decrypt_aggregate(req, contributors=claim)
            continue
        payload = encoded(encode_aggregate_request, req) if data.draw(st.booleans(), label="as bytes") else None
        try:
            if payload is None:
                out = kh.decrypt_aggregate(req)
            else:  # through the key holder's half; it decodes what it checks from the bytes alone
                out = through_half(kh, rnd.idx, DECRYPT_STAGE, payload)
                req = decode_aggregate_request(payload, req.round_idx, LAYOUT, max_bytes=1 << 30)
        except (*REFUSED, ProtocolError):
            OUTCOMES["refused"] += 1
            continue
        OUTCOMES["decrypted"] += 1
        # returned: it must be a policy-satisfying combination of genuine uploads of this round
        assert req.round_idx == rnd.idx and req.frame == rnd.frame
        senders = [u.sender for u in req.uploads]
        assert len(set(senders)) == len(senders) and set(req.coefficients) == set(senders)
        for u in req.uploads:
            assert u == rnd.uploads[u.sender]  # not an altered or re-signed copy
        coeffs = {c: float(w) for c, w in req.coefficients.items()}
        assert allowed(rnd, coeffs, req.chunks)
        assert set(out) <= {0} and not (set(out) & spent)
        spent |= set(out)
        if 0 in out:
            expected = sum(coeffs[c] * rnd.truth[c] for c in coeffs if coeffs[c] > 1e-9 and 0 in rnd.uploads[c].chunks)
            assert np.abs(out[0] - expected).max() < TOL * max(1.0, max(coeffs.values()))


@st.composite
def gram_requests(draw, rnd: Round, ctx: ts.Context, ctx_fp: bytes):
    full = [c for c, u in rnd.uploads.items() if u.layers == FULL]
    if full and draw(st.integers(0, 3)):  # distinct clients that filled every layer: the policy decides
        ids = draw(st.lists(st.sampled_from(full), min_size=min(2, len(full)), max_size=len(full), unique=True))
    else:
        ids = draw(st.lists(st.integers(0, N_CLIENTS - 1), min_size=0, max_size=N_CLIENTS + 1))
    uploads = [rnd.uploads[i] for i in ids]
    ref_kind = draw(st.sampled_from(["none", "party", "party", "client-as-reference", "relabelled", "server-signed"]))
    ref = None
    if ref_kind == "party":
        ref = rnd.reference
    elif ref_kind == "client-as-reference":
        ref = rnd.uploads[draw(st.integers(0, N_CLIENTS - 1))]
    elif ref_kind == "relabelled":  # a client's ciphertexts presented as the reference party's
        ref = dataclasses.replace(rnd.uploads[draw(st.integers(0, N_CLIENTS - 1))], sender=REFERENCE_PARTY)
    elif ref_kind == "server-signed":  # e_j encrypted and signed by the server in the party's name
        e = [0.0] * rnd.frame.slots
        e[draw(st.integers(0, LAYOUT.numel - 1))] = 1.0
        blob = ts.ckks_vector(ctx, e).serialize()
        ref = UploadSigner.generate(REFERENCE_PARTY).sign(
            context=ctx_fp, round_idx=rnd.idx, frame=rnd.frame.fingerprint(),
            layers=FULL, weight=1.0, prescale=1.0, chunks={0: blob})
    round_idx = rnd.idx if draw(st.integers(0, 5)) else rnd.idx + 1
    return GramRequest(round_idx, rnd.frame, tuple(uploads), ref)


def check_gram(rnd: Round, req: GramRequest, gram) -> None:
    """A returned Gram is the true inner products of >= min_contributors genuine full uploads."""
    ids = [u.sender for u in req.uploads]
    assert req.round_idx == rnd.idx and len(set(ids)) == len(ids) >= MIN_CONTRIBUTORS
    for u in req.uploads:
        assert u == rnd.uploads[u.sender] and u.layers == FULL
    x = np.stack([rnd.truth[c] for c in ids])
    assert np.abs(gram.inner.numpy() - x @ x.T).max() < TOL
    if req.reference is None:
        assert gram.reference is None
    else:
        assert req.reference == rnd.reference  # only the reference party's signed upload
        assert np.abs(gram.reference.numpy() - x @ rnd.ref_truth).max() < TOL
        assert abs(gram.reference_sq_norm - float(rnd.ref_truth @ rnd.ref_truth)) < TOL


@settings(max_examples=20, **SETTINGS)
@given(layer_sets, st.integers(0, 2**16), st.data())
def test_curious_server_gets_only_the_signed_uploads_gram(driver, sets, seed, data):
    kh = driver.key_holder
    rnd = make_round(driver, sets, [1.0] * N_CLIENTS, seed)
    got_gram = False
    for _ in range(data.draw(st.integers(1, 2), label="requests")):
        req = data.draw(gram_requests(rnd, driver.client.context, kh.fingerprint), label="gram request")
        payload = encoded(encode_gram_request, req) if data.draw(st.booleans(), label="as bytes") else None
        try:
            if payload is None:
                gram = kh.decrypt_gram(req)
            else:
                gram = through_half(kh, rnd.idx, GRAM_STAGE, payload)
                req = decode_gram_request(payload, req.round_idx, LAYOUT, max_bytes=1 << 30)
        except (*REFUSED, ProtocolError):
            OUTCOMES["gram refused"] += 1
            continue
        OUTCOMES["gram decrypted"] += 1
        assert not got_gram  # one Gram per round
        got_gram = True
        check_gram(rnd, req, gram)


def mutate(draw, payload: bytes) -> bytes:
    how = draw(st.sampled_from(["none", "random", "flip", "flip-header", "truncate", "extend"]))
    if how == "none":
        return payload
    if how == "random":
        return draw(st.binary(min_size=0, max_size=512))
    # positions as fractions: the payload's length varies with the (randomized) ciphertexts
    if how == "truncate":
        return payload[: int(draw(st.floats(0, 1, exclude_max=True)) * len(payload))]
    if how == "extend":
        return payload + draw(st.binary(min_size=1, max_size=16))
    # a flip anywhere (mostly ciphertext bytes), or in the first and last 2 KiB (framing,
    # coefficients, chunk lists, signatures)
    span = len(payload) if how == "flip" else 2048
    pos = int(draw(st.floats(0, 1, exclude_max=True)) * span)
    if how == "flip-header" and draw(st.booleans()):
        pos = len(payload) - 1 - pos
    return payload[:pos] + bytes([payload[pos] ^ draw(st.integers(1, 255))]) + payload[pos + 1 :]


@settings(max_examples=25, **SETTINGS)
@given(st.sampled_from([DECRYPT_STAGE, GRAM_STAGE]), st.integers(0, 2**16), st.data())
def test_any_bytes_sent_to_the_key_holder_half_reveal_nothing_outside_the_policy(driver, stage, seed, data):
    """The server half may send the key holder's half any bytes: typed refusal, or an allowed answer."""
    kh = driver.key_holder
    rnd = make_round(driver, [FULL] * N_CLIENTS, [0.25] * N_CLIENTS, seed)
    everyone = tuple(rnd.uploads.values())
    if stage == DECRYPT_STAGE:
        payload = encode_aggregate_request(AggregateRequest(rnd.idx, rnd.frame, everyone,
                                                            dict.fromkeys(rnd.uploads, 1.0)))
    else:
        payload = encode_gram_request(GramRequest(rnd.idx, rnd.frame, everyone, rnd.reference))
    sent = mutate(data.draw, payload)
    try:
        out = through_half(kh, rnd.idx, stage, sent)
    except ProtocolError:
        assert sent != payload, "the honest request must be answered"
        OUTCOMES["refused"] += 1
        return
    OUTCOMES["decrypted"] += 1
    # it answered: the bytes decode to a request the stated policy allows, answered truthfully
    if stage == GRAM_STAGE:
        check_gram(rnd, decode_gram_request(sent, rnd.idx, LAYOUT, max_bytes=1 << 30), out)
        return
    req = decode_aggregate_request(sent, rnd.idx, LAYOUT, max_bytes=1 << 30)
    assert req.frame == rnd.frame
    for u in req.uploads:
        assert u == rnd.uploads[u.sender]
    coeffs = {c: float(w) for c, w in req.coefficients.items()}
    assert allowed(rnd, coeffs, req.chunks)
    expected = sum(coeffs[c] * rnd.truth[c] for c in coeffs if coeffs[c] > 1e-9)
    assert np.abs(out[0] - expected).max() < TOL * max(1.0, max(coeffs.values()))


def test_server_made_basis_probe_and_differences_are_refused(driver):
    """The two concrete extractions of finding 4, through the signed API: all refused."""
    kh = driver.key_holder
    rnd = make_round(driver, [FULL] * N_CLIENTS, [0.25] * N_CLIENTS, 7)
    one = AggregateRequest(rnd.idx, rnd.frame, (rnd.uploads[0],), {0: 1.0})
    with pytest.raises(PolicyViolation, match="non-negligible"):
        kh.decrypt_aggregate(one)
    # u0 plus a negligible sliver of u1 is still one client's update
    sliver = AggregateRequest(rnd.idx, rnd.frame, (rnd.uploads[0], rnd.uploads[1]), {0: 1.0, 1: 1e-6})
    with pytest.raises(PolicyViolation):
        kh.decrypt_aggregate(sliver)
    # an honest sum is decrypted once; the same sum minus a client (a difference attack) is not
    everyone = AggregateRequest(rnd.idx, rnd.frame, tuple(rnd.uploads.values()), dict.fromkeys(rnd.uploads, 1.0))
    out = kh.decrypt_aggregate(everyone)
    assert np.abs(out[0] - sum(rnd.truth.values())).max() < TOL
    rest = AggregateRequest(rnd.idx, rnd.frame, tuple(rnd.uploads[c] for c in (1, 2, 3)), dict.fromkeys((1, 2, 3), 1.0))
    with pytest.raises(PolicyViolation, match="already decrypted"):
        kh.decrypt_aggregate(rest)
