"""CKKS protocol: roles, packing, weighted sums, encrypted Gram, and rejection of bad messages."""

from __future__ import annotations

import struct

import pytest
import tenseal as ts
import torch

from securefml.defenses.base import AggregationResult, Defense
from securefml.defenses.mean import Mean
from securefml.errors import (
    ConfigError,
    DecryptionError,
    InvalidUpdateError,
    MalformedMessageError,
    PolicyViolation,
    ProtocolError,
    ReplayError,
)
from securefml.gram import Gram
from securefml.protocols.base import ClientUpdate, HalvesSetup, Reveals, Transport, weighted_layer_mean
from securefml.protocols.ckks import CKKS, CKKSClient, CKKSServer
from securefml.protocols.ckks_auth import UploadSigner
from securefml.protocols.ckks_keys import PRESETS, CKKSKeyHolder, get_preset, load_public_context
from securefml.protocols.ckks_policy import AggregateRequest
from securefml.protocols.ckks_stats import (
    PackingFrame,
    encrypted_inner_products,
    inner_product_error_bound,
    naive_inner_product,
    sum_error_bound,
)
from securefml.protocols.wire import Envelope, decode, encode
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("a.weight", (30, 150)), ("a.bias", (30,)), ("b.weight", (10, 30)), ("b.bias", (10,))])


class DropLargest(Defense):
    """Test-only geometry rule: drop the client with the largest norm, weighted mean of the rest."""

    name = "droplargest"
    runs_on = frozenset({Reveals.UPDATES, Reveals.GRAM})

    def aggregate(self, updates, weights, client_ids, *, context):
        res = self.aggregate_gram(Gram.from_updates(updates, client_ids), weights)
        res.aggregate = (res.weights[:, None] * updates.to(torch.float64)).sum(0)
        return res

    def aggregate_gram(self, gram, weights=None, *, context=None):
        w = torch.ones(gram.n, dtype=torch.float64) if weights is None else weights.clone().to(torch.float64)
        i = int(torch.argmax(gram.sq_norms))
        w[i] = 0
        return AggregationResult(None, gram.client_ids, weights=w / w.sum(), flagged=(gram.client_ids[i],))


class CoordinatesOnly(Defense):
    name = "coords"
    runs_on = frozenset({Reveals.UPDATES})

    def aggregate(self, updates, weights, client_ids, *, context):  # pragma: no cover - never reached
        raise AssertionError


@pytest.fixture(scope="module")
def stats_holder() -> CKKSKeyHolder:
    return CKKSKeyHolder.generate("stats")


@pytest.fixture(scope="module")
def add_holder() -> CKKSKeyHolder:
    return CKKSKeyHolder.generate("add-only")


@pytest.fixture(scope="module")
def stats_proto(stats_holder) -> CKKS:
    return CKKS(stats_holder)


@pytest.fixture(scope="module")
def add_proto(add_holder) -> CKKS:
    return CKKS(add_holder)


def make_updates(sets, *, seed=0, scale=1.0, equal=False):
    g = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(i, torch.randn(LAYOUT.numel_of(s), generator=g) * scale, LAYOUT.canonical(s),
                     1.0 if equal else float(i + 1))
        for i, s in enumerate(sets)
    ]


def reference_mean(updates, min_contributors=2):
    agg, totals = weighted_layer_mean(LAYOUT, [u.vector for u in updates], [u.layers for u in updates],
                                      [u.weight for u in updates])
    counts = {n: sum(n in u.layers for u in updates) for n in LAYOUT.layer_names}
    for n, s in LAYOUT.slices().items():
        if counts[n] < min_contributors:
            agg[s] = 0
            totals[n] = 0.0
    return agg, totals


