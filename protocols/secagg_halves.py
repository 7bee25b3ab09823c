"""SecAgg+ as two halves over bytes (the contract of ``securefml.protocols.halves``).

The stages are SecAgg+'s (``secagg_messages.Stage``): ``advertise`` (the server's message is the
public ``RoundPlan`` as bytes; the client builds its ``SecAggClient`` from it), ``share``,
``complaints``, ``masked``, ``consistency`` (signed mode only) and ``unmask``.  Each stage's
server message is exactly what ``SecAggServer`` produces for that client, and each reply is what
``SecAggClient`` answers, so every check of those two classes (signed exclusions, the ``|U_i| >=
t`` floors, blame of inconsistent shares, the range check of the decoded sum) runs unchanged.

One server half runs every secure sum of the round side by side: one sum over the cohort
(``Reveals.SUM``) or one per bucket (``Reveals.BUCKETS``).  Each client is in exactly one
sum, so a stage's messages to the clients of different buckets merge into one stage, and each
reply goes to its client's sum.  A bucket that aborts (too few survivors, an out-of-range sum)
drops out alone and its clients get no further messages; the round aborts only when no sum
survives.  The generic driver (``halves.simulate``) runs it like any other protocol.

A round the factory plans itself (``SecAggPlus.server_half``) starts with one more stage,
``layers`` (``SecAggPlanningHalf``): the server does not see any update, so it asks each client
which layers it uploads (public: per-layer upload counts are declared leakage), takes the layer
set most clients named, rejects by name any client that named another one, and then plans the
secure sums over the whole cohort, the silent and the rejected counting as clients that dropped
before advertising (so the graph, the buckets and the code are those of the announced cohort).
A server half built from ready plans (``SecAggServerHalf(plan)``) skips that stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefml.errors import (
    ConfigError,
    InvalidUpdateError,
    MalformedMessageError,
    ProtocolAbort,
    ProtocolError,
    ReplayError,
)
from securefml.protocols.halves import ClientHalf, ServerHalf, StageMessages
from securefml.protocols.secagg_client import MaskJob, SecAggClient
from securefml.protocols.secagg_masking import MIN_WORDS_PER_WORKER, MaskTimes, run_mask_job_threaded
from securefml.protocols.secagg_messages import KIND, LAYERS_STAGE, SERVER_ID, Stage
from securefml.protocols.secagg_plan import RoundPlan
from securefml.protocols.secagg_server import SecAggServer
from securefml.protocols.secagg_stats import SecAggClientStats, SecAggRoundStats
from securefml.protocols.wire import Envelope, decode, encode
from securefml.reveals import RevealedSums, Reveals
from securefml.updates import LayerLayout

__all__ = ["SecAggClientHalf", "SecAggPlanningHalf", "SecAggServerHalf"]

log = logging.getLogger(__name__)

_MAX_LAYERS_BYTES = 1 << 16


class SecAggServerHalf(ServerHalf):
    """The aggregator's half of every secure sum of one SecAgg+ round, stage by stage.

    Parameters
    ----------
    plans:
        One plan (one secure sum) or one per bucket; their cohorts must be disjoint and agree on
        round, length, layers, layout and the signature option.
    reveals:
        ``Reveals.SUM`` or ``Reveals.BUCKETS``; by default SUM for one plan, BUCKETS for several.
    checks:
        Range-check each decoded sum (``FixedPoint.check_sum``).  ``False`` only to measure the
        check's cost: without it a client's out-of-code ring element corrupts the sum.
    present:
        The planned clients still taking part (default: all); the others are treated as clients
        that dropped before advertising, exactly as SecAgg+ handles them (no message, no mask).
    """

    def __init__(
        self,
        plans: RoundPlan | Sequence[RoundPlan],
        *,
        reveals: Reveals | None = None,
        checks: bool = True,
        present: Collection[int] | None = None,
    ) -> None:
        self.plans: tuple[RoundPlan, ...] = (plans,) if isinstance(plans, RoundPlan) else tuple(plans)
        if not self.plans:
            raise ConfigError("a SecAgg+ server half needs at least one plan")
        first = self.plans[0]
        for p in self.plans[1:]:
            if (p.round_idx, p.length, p.layers, p.layout_fingerprint, p.signatures) != (
                first.round_idx, first.length, first.layers, first.layout_fingerprint, first.signatures
            ):
                raise ConfigError("the secure sums of one round must share round, length, layers and signatures")
        members = [c for p in self.plans for c in p.cohort]
        if len(set(members)) != len(members):
            raise ConfigError("each client is in exactly one secure sum of a round")
        self.reveals = reveals or (Reveals.SUM if len(self.plans) == 1 else Reveals.BUCKETS)
        if self.reveals not in (Reveals.SUM, Reveals.BUCKETS):
            raise ConfigError(f"SecAgg+ reveals a sum or bucket sums, not {self.reveals}")
        self.checks = checks
        self.engines = [SecAggServer(p) for p in self.plans]
        self._bucket = {c: i for i, p in enumerate(self.plans) for c in p.cohort}
        self._stages = [Stage.ADVERTISE, Stage.SHARE, Stage.COMPLAINTS, Stage.MASKED]
        if first.signatures:
            self._stages.append(Stage.CONSISTENCY)
        self._stages.append(Stage.UNMASK)
        self._at = -1
        here = set(members) if present is None else set(present)
        self._answered = [set(p.cohort) & here for p in self.plans]  # who answered the previous stage, per sum
        self._replied: list[set[int]] = [set() for _ in self.plans]
        self._sums: dict[int, tuple[np.ndarray, float, tuple[int, ...], float]] = {}
        self._aborted: dict[int, str] = {}
        self._done = False
        self._server_s = 0.0

    # -- compatibility with the one-sum form ------------------------------------------------------------
    @property
    def plan(self) -> RoundPlan:
        """The first (for one secure sum: the only) plan."""
        return self.plans[0]

    @property
    def server(self) -> SecAggServer:
        """The first (for one secure sum: the only) ``SecAggServer``."""
        return self.engines[0]

    @property
    def stage(self) -> Stage | None:
        return self._stages[self._at] if 0 <= self._at < len(self._stages) else None

    def _live(self) -> list[int]:
        return [i for i in range(len(self.plans)) if i not in self._aborted]

    # -- the contract ---------------------------------------------------------------------------------
    def next_stage(self) -> StageMessages | None:
        t0 = time.perf_counter()
        try:
            self._at += 1
            stage = self.stage
            if stage is None:
                return None
            messages: dict[int, bytes] = {}
            for i in self._live():
                self._replied[i] = set()
                messages.update(self._messages(i, stage))
            return StageMessages(stage.value, messages)
        finally:
            self._server_s += time.perf_counter() - t0

    def _messages(self, i: int, stage: Stage) -> dict[int, bytes]:
        srv, plan = self.engines[i], self.plans[i]
        st = srv.state
        parties = sorted(self._answered[i])
        if stage is Stage.ADVERTISE:
            return dict.fromkeys(parties, plan.to_bytes())
        if stage is Stage.SHARE:
            return {c: srv.keys_for(c) for c in parties}
        if stage is Stage.COMPLAINTS:
            return {c: srv.shares_for(c) for c in parties}
        if stage is Stage.MASKED:
            return {c: srv.exclusions_for(c) for c in parties if c not in st.excluded}
        if stage is Stage.CONSISTENCY:
            return {c: srv.survivors_for(c) for c in st.contributors if c in self._answered[i]}
        askers = [c for c in (st.sigs if plan.signatures else st.contributors) if c in self._answered[i]]
        return {c: srv.request_for(c) for c in sorted(askers)}

    def receive(self, party: int, data: bytes) -> None:
        t0 = time.perf_counter()
        try:
            stage = self.stage
            if stage is None:
                raise ProtocolError("no stage is open", sender=party)
            i = self._bucket.get(party)
            if i is None:
                raise ProtocolError("not a member of this round's cohort", sender=party)
            if i in self._aborted:
                raise ProtocolError("its secure sum has already aborted", sender=party)
            srv = self.engines[i]
            receive: Mapping[Stage, Callable[[int, bytes], None]] = {
                Stage.ADVERTISE: srv.receive_advertise,
                Stage.SHARE: srv.receive_share,
                Stage.COMPLAINTS: srv.receive_complaints,
                Stage.MASKED: srv.receive_masked,
                Stage.CONSISTENCY: srv.receive_consistency,
                Stage.UNMASK: srv.receive_unmask,
            }
            receive[stage](party, data)
            self._replied[i].add(party)
        finally:
            self._server_s += time.perf_counter() - t0

    def reject(self, party: int, error: ProtocolError | InvalidUpdateError) -> None:
        i = self._bucket.get(party)
        if i is None:
            return
        typed = error if isinstance(error, ProtocolError) else ProtocolError(str(error), sender=party)
        self.engines[i].reject(party, typed)
        self._replied[i].discard(party)

    def close_stage(self) -> None:
        t0 = time.perf_counter()
        try:
            stage = self.stage
            for i in self._live():
                self._answered[i] = set(self._replied[i])
                try:
                    if stage is Stage.COMPLAINTS:
                        self.engines[i].close_complaints()
                    elif stage is Stage.MASKED:
                        self.engines[i].close_masked()
                    elif stage is Stage.UNMASK:
                        self._finish(i)
                except ProtocolAbort as exc:  # this sum stops alone, having unmasked nothing
                    log.warning("secagg: round %d, sum %d (%d clients) aborted: %s", self.plan.round_idx, i,
                                self.plans[i].n, exc)
                    self._aborted[i] = f"{type(exc).__name__}: {exc}"
            if not self._live():
                reasons = "; ".join(self._aborted.values())
                raise ProtocolAbort(f"no secure sum survived this round: {reasons}")
            if stage is Stage.UNMASK:
                self._done = True
        finally:
            self._server_s += time.perf_counter() - t0

    def _finish(self, i: int) -> None:
        plan, srv = self.plans[i], self.engines[i]
        total = srv.finish()
        weighted_sum, total_weight = plan.fixed_point.decode_sum(total)
        contributors = srv.state.contributors
        if self.checks:
            plan.fixed_point.check_sum(weighted_sum, total_weight, len(contributors))
        bound = plan.fixed_point.error_bound(len(contributors), float(total_weight))
        self._sums[i] = (weighted_sum, float(total_weight), tuple(contributors), bound)

    def rejections(self) -> dict[int, ProtocolError]:
        """Every client any secure sum of this round rejected, with the typed error."""
        out: dict[int, ProtocolError] = {}
        for srv in self.engines:
            out.update(srv.state.rejected)
        return out

    def revealed(self) -> RevealedSums:
        if not self._done:
            raise ProtocolError("the round has not finished", sender=None)
        idx = sorted(self._sums)
        return RevealedSums(
            kind=self.reveals,
            layers=self.plan.layers,
            sums=tuple(torch.from_numpy(np.asarray(self._sums[i][0], dtype=np.float64)) for i in idx),
            total_weights=tuple(self._sums[i][1] for i in idx),
            contributors=tuple(self._sums[i][2] for i in idx),
            error_bound=max(self._sums[i][3] for i in idx),
            rejected={c: f"{type(e).__name__}: {e}" for c, e in self.rejections().items()},
        )

    @property
    def stats(self) -> SecAggRoundStats:
        bucketed = self.reveals is Reveals.BUCKETS
        return SecAggRoundStats(
            params=tuple((p.params.k, p.params.t) for p in self.plans),
            buckets={i: p.cohort for i, p in enumerate(self.plans)} if bucketed else {},
            aborted_buckets=dict(self._aborted) if bucketed else {},
            bucket_index=tuple(sorted(self._sums)),
            error_bound=max((s[3] for s in self._sums.values()), default=float("inf")),
            server_s=self._server_s,
        )


def _layers_request(round_idx: int, layout_fingerprint: bytes) -> bytes:
    return encode(Envelope(KIND["layers-request"], round_idx, SERVER_ID, {"layout": layout_fingerprint}))


class SecAggPlanningHalf(ServerHalf):
    """The ``layers`` stage, then the ``SecAggServerHalf`` that ``planner(members, layers)`` builds.

    Parameters
    ----------
    round_idx, layout, cohort:
        The round, the model layout every client must share, and the clients asked.
    planner:
        ``planner(cohort, present, layers)`` builds the round's server half: the plans cover the
        whole ``cohort`` (so the graph and the code are sized as announced), and the clients not
        in ``present`` (silent at this stage, or naming other layers) count as dropped before
        advertising.  It may raise ``ProtocolAbort``.
    """

    def __init__(
        self,
        round_idx: int,
        layout: LayerLayout,
        cohort: Sequence[int],
        planner: Callable[[tuple[int, ...], tuple[int, ...], tuple[str, ...]], SecAggServerHalf],
    ) -> None:
        if len(set(cohort)) != len(cohort):
            raise ConfigError("client ids in one round must be distinct")
        self.round_idx = round_idx
        self.layout = layout
        self.cohort = tuple(sorted(cohort))
        self._planner = planner
        self._opened = False
        self._announced: dict[int, tuple[str, ...]] = {}
        self._rejected: dict[int, str] = {}
        self._server_s = 0.0
        self.inner: SecAggServerHalf | None = None

    def next_stage(self) -> StageMessages | None:
        if self.inner is not None:
            return self.inner.next_stage()
        if self._opened:
            raise ProtocolError("the layers stage was not closed", sender=SERVER_ID)
        self._opened = True
        return StageMessages(LAYERS_STAGE, dict.fromkeys(self.cohort, _layers_request(
            self.round_idx, self.layout.fingerprint())))

    def receive(self, party: int, data: bytes) -> None:
        if self.inner is not None:
            self.inner.receive(party, data)
            return
        t0 = time.perf_counter()
        try:
            self._announced[party] = self._read_layers(party, data)
        finally:
            self._server_s += time.perf_counter() - t0

    def _read_layers(self, party: int, data: bytes) -> tuple[str, ...]:
        if party not in self.cohort:
            raise ProtocolError("not a member of this round's cohort", sender=party)
        if party in self._announced:
            raise ReplayError("duplicate layers message", sender=party)
        env = decode(data, sender=party, max_bytes=_MAX_LAYERS_BYTES)
        env.expect(kind=KIND[LAYERS_STAGE], round=self.round_idx, sender=party)
        if env.field("layout") != self.layout.fingerprint():
            raise ProtocolError("named layers of another model layout", sender=party)
        try:
            raw = env.field("layers").decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedMessageError("layer names are not utf-8", sender=party) from None
        names = tuple(raw.split("\n")) if raw else ()
        try:
            canonical = self.layout.canonical(names)
        except ConfigError:
            raise MalformedMessageError("named a layer the model does not have", sender=party) from None
        if not names or canonical != names:
            raise MalformedMessageError("layer names must be distinct, non-empty and in layout order", sender=party)
        return names

    def reject(self, party: int, error: ProtocolError | InvalidUpdateError) -> None:
        if self.inner is not None:
            self.inner.reject(party, error)
            return
        self._announced.pop(party, None)
        self._rejected[party] = f"{type(error).__name__}: {error}"

    def close_stage(self) -> None:
        if self.inner is not None:
            self.inner.close_stage()
            return
        groups: dict[tuple[str, ...], list[int]] = {}
        for c, names in sorted(self._announced.items()):
            groups.setdefault(names, []).append(c)
        if not groups:
            raise ProtocolAbort("no client named the layers it uploads; nothing was planned")
        layers, members = max(sorted(groups.items()), key=lambda kv: len(kv[1]))
        for names, clients in groups.items():
            if names == layers:
                continue
            for c in clients:
                err = ProtocolError(f"uploads layers {list(names)[:4]}, the round's plan (most clients) takes "
                                    f"{list(layers)[:4]}: SecAgg needs the same layers from every client", sender=c)
                log.warning("secagg: round %d: %s", self.round_idx, err)
                self._rejected[c] = f"{type(err).__name__}: {err}"
        if len(members) < 2:
            raise ProtocolAbort(f"only {len(members)} client(s) upload the same layers; a secure sum needs 2")
        t0 = time.perf_counter()
        self.inner = self._planner(self.cohort, tuple(members), layers)
        self._server_s += time.perf_counter() - t0

    def revealed(self) -> RevealedSums:
        if self.inner is None:
            raise ProtocolError("the round has not finished", sender=None)
        rev = self.inner.revealed()
        return replace(rev, rejected={**self._rejected, **rev.rejected})

    @property
    def stats(self) -> SecAggRoundStats | None:
        if self.inner is None:
            return None
        inner = self.inner.stats
        return replace(inner, server_s=inner.server_s + self._server_s)


def _clipped_entries(vector: torch.Tensor | np.ndarray, clip: float) -> int:
    """Entries of ``vector`` outside ``[-clip, clip]`` (two reductions first: usually none is)."""
    x = vector.detach().reshape(-1) if isinstance(vector, torch.Tensor) else torch.as_tensor(vector).reshape(-1)
    if x.numel() == 0:
        return 0
    lo, hi = torch.aminmax(x)
    if float(lo) >= -clip and float(hi) <= clip:
        return 0
    return int((x.abs() > clip).sum())


class SecAggClientHalf(ClientHalf):
    """A client's half of one SecAgg+ secure sum: builds its ``SecAggClient`` from the plan bytes.

    Parameters
    ----------
    party:
        This client's id.
    vector, weight:
        Its update over the plan's layers, and its aggregation weight.
    round_idx:
        The round it expects (a plan of another round is refused as a replay).
    identity:
        Its Ed25519 identity key (signed mode).
    trusted_identities:
        The public identity keys this client trusts (its PKI); when given, a plan that carries
        another key for a client this PKI knows is refused, so the server cannot substitute
        identities.
    noise_fn:
        Distributed-DP hook, as in ``SecAggClient.masked``.
    ring_noise:
        Distributed-DP hook in the ring: ``ring_noise(job)`` returns int64 noise of
        ``len(job.vector) + 1`` entries added to the quantized vector before masking.
    layers, layout:
        The layers this client uploads and its model layout: needed to answer the ``layers``
        stage of a round the factory plans, and then checked against the plan.
    checks:
        The active-server checks of ``SecAggClient`` (``False`` only to measure their cost).
    workers:
        Threads that compute the masked input (``secagg_masking``); None picks them from the
        work and the CPUs (one, i.e. no thread, for small vectors).  The message is the same
        word for word whatever the count.
    """

    def __init__(
        self,
        party: int,
        vector: torch.Tensor | np.ndarray,
        weight: float,
        *,
        round_idx: int,
        identity: Ed25519PrivateKey | None = None,
        trusted_identities: Mapping[int, bytes] | None = None,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        ring_noise: Callable[[MaskJob], np.ndarray] | None = None,
        layers: Sequence[str] | None = None,
        layout: LayerLayout | None = None,
        checks: bool = True,
        workers: int | None = None,
    ) -> None:
        if workers is not None and workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        self.party = party
        self.vector = vector
        self.weight = float(weight)
        self.round_idx = round_idx
        self.identity = identity
        self.trusted = trusted_identities
        self.noise_fn = noise_fn
        self.ring_noise = ring_noise
        self.layers = tuple(layers) if layers is not None else None
        self.layout = layout
        self.checks = checks
        self.workers = workers
        self.client: SecAggClient | None = None
        self._stats = SecAggClientStats()
        self._seconds = 0.0

    @property
    def stats(self) -> SecAggClientStats:
        """This client's own counts (kept on the device; never sent)."""
        return replace(self._stats, seconds=self._seconds)

    def concurrent(self, stage: str) -> bool:
        """The masked input of a large vector may run beside other clients' (``halves.simulate``).

        Its cost is the ``k + 1`` AES-CTR mask streams and the numpy rounding, which release the
        GIL; it reads and writes only this half's own state.  Not for a small vector (below
        ``MIN_WORDS_PER_WORKER`` keystream words the hand-off costs more than it saves), not
        when this half was told to use one thread (``workers=1``), and no other stage: the
        X25519 exchanges and HKDF of ``share`` and ``complaints`` hold the GIL (measured in
        ``benchmarks/secagg.py``, ``gil``).  Not with a distributed-DP hook (``noise_fn``,
        ``ring_noise``) either: a hook may draw from a noise source shared by every client (the
        Skellam mechanism forks one master stream per client), and concurrent draws would make
        the forks' order, hence each client's noise, depend on thread timing.
        """
        if stage != Stage.MASKED.value or self.client is None or self.workers == 1:
            return False
        if self.noise_fn is not None or self.ring_noise is not None:
            return False
        plan = self.client.plan
        return plan.length * (plan.params.k + 2) >= MIN_WORDS_PER_WORKER

    def respond(self, stage: str, message: bytes) -> bytes:
        t0 = time.perf_counter()
        try:
            return self._respond(stage, message)
        finally:
            self._seconds += time.perf_counter() - t0

    def _respond(self, stage: str, message: bytes) -> bytes:
        if stage == LAYERS_STAGE:
            return self._announce(message)
        if stage == Stage.ADVERTISE.value:
            if self.client is not None:
                raise ProtocolError("the round plan arrived twice", sender=SERVER_ID)
            plan = RoundPlan.from_bytes(message, round_idx=self.round_idx)
            self._check_plan(plan)
            self.client = SecAggClient(self.party, plan, identity=self.identity, checks=self.checks)
            return self.client.advertise()
        if self.client is None:
            raise ProtocolError(f"stage {stage!r} before the round plan", sender=SERVER_ID)
        cl = self.client
        if stage == Stage.SHARE.value:
            return cl.share(message)
        if stage == Stage.COMPLAINTS.value:
            return cl.complain(message)
        if stage == Stage.MASKED.value:
            return self._masked(cl, message)
        if stage == Stage.CONSISTENCY.value:
            return cl.consistency(message)
        if stage == Stage.UNMASK.value:
            return cl.unmask(message)
        raise ProtocolError(f"unknown SecAgg+ stage {stage!r}", sender=SERVER_ID)

    def _announce(self, message: bytes) -> bytes:
        if self.layers is None or self.layout is None:
            raise ProtocolError("this client half was built without its layers and layout", sender=self.party)
        if self.client is not None:
            raise ProtocolError("the layers request came after the round plan", sender=SERVER_ID)
        env = decode(message, sender=SERVER_ID, max_bytes=_MAX_LAYERS_BYTES)
        env.expect(kind=KIND["layers-request"], round=self.round_idx, sender=SERVER_ID)
        if env.field("layout") != self.layout.fingerprint():
            raise ProtocolError("the round is for another model layout", sender=SERVER_ID)
        fields = {"layout": self.layout.fingerprint(), "layers": "\n".join(self.layers).encode("utf-8")}
        return encode(Envelope(KIND[LAYERS_STAGE], self.round_idx, self.party, fields))

    def _check_plan(self, plan: RoundPlan) -> None:
        if self.party not in plan.cohort:
            raise ProtocolError("the round plan does not list this client", sender=SERVER_ID)
        if self.trusted is not None:
            for c in plan.cohort:
                if c in self.trusted and plan.identities.get(c) != self.trusted[c]:
                    raise ProtocolError("the plan's identity keys differ from the trusted ones", sender=SERVER_ID)
        if self.layers is not None and plan.layers != self.layers:
            raise ProtocolError("the round plan takes other layers than this client uploads", sender=SERVER_ID)
        if self.layout is not None and plan.layout_fingerprint != self.layout.fingerprint():
            raise ProtocolError("the round plan is for another model layout", sender=SERVER_ID)

    def _masked(self, cl: SecAggClient, message: bytes) -> bytes:
        fp = cl.plan.fixed_point
        job = cl.prepare_masked(message, self.vector, self.weight, noise_fn=self.noise_fn)
        if self.ring_noise is not None:
            job.ring_noise = self.ring_noise(job)
        times: list[MaskTimes] = []
        reply = run_mask_job_threaded(job, self.workers, times=times)
        # the masked input counts what it clipped (its range check is one pass it makes anyway);
        # with a noise hook it counts the noised vector, so the update itself is counted here
        clipped = times[0].clipped_entries if self.noise_fn is None else _clipped_entries(self.vector, fp.clip)
        over = self.weight > fp.max_weight
        if clipped:
            log.debug("client %s: %d of %d entries clipped to +-%g", self.party, clipped, job.vector.size, fp.clip)
        if over:
            log.warning("client %s: weight %g exceeds the round's public bound %g and counts as %g", self.party,
                        self.weight, fp.max_weight, fp.max_weight)
        self._stats = SecAggClientStats(entries=int(job.vector.size), clipped_entries=clipped, weight_clipped=over,
                                        mask_cpu_s=sum(times[0].per_range),
                                        mask_critical_cpu_s=max(times[0].per_range),
                                        mask_threads=len(times[0].per_range))
        return reply
