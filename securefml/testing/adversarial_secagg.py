"""A malicious SecAgg+ server, driven by hypothesis, against real honest ``SecAggClient``s.

Use it to test the protocol, or your own deployment's parameters, against an *active* server
(Bonawitz et al., CCS 2017, section 6; Bell et al., CCS 2020, section 4)::

    from hypothesis import given, strategies as st
    from securefml.protocols.secagg import SecAggPlus
    from securefml.testing.adversarial_secagg import (
        assert_server_learns_only_large_sums, run_malicious_round, server_moves)

    proto = SecAggPlus(signatures=True, neighbours=4, threshold=3)
    plan = proto.plan(0, range(6), 4, max_weight=1.0)

    @given(server_moves(plan))
    def test_my_parameters(moves):
        view = run_malicious_round(proto, plan, moves)
        assert_server_learns_only_large_sums(view, min_size=2)

What the server may do (``ServerMoves``, every field drawn per client): withhold any
neighbour's advertised keys or sealed shares; corrupt sealed shares in transit (the receiver
then complains, genuinely); claim any subset of a client's neighbours excluded, forwarding the
genuine signed complaints it holds and, optionally, forged ones; show each client its own
survivor list (different views); send any unmask request (any "alive" and "dropped" lists,
overlapping or not) with the consistency signatures that verify on that list; replay the
request (a second unmask request with the lists swapped); and read the whole state of the
clients in ``corrupt`` (colluding clients that otherwise follow the protocol).  The clients
are the library's real ones: real X25519, AES-GCM, Shamir shares and AES-CTR masks.

What is checked (``exposed_sets`` and ``assert_server_learns_only_large_sums``).  From
everything it received, the server reconstructs each secret that has ``t`` shares (revealed,
or held by a corrupt client); a pairwise mask is known when either end's masking key is.  A
linear combination of masked vectors unmasks only if every unknown mask cancels in it, so the
only sums the server can take are sums over *components* (clients joined by pairwise masks
both ends used and nobody can compute) whose members all have a known self-mask seed and no
unknown one-sided mask.  The harness finds those components, *really* unmasks each one with
the reconstructed secrets and checks the decoded sum equals the members' weighted inputs (so
the bookkeeping is the crypto's), then tries to unmask every honest client alone with
everything known and checks that it fails.  Two honest input vectors with the same sum over
every exposed component give the server the same reconstructions: that is the
indistinguishability the property states.

Scope: the server is malicious, clients in ``corrupt`` leak their state but follow the
protocol, all other clients are honest.  The property is tested, not proved; it covers
``signatures=True`` only: without signatures no PKI authenticates the advertised keys, so an
active server can substitute a neighbour's keys and read every share (see ``docs/secagg.md``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from hypothesis import strategies as st

from securefml.errors import ConfigError, ProtocolError
from securefml.protocols import shamir
from securefml.protocols.prg import apply_masks
from securefml.protocols.secagg_client import B_SHARE, S_SHARE, UNMASK_RECORD_BYTES, SecAggClient
from securefml.protocols.secagg_crypto import SEALED_BYTES, pair_key
from securefml.protocols.secagg_messages import (
    KIND,
    SERVER_ID,
    Complaint,
    pack_complaints,
    pack_ids,
    pack_records,
    unpack_ids,
    unpack_records,
)
from securefml.protocols.secagg_plan import RoundPlan
from securefml.protocols.secagg_server import SecAggServer
from securefml.protocols.wire import Envelope, decode, encode, unpack_array

if TYPE_CHECKING:  # pragma: no cover
    from securefml.protocols.secagg import SecAggPlus

__all__ = [
    "ServerMoves",
    "ServerView",
    "server_moves",
    "finding1_moves",
    "run_malicious_round",
    "exposed_sets",
    "unmask_group",
    "assert_server_learns_only_large_sums",
]

Ids = frozenset[int]


@dataclass(frozen=True)
class ServerMoves:
    """Everything a malicious server chooses in one round (per client where it says so)."""

    withhold_keys: Mapping[int, Ids] = field(default_factory=dict)
    withhold_shares: Mapping[int, Ids] = field(default_factory=dict)
    garble_shares: Mapping[int, Ids] = field(default_factory=dict)
    exclusions: Mapping[int, Ids] = field(default_factory=dict)
    forged_proofs: bool = False
    views: Mapping[int, Ids] = field(default_factory=dict)
    requests: Mapping[int, tuple[Ids, Ids]] = field(default_factory=dict)
    replay: bool = False
    corrupt: Ids = frozenset()


@dataclass
class ServerView:
    """What the malicious server holds at the end, plus the ground truth to judge it by."""

    plan: RoundPlan
    clients: dict[int, SecAggClient]
    inputs: dict[int, np.ndarray]
    corrupt: Ids
    masked: dict[int, tuple[np.ndarray, tuple[int, ...]]] = field(default_factory=dict)
    revealed: dict[int, list[tuple[int, int, bytes]]] = field(default_factory=dict)
    refusals: dict[int, str] = field(default_factory=dict)

    @property
    def honest(self) -> Ids:
        return frozenset(self.plan.cohort) - self.corrupt


def _subsets(ids: Sequence[int]) -> st.SearchStrategy[Ids]:
    return st.frozensets(st.sampled_from(tuple(ids))) if ids else st.just(frozenset())


@st.composite
def server_moves(draw: st.DrawFn, plan: RoundPlan, *, max_corrupt: int | None = None) -> ServerMoves:
    """Hypothesis strategy over ``ServerMoves`` for ``plan`` (shrinks towards the honest server).

    ``max_corrupt`` bounds the colluding clients; None uses the largest count the plan's
    threshold is sized for (``2t > k + c``, Bell et al.), i.e. ``2t - k - 1``.
    """
    k, t = plan.params.k, plan.t
    limit = 2 * t - k - 1 if max_corrupt is None else max_corrupt
    if limit < 0:
        raise ConfigError(f"max_corrupt must be >= 0, got {limit}")
    cohort = plan.cohort
    per = {c: plan.neighbours(c) for c in cohort}

    # how often the server deviates, per client and stage: from never (the honest server) to often,
    # so examples cover both rounds that reach the unmask stage and rounds that break early
    rate = draw(st.sampled_from((0.0, 0.03, 0.1, 0.3)))

    def often() -> bool:
        return rate > 0 and draw(st.floats(0, 1)) < rate

    def per_client() -> dict[int, Ids]:
        return {c: draw(_subsets(per[c]).filter(bool)) for c in cohort if often()}

    withhold_keys = per_client()
    withhold_shares = per_client()
    garble = per_client()
    # exclusions: none, the genuinely accused (the harness adds them from the complaints: see
    # ``run_malicious_round``), or any subset the server likes
    exclusions = per_client()
    full = frozenset(cohort)
    others = draw(st.lists(_subsets(cohort), min_size=1, max_size=3))
    views = {c: (others[draw(st.integers(0, len(others) - 1))] if often() else full) for c in cohort}
    requests: dict[int, tuple[Ids, Ids]] = {}
    for c in cohort:
        alive = draw(_subsets(cohort)) if often() else views[c]
        dropped = draw(_subsets(cohort)) if often() else full - alive
        requests[c] = (alive, dropped)
    corrupt = draw(st.frozensets(st.sampled_from(cohort), max_size=limit)) if limit else frozenset()
    return ServerMoves(withhold_keys, withhold_shares, garble, exclusions, often(), views, requests, often(),
                       corrupt)


def finding1_moves(plan: RoundPlan, victim: int) -> ServerMoves:
    """Issue 11, finding 1: tell ``victim`` alone that all its neighbours are excluded, then
    announce everybody alive to everybody (the victim's self-mask seed is then revealed)."""
    full = frozenset(plan.cohort)
    return ServerMoves(exclusions={victim: frozenset(plan.neighbours(victim))}, forged_proofs=True,
                       views=dict.fromkeys(plan.cohort, full),
                       requests=dict.fromkeys(plan.cohort, (full, frozenset())))


def _msg(plan: RoundPlan, kind: str, fields: dict[str, bytes]) -> bytes:
    return encode(Envelope(kind, plan.round_idx, SERVER_ID, fields))


def run_malicious_round(
    proto: SecAggPlus,
    plan: RoundPlan,
    moves: ServerMoves,
    inputs: Mapping[int, np.ndarray] | None = None,
) -> ServerView:
    """Run one round of real honest clients against the server ``moves`` describes.

    ``inputs[c]`` is client ``c``'s float vector (weight 1); None draws uniform ones in
    ``[-0.5, 0.5]`` (seeded by the round index).  A client that catches the server (any ``ProtocolError``) stops and is
    listed in ``ServerView.refusals``; the server keeps whatever it had received.
    """
    if not plan.signatures:
        raise ConfigError("the adversarial-server property is claimed for signatures=True only")
    rng = np.random.default_rng(plan.round_idx)  # the inputs; the clients' keys and seeds come from the OS
    xs = {c: np.asarray(inputs[c], np.float32) if inputs is not None else
          rng.uniform(-0.5, 0.5, plan.length).astype(np.float32) for c in plan.cohort}
    clients = {c: SecAggClient(c, plan, identity=proto.identity(c)) for c in plan.cohort}
    view = ServerView(plan, clients, xs, frozenset(moves.corrupt))
    helper = SecAggServer(plan)  # used only to parse and store what clients send
    st_ = helper.state
    live = set(plan.cohort)

    def step(c: int, fn, *args):  # noqa: ANN001, ANN202
        try:
            return fn(*args)
        except ProtocolError as exc:
            view.refusals[c] = f"{type(exc).__name__}: {exc}"
            live.discard(c)
            return None

    for c in plan.cohort:
        helper.receive_advertise(c, clients[c].advertise())
    for c in sorted(live):
        skip = moves.withhold_keys.get(c, frozenset())
        recs = [(v, st_.adverts[v][0] + st_.adverts[v][1] + st_.adverts[v][2])
                for v in plan.neighbours(c) if v not in skip]
        data = step(c, clients[c].share, _msg(plan, KIND["keys"], {"keys": pack_records(recs, 128)}))
        if data is not None:
            helper.receive_share(c, data)
    for c in sorted(live):
        skip, garble = moves.withhold_shares.get(c, frozenset()), moves.garble_shares.get(c, frozenset())
        recs = []
        for u in plan.neighbours(c):
            sealed = st_.sealed.get(u, {}).get(c)
            if sealed is None or u in skip:
                continue
            recs.append((u, bytes([sealed[0] ^ 1]) + sealed[1:] if u in garble else sealed))
        data = step(c, clients[c].complain, _msg(plan, KIND["shares"], {"shares": pack_records(recs, SEALED_BYTES)}))
        if data is not None:
            helper.receive_complaints(c, data)
    for c in sorted(live):
        accused = {a for acc in st_.complaints.values() for a in acc} & set(plan.neighbours(c))
        excluded = moves.exclusions.get(c, frozenset(accused))
        proofs = [Complaint(a, acc, st_.complaint_sigs[a]) for a, acc in sorted(st_.complaints.items())
                  if excluded.intersection(acc)]
        if moves.forged_proofs:
            covered = {v for p in proofs for v in p.accused}
            have = {p.accuser for p in proofs}
            for v in sorted(excluded - covered):
                accuser = next((a for a in plan.neighbours(v) if a not in have), None)
                if accuser is not None:
                    proofs.append(Complaint(accuser, (v,), os.urandom(64)))
                    have.add(accuser)
        msg = _msg(plan, KIND["exclusions"], {"excluded": pack_ids(excluded), "proofs": pack_complaints(proofs)})
        data = step(c, clients[c].masked, msg, xs[c], 1.0)
        if data is not None:
            env = decode(data)
            vec = unpack_array(env.field("vector"), expected_len=plan.length + 1).copy()
            view.masked[c] = (vec, unpack_ids(env.field("peers"), sender=c))
    sigs: dict[int, tuple[Ids, bytes]] = {}
    for c in sorted(live):
        shown = moves.views.get(c, frozenset(plan.cohort))
        data = step(c, clients[c].consistency, _msg(plan, KIND["survivors"], {"alive": pack_ids(shown)}))
        if data is not None:
            sigs[c] = (shown, decode(data).field("sig"))
    for c in sorted(live):
        alive, dropped = moves.requests.get(c, (frozenset(plan.cohort), frozenset()))
        asks = [(alive, dropped)] + ([(dropped, alive)] if moves.replay else [])
        for a, d in asks:
            fwd = [(v, sig) for v, (lst, sig) in sigs.items() if v in plan.neighbours(c) and lst == a]
            req = _msg(plan, KIND["request"], {"alive": pack_ids(a), "dropped": pack_ids(d),
                                               "sigs": pack_records(fwd, 64)})
            data = step(c, clients[c].unmask, req)
            if data is None:
                break
            for about, body in unpack_records(decode(data).field("shares"), UNMASK_RECORD_BYTES, sender=c):
                view.revealed.setdefault(c, []).append((about, body[0], body[1:]))
    return view


def _known_secrets(view: ServerView) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """Self-mask seeds and masking keys the server can reconstruct (or reads off corrupt clients)."""
    t = view.plan.t
    points: dict[tuple[int, int], dict[int, bytes]] = {}
    for responder, recs in view.revealed.items():
        for about, kind, share in recs:
            points.setdefault((about, kind), {})[responder + 1] = share
    for c in view.corrupt:
        for about, (b, s) in view.clients[c].state.held.items():
            points.setdefault((about, B_SHARE), {})[c + 1] = b
            points.setdefault((about, S_SHARE), {})[c + 1] = s
    seeds: dict[int, bytes] = {}
    keys: dict[int, bytes] = {}
    for (about, kind), pts in points.items():
        if len(pts) >= t:
            ints = [(x, int.from_bytes(y, "big")) for x, y in sorted(pts.items())]
            value = shamir.reconstruct(ints, t)
            if value < 2**256:
                (seeds if kind == B_SHARE else keys)[about] = value.to_bytes(32, "big")
    for c in view.corrupt:
        cs = view.clients[c].state
        if cs.seed:
            seeds[c] = cs.seed
        if cs.s_keys is not None:
            keys[c] = cs.s_keys.private
    return seeds, keys


def _pair_seed(view: ServerView, keys: Mapping[int, bytes], u: int, p: int) -> bytes | None:
    """The pairwise mask seed of ``{u, p}`` if the server holds either end's masking key."""
    plan = view.plan
    for own, other in ((u, p), (p, u)):
        if own in keys and other in view.clients and view.clients[other].state.s_keys is not None:
            # the server holds every advertised key; read ``other``'s public masking key from its advert
            pub = view.clients[other].state.s_keys.public  # type: ignore[union-attr]
            try:
                return pair_key(keys[own], pub, purpose=b"mask", round_idx=plan.round_idx, a=u, b=p)
            except ProtocolError:
                return None
    return None


def exposed_sets(view: ServerView) -> list[Ids]:
    """The groups of honest clients whose input sum the server can unmask (see the module doc)."""
    seeds, keys = _known_secrets(view)
    honest = {c for c in view.masked if c not in view.corrupt}
    parent = {c: c for c in honest}

    def find(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    eligible = {c: c in seeds for c in honest}
    for u in honest:
        for p in view.masked[u][1]:
            if _pair_seed(view, keys, u, p) is not None:
                continue
            if p in honest and u in view.masked[p][1]:
                parent[find(u)] = find(p)
            else:
                eligible[u] = False  # an unknown mask only ``u``'s vector carries
    groups: dict[int, set[int]] = {}
    for c in honest:
        groups.setdefault(find(c), set()).add(c)
    return [frozenset(g) for g in groups.values() if all(eligible[c] for c in g)]


def unmask_group(view: ServerView, group: Sequence[int] | Ids) -> np.ndarray:
    """The server's real attempt: sum ``group``'s masked vectors, remove every mask it can, decode.

    Returns the decoded weighted sum (float64, the weight coordinate dropped).  For a group
    ``exposed_sets`` lists it equals the members' weighted inputs; for any other group some
    mask is left and the result is noise.
    """
    seeds, keys = _known_secrets(view)
    plan = view.plan
    fp = plan.fixed_point
    total = np.zeros(plan.length + 1, dtype=fp.dtype)
    members = set(group)
    for u in sorted(members):
        vec, peers = view.masked[u]
        np.add(total, vec, out=total)
        if u in seeds:
            apply_masks(total, minus=[seeds[u]])
        for p in peers:
            if p in members and u in view.masked.get(p, ((), ()))[1] and _pair_seed(view, keys, u, p) is None:
                continue  # cancels inside the group
            seed = _pair_seed(view, keys, u, p)
            if seed is not None:  # the client added it for p > u and subtracted it for p < u
                apply_masks(total, minus=[seed]) if u < p else apply_masks(total, plus=[seed])
    weighted, _ = fp.decode_sum(total)
    return weighted


def assert_server_learns_only_large_sums(view: ServerView, *, min_size: int = 2) -> list[Ids]:
    """Fail unless every sum the server can unmask covers at least ``min_size`` honest clients.

    Checks each exposed group by really unmasking it (the decoded sum must equal the group's
    inputs, to within the code's rounding), and that unmasking any single honest client alone,
    with every secret the server holds, does not give back its input.  Returns the groups.
    """
    fp = view.plan.fixed_point
    groups = exposed_sets(view)
    for g in groups:
        got = unmask_group(view, g)
        want = sum(np.clip(view.inputs[c].astype(np.float64), -fp.clip, fp.clip) for c in g)
        tol = len(g) / fp.scale + 1e-9
        assert np.allclose(got, want, atol=tol), f"group {sorted(g)}: the unmasking bookkeeping is wrong"
        assert len(g) >= min_size, f"the server unmasks the sum of only {sorted(g)} (min_size={min_size})"
    for u in sorted(c for c in view.masked if c not in view.corrupt):
        got = unmask_group(view, [u])
        want = np.clip(view.inputs[u].astype(np.float64), -fp.clip, fp.clip)
        assert not np.allclose(got, want, atol=1.0 / fp.scale + 1e-6), f"the server recovered client {u}'s input"
    return groups