# -- roles -------------------------------------------------------------------------------------------
def test_server_and_client_hold_no_secret_key(stats_proto, stats_holder):
    assert stats_proto.server.is_private() is False
    assert not stats_proto.server.context.has_secret_key()
    assert not stats_proto.client.context.is_private()
    assert stats_proto.server.context.has_galois_keys() and stats_proto.server.context.has_relin_keys()
    # the public bytes never carry the secret key: loading them gives a public context
    assert not ts.context_from(stats_holder.public_context_bytes()).is_private()
    # and the server refuses a context that does
    secret = stats_holder._ctx.serialize(save_secret_key=True)
    with pytest.raises(ConfigError, match="secret key"):
        CKKSServer(secret, "stats")
    assert "secret" not in repr(stats_holder).lower() or "fingerprint" in repr(stats_holder)


def test_server_cannot_decrypt(stats_proto):
    ct = ts.ckks_vector(stats_proto.client.context, [1.0, 2.0])
    with pytest.raises(ValueError):
        ct.decrypt()


def test_presets_and_unknown_preset():
    assert PRESETS["add-only"].coeff_mod_bit_sizes == (60, 60) and not PRESETS["add-only"].statistics
    assert PRESETS["stats"].coeff_mod_bit_sizes == (60, 40, 40, 60) and PRESETS["stats"].statistics
    with pytest.raises(ConfigError, match="add-only"):
        get_preset("nope")


@pytest.mark.parametrize("name,lo,hi", [("add-only", 7.5, 8.6), ("stats", 19.0, 21.5)])
def test_bytes_per_float32(name, lo, hi, request):
    proto = request.getfixturevalue("add_proto" if name == "add-only" else "stats_proto")
    layout = LayerLayout([("w", (4 * proto.preset.slots,))])
    frame = PackingFrame(layout, ("w",), proto.preset.slots)
    msg = proto.client.encode(0, ClientUpdate(0, torch.randn(layout.numel), ("w",)), frame, signer=proto.enroll(0))
    assert lo < len(msg) / (4 * layout.numel) < hi


def test_key_holder_refuses_bare_ciphertexts_whatever_the_claim(stats_holder):
    ct = ts.ckks_vector(load_public_context(stats_holder.public_context_bytes()), [1.0, 2.0]).serialize()
    for claim in (1, 2, 100):
        with pytest.raises(PolicyViolation, match="signed uploads"):
            stats_holder.decrypt_aggregate([ct], contributors=claim)
    with pytest.raises(PolicyViolation, match="signed uploads"):
        stats_holder.decrypt_gram([0], {(0, 0): ct})


# -- packing -----------------------------------------------------------------------------------------
def test_frame_packs_densely_and_reports_utilisation(add_proto):
    slots = add_proto.preset.slots
    frame = PackingFrame(LAYOUT, ("b", "a"), slots)
    assert frame.layers == ("a", "b") and frame.n_chunks == -(-LAYOUT.numel // slots)
    assert frame.chunks_for(("a",)) == (0, 1) and frame.chunks_for(("b",)) == (1,)
    only_b = PackingFrame(LAYOUT, ("b",), slots)
    assert only_b.n_chunks == 1 and only_b.chunks_for(("b",)) == (0,)
    ups = make_updates([("a", "b")] * 3)
    out = add_proto.run_round(0, ups, LAYOUT, defense=Mean())
    assert out.extras["ciphertexts"] == 3 * frame.n_chunks
    assert out.extras["slot_utilisation"] == pytest.approx(LAYOUT.numel / (frame.n_chunks * slots))
    # the clients' announcements and uploads; the driver's count also has the key holder's replies
    assert out.bytes_uploaded > out.extras["bytes_uploaded"] > 0


# -- weighted mean -----------------------------------------------------------------------------------
@pytest.mark.parametrize("proto_name", ["add_proto", "stats_proto"])
def test_mean_over_client_chosen_layers_matches_plaintext(proto_name, request):
    proto = request.getfixturevalue(proto_name)
    ups = make_updates([("a", "b"), ("a",), ("a", "b"), ("b",)], seed=1)
    out = proto.run_round(1, ups, LAYOUT, defense=Mean())
    ref, totals = reference_mean(ups)
    assert out.accepted == (0, 1, 2, 3) and not out.rejected
    assert out.layer_weight == totals
    assert torch.allclose(out.aggregate.double(), ref.double(), atol=sum_error_bound(4, 5.0) * 10)
    assert out.extras["layer_counts"] == {"a": 3, "b": 3}
    for key in ("server_receive_s", "decrypt_s", "total_s"):  # the server's own clock (clients time themselves)
        assert out.extras["timing"][key] >= 0


def test_layer_sent_by_one_client_is_withheld_and_costs_nothing(add_proto):
    ups = make_updates([("a",), ("a",), ("b",)], seed=2, equal=True)
    out = add_proto.run_round(2, ups, LAYOUT, defense=Mean())
    assert out.layer_weight["b"] == 0 and out.layer_weight["a"] == 2.0
    assert torch.all(LAYOUT.gather(out.aggregate, ("b",)) == 0)
    assert out.extras["frame_layers"] == ("a",)
    assert out.accepted == (0, 1)  # client 2 had nothing to send


def test_min_contributors_one_aggregates_every_layer():
    proto = CKKS(preset="add-only", min_contributors=1)
    ups = make_updates([("a",), ("b",)], seed=3)
    out = proto.run_round(0, ups, LAYOUT, defense=Mean())
    ref, totals = reference_mean(ups, min_contributors=1)
    assert out.layer_weight == totals
    assert torch.allclose(out.aggregate.double(), ref.double(), atol=1e-4)


def test_dropout_and_nan_update_do_not_stop_the_round(add_proto):
    class Drop(Transport):
        def deliver(self, sender, stage, data):
            return None if sender == 1 else data

    ups = make_updates([("a", "b")] * 4, seed=4, equal=True)
    ups[3].vector[0] = float("nan")
    out = add_proto.run_round(3, ups, LAYOUT, defense=Mean(), transport=Drop())
    assert out.accepted == (0, 2)
    assert set(out.rejected) == {3} and "InvalidUpdateError" in out.rejected[3]
    ref, _ = reference_mean([ups[0], ups[2]])
    assert torch.allclose(out.aggregate.double(), ref.double(), atol=1e-4)


# -- robust (Gram) mode ------------------------------------------------------------------------------
def test_gram_mode_matches_plaintext_rule(stats_proto):
    ups = make_updates([("a", "b")] * 5, seed=5)
    ups[3].vector.mul_(8)
    ref_vec = torch.randn(LAYOUT.numel, generator=torch.Generator().manual_seed(9))
    out = stats_proto.run_round(4, ups, LAYOUT, defense=DropLargest(), reference=ref_vec)
    x = torch.stack([u.vector for u in ups])
    w = torch.tensor([u.weight for u in ups], dtype=torch.float64)
    expected = DropLargest()(x, w)
    assert out.flagged == (3,)
    assert torch.allclose(out.aggregate.double(), expected.aggregate, atol=sum_error_bound(5, 1.0) * 10)
    exact = Gram.from_updates(x, reference=ref_vec)
    got = out.extras["gram"]
    bound = inner_product_error_bound(LAYOUT.numel, float(x.abs().max()))
    assert torch.allclose(got.inner, exact.inner, atol=bound)
    assert torch.allclose(got.reference, exact.reference, atol=bound)
    assert got.reference_sq_norm == pytest.approx(exact.reference_sq_norm)
    assert out.layer_weight["a"] == float(w.sum() - w[3])
    assert out.extras["mode"] == "gram" and out.extras["timing"]["gram_s"] > 0


def test_gram_mode_requires_same_layers_and_statistics_keys(stats_proto, add_proto):
    ups = make_updates([("a", "b"), ("a",)], seed=6)
    with pytest.raises(ConfigError, match="same layers"):
        stats_proto.run_round(5, ups, LAYOUT, defense=DropLargest())
    with pytest.raises(ConfigError, match="statistics"):
        add_proto.run_round(5, make_updates([("a",)] * 2), LAYOUT, defense=DropLargest())
    with pytest.raises(ConfigError, match="cannot run under protocol"):
        stats_proto.run_round(5, make_updates([("a",)] * 2), LAYOUT, defense=CoordinatesOnly())


def test_multiply_accumulate_gram_equals_naive_dot_products():
    # a test-local secret context: the key holder itself offers no way to decrypt a bare ciphertext
    p = PRESETS["stats"]
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=p.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes))
    ctx.global_scale = p.scale
    ctx.generate_galois_keys()
    g = torch.Generator().manual_seed(7)
    layout = LayerLayout([("w", (3 * 4096 + 100,))])
    frame = PackingFrame(layout, ("w",), 4096)
    xs = [torch.randn(layout.numel, generator=g).double().numpy() for _ in range(2)]
    cts = [[ts.ckks_vector(ctx, c.tolist()) for c in frame.chunk_arrays(x)] for x in xs]
    fast = encrypted_inner_products(cts)
    slow = naive_inner_product(cts[0], cts[1])
    a = float(fast[(0, 1)].decrypt()[0])
    b = float(slow.decrypt()[0])
    assert a == pytest.approx(float(xs[0] @ xs[1]), abs=inner_product_error_bound(layout.numel, 5.0))
    assert a == pytest.approx(b, abs=inner_product_error_bound(layout.numel, 5.0))


# -- rejection of bad messages -----------------------------------------------------------------------
class Tamper(Transport):
    """Applies ``fn(sender, data)`` to the upload (stage ``"update"``) of the clients in ``targets``."""

    def __init__(self, targets, fn):
        self.targets, self.fn = set(targets), fn

    def deliver(self, sender, stage, data):
        return self.fn(sender, data) if sender in self.targets and stage == "update" else data


def _rebuild(data, **changes):
    env = decode(data)
    fields = dict(env.fields)
    fields.update(changes.pop("fields", {}))
    return encode(Envelope(env.kind, changes.get("round", env.round), changes.get("sender", env.sender), fields))


def resign(proto, data):
    """Re-sign a (modified) message with its sender's own enrolled key, as a Byzantine client can."""
    env = decode(data)
    frame_fp = env.fields["frame"]
    blobs = {int(k[3:]): bytes(v) for k, v in env.fields.items() if k.startswith("ct.")}
    layers = tuple(env.fields["layers"].decode().split("\n"))
    (scale,) = struct.unpack(">d", env.fields["scale"])
    (weight,) = struct.unpack(">d", env.fields["weight"])
    signed = proto.enroll(env.sender).sign(context=proto.client.fingerprint, round_idx=env.round, frame=frame_fp,
                                           layers=layers, weight=weight, prescale=scale, chunks=blobs)
    return _rebuild(data, fields={"sig": signed.signature})


def run_tampered(proto, round_idx, fn, *, targets=(1,), error=ProtocolError, match=None):
    ups = make_updates([("a", "b")] * 4, seed=10 + round_idx)
    out = proto.run_round(round_idx, ups, LAYOUT, defense=Mean(), transport=Tamper(targets, fn))
    assert set(out.rejected) == set(targets), out.rejected
    for t in targets:
        assert error.__name__ in out.rejected[t]
        if match:
            assert match in out.rejected[t]
    good = [u for u in ups if u.client_id not in targets]
    ref, _ = reference_mean(good)
    assert out.accepted == tuple(u.client_id for u in good)
    assert torch.allclose(out.aggregate.double(), ref.double(), atol=1e-4)
    return out


def test_rejects_ciphertext_from_another_context(add_proto):
    other = CKKSClient(CKKSKeyHolder.generate("add-only").public_context_bytes(), "add-only")
    frame = add_proto.frame_for(LAYOUT, [("a", "b")] * 4)

    def swap(sender, data):
        env = decode(data)
        upd = ClientUpdate(sender, torch.zeros(LAYOUT.numel), ("a", "b"), struct.unpack(">d", env.fields["weight"])[0])
        return other.encode(env.round, upd, frame, signer=UploadSigner.generate(sender))

    run_tampered(add_proto, 20, swap, match="another CKKS context")


def test_rejects_ciphertext_under_other_parameters_even_with_forged_fingerprint(add_proto, stats_holder):
    other = CKKSClient(stats_holder.public_context_bytes(), "stats")
    frame = add_proto.frame_for(LAYOUT, [("a", "b")] * 4)

    def forge(sender, data):
        env = decode(data)
        cts = {k: v for k, v in env.fields.items() if k.startswith("ct.")}
        forged = {k: ts.ckks_vector(other.context, [0.5] * 8).serialize() for k in cts}
        assert frame.n_chunks == len(cts)
        return _rebuild(data, fields=forged)

    run_tampered(add_proto, 21, forge, error=MalformedMessageError)


def test_rejects_other_round_and_other_sender(add_proto):
    run_tampered(add_proto, 22, lambda s, d: _rebuild(d, round=21), error=ReplayError, match="round")
    run_tampered(add_proto, 23, lambda s, d: _rebuild(d, sender=0), error=ReplayError, match="sender")


def test_rejects_duplicate_message_and_replayed_ciphertext(add_proto):
    ups = make_updates([("a", "b")] * 3, seed=30)
    halves = add_proto.round_halves(24, ups, LAYOUT, setup=HalvesSetup(Mean()))
    server, clients = halves.server, halves.clients
    opened = server.next_stage()
    announced = {c: clients[c].respond(opened.stage, msg) for c, msg in opened.messages.items()}
    for c, reply in announced.items():
        server.receive(c, reply)
    with pytest.raises(ReplayError, match="duplicate announcement"):
        server.receive(1, announced[1])
    server.close_stage()
    opened = server.next_stage()
    sent = clients[1].respond(opened.stage, opened.messages[1])
    server.receive(1, sent)
    with pytest.raises(ReplayError, match="duplicate message"):
        server.receive(1, sent)

    stolen = {}

    def steal(sender, data):
        if sender == 0:
            stolen.update({k: v for k, v in decode(data).fields.items() if k.startswith("ct.")})
            return data
        return resign(add_proto, _rebuild(data, fields=stolen))  # a Byzantine client signs what it stole

    ups = make_updates([("a", "b")] * 3, seed=31)
    out = add_proto.run_round(25, ups, LAYOUT, defense=Mean(), transport=Tamper({0, 2}, steal))
    assert set(out.rejected) == {2} and "replays one sent by client 0" in out.rejected[2]


def test_rejects_truncated_oversized_and_corrupt_blobs(add_proto):
    run_tampered(add_proto, 26, lambda s, d: d[: len(d) // 2], error=MalformedMessageError, match="truncated")
    run_tampered(add_proto, 27, lambda s, d: d + b"\x00" * 10, error=MalformedMessageError)
    huge = add_proto.server.max_message_bytes(add_proto.frame_for(LAYOUT, [("a", "b")] * 4)) + 1
    run_tampered(add_proto, 28, lambda s, d: d + b"\x00" * huge, error=MalformedMessageError, match="exceeds")

    def cut_ct(sender, data):
        ct = decode(data).fields["ct.0"]
        return _rebuild(data, fields={"ct.0": ct[: len(ct) - 100]})

    run_tampered(add_proto, 29, cut_ct, error=MalformedMessageError, match="does not load")

    def big_ct(sender, data):
        ct = decode(data).fields["ct.0"]
        pad = add_proto.preset.max_ciphertext_bytes + 1 - len(ct)
        return _rebuild(data, fields={"ct.0": ct + b"\x00" * pad})

    run_tampered(add_proto, 30, big_ct, error=MalformedMessageError, match="oversized")


def test_rejects_wrong_chunks_weight_and_manifest(add_proto):
    run_tampered(add_proto, 31, lambda s, d: _rebuild(d, fields={"weight": struct.pack(">d", -1.0)}),
                 error=MalformedMessageError, match="weight")
    run_tampered(add_proto, 32, lambda s, d: _rebuild(d, fields={"layers": b"b"}), error=MalformedMessageError)
    run_tampered(add_proto, 33, lambda s, d: _rebuild(d, fields={"layout": b"x" * 16}), match="layout")


def test_nan_client_vector_is_refused_before_encryption(add_proto):
    frame = add_proto.frame_for(LAYOUT, [("a",)] * 2)
    bad = ClientUpdate(5, torch.full((LAYOUT.numel_of(("a",)),), float("inf")), ("a",))
    with pytest.raises(InvalidUpdateError):
        add_proto.client.encode(0, bad, frame, signer=add_proto.enroll(5))


def test_client_refuses_entries_that_would_overflow_the_modulus(add_proto):
    from securefml.protocols.ckks import MAX_ABS

    frame = add_proto.frame_for(LAYOUT, [("a",)] * 2)
    big = torch.zeros(LAYOUT.numel_of(("a",)))
    big[3] = 2 * MAX_ABS
    with pytest.raises(InvalidUpdateError, match="overflow"):
        add_proto.client.encode(0, ClientUpdate(5, big, ("a",)), frame, signer=add_proto.enroll(5))


@pytest.mark.parametrize("target", [0, 1])
def test_ciphertext_at_another_scale_is_rejected_and_its_additions_undone(add_proto, add_holder, target):
    odd = load_public_context(add_holder.public_context_bytes())
    odd.global_scale = 2.0**30  # same key, different scale: SEAL cannot add it to the others

    def rescale_last(sender, data):
        env = decode(data)
        last = max(k for k in env.fields if k.startswith("ct."))
        return _rebuild(data, fields={last: ts.ckks_vector(odd, [0.25] * 4096).serialize()})

    # target 0 seeds the sums (strict check refuses it); target 1's first chunk is added, then undone
    run_tampered(add_proto, 40 + target, rescale_last, targets=(target,), error=MalformedMessageError)


# -- signatures: the key holder names a bad signer, the round goes on ---------------------------------
@pytest.mark.parametrize("mode", ["sum", "gram"])
def test_bad_signature_is_blamed_by_the_key_holder_and_the_round_goes_on(stats_proto, mode):
    forged = _rebuild  # the transport swaps client 2's signature for another (a forgery or bit rot)
    ups = make_updates([("a", "b")] * 5, seed=50, equal=True)
    defense = Mean() if mode == "sum" else DropLargest()
    transport = Tamper({2}, lambda s, d: forged(d, fields={"sig": bytes(64)}))
    out = stats_proto.run_round(60 if mode == "sum" else 61, ups, LAYOUT, defense=defense, transport=transport)
    assert set(out.rejected) == {2} and out.rejected[2].startswith("DecryptionError: sender 2")
    assert out.accepted == (0, 1, 3, 4)
    good = [u for u in ups if u.client_id != 2]
    if mode == "sum":
        ref, _ = reference_mean(good)
    else:
        x = torch.stack([u.vector for u in good])
        ref = DropLargest()(x, torch.ones(4, dtype=torch.float64)).aggregate
    assert torch.allclose(out.aggregate.double(), ref.double(), atol=1e-4)


def test_server_with_verify_keys_rejects_a_bad_signature_on_arrival(stats_proto, stats_holder):
    proto = stats_proto
    server = CKKSServer(stats_holder.public_context_bytes(), "stats", verify_keys=stats_holder.registry)
    frame = PackingFrame(LAYOUT, ("a", "b"), proto.preset.slots)
    upd = make_updates([("a", "b")], seed=51)[0]
    msg = proto.client.encode(70, upd, frame, signer=proto.enroll(upd.client_id))
    assert server.decode(70, upd.client_id, msg, frame).upload.sender == upd.client_id
    with pytest.raises(DecryptionError, match="signature"):
        server.decode(71, upd.client_id, _rebuild(msg, round=71, fields={"sig": bytes(64)}), frame)


def test_signed_scale_other_than_weight_over_w_is_rejected(add_proto):
    """A Byzantine client cannot sign a scale that would make it dominate the key holder's shares."""
    frame = add_proto.frame_for(LAYOUT, [("a", "b")] * 4)

    def inflate(sender, data):
        env = decode(data)
        upd = ClientUpdate(sender, torch.zeros(LAYOUT.numel), ("a", "b"), struct.unpack(">d", env.fields["weight"])[0])
        return add_proto.client.encode(env.round, upd, frame, signer=add_proto.enroll(sender), prescale=0.9)

    run_tampered(add_proto, 80, inflate, error=MalformedMessageError, match="weight / W")


def test_key_holder_ledger_and_registry_survive_a_checkpoint(add_proto):
    ups = make_updates([("a", "b")] * 3, seed=90, equal=True)
    add_proto.run_round(90, ups, LAYOUT, defense=Mean())
    state = add_proto.key_holder.state_dict()
    assert "secret" not in str(state).lower()
    restored = CKKSKeyHolder.generate("add-only")
    restored.load_state_dict(state)
    assert restored.state_dict() == state and all(c in restored.registry for c in range(3))
    frame = add_proto.frame_for(LAYOUT, [("a", "b")] * 3)
    uploads = tuple(add_proto.client.encrypt(90, u, frame, signer=add_proto.enroll(u.client_id), prescale=1 / 3)
                    for u in ups)
    again = AggregateRequest(90, frame, uploads, dict.fromkeys(range(3), 1.0))
    with pytest.raises(PolicyViolation, match="already decrypted"):
        add_proto.key_holder.decrypt_aggregate(again)


# -- the halves: announcements bind the upload; clients check the server's plan ----------------------
def test_upload_whose_weight_differs_from_the_announced_one_is_rejected(add_proto):
    class Reannounce(Transport):  # client 1's announcement is altered on the wire: weight 9
        def deliver(self, sender, stage, data):
            if sender == 1 and stage == "announce":
                return _rebuild(data, fields={"weight": struct.pack(">d", 9.0)})
            return data

    ups = make_updates([("a", "b")] * 4, seed=95)
    out = add_proto.run_round(95, ups, LAYOUT, defense=Mean(), transport=Reannounce())
    assert set(out.rejected) == {1} and "announced" in out.rejected[1]
    ref, _ = reference_mean([u for u in ups if u.client_id != 1])
    assert torch.allclose(out.aggregate.double(), ref.double(), atol=1e-4)


def test_client_half_stops_on_a_plan_for_another_key_set_or_a_normalizer_below_its_weight(add_proto, stats_proto):
    from securefml.protocols.ckks_codec import encode_upload_plan

    ups = make_updates([("a", "b")] * 2, seed=96)
    ours = add_proto.round_halves(96, ups, LAYOUT, setup=HalvesSetup(Mean()))
    other = stats_proto.round_halves(96, ups, LAYOUT, setup=HalvesSetup(Mean()))
    foreign_plan = other.server.next_stage().messages[0]
    with pytest.raises(ProtocolError, match="another CKKS key set"):
        ours.clients[0].respond("announce", foreign_plan)
    plan = ours.server.next_stage().messages[1]
    ours.clients[1].respond("announce", plan)
    frame = add_proto.frame_for(LAYOUT, [("a", "b")] * 2)
    with pytest.raises(ProtocolError, match="does not cover"):  # weight 2, a server claiming W = 1
        ours.clients[1].respond("update", encode_upload_plan(96, frame, 1.0))
