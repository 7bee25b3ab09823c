"""SecAgg+ (Bonawitz et al. CCS 2017; Bell et al. CCS 2020): the protocol the federation loop uses.

``SecAggPlus`` is the high-level recipe with secure defaults; the client half
(``secagg_client.SecAggClient``), the server half (``secagg_server.SecAggServer``), the public
round plan (``secagg_plan.RoundPlan``) and the stage vocabulary (``secagg_messages``) are the
low-level pieces a user drives over their own transport (every message is ``bytes``).
``SecAggPlus.run_round`` is the in-memory driver: it runs all six stages through a
``Transport`` (``"advertise"``, ``"share"``, ``"complaints"``, ``"masked"``, ``"consistency"``,
``"unmask"``; ``None`` from the transport means the client dropped at that stage).

Threat model
------------
- Server, ``signatures=True``: *active* (it may deviate arbitrarily: drop, withhold, reorder,
  corrupt or invent any server -> client message, show different clients different views,
  replay).  Clients know each other's Ed25519 identity keys (a PKI).  It learns the sum (plain
  mode) or the bucket sums (bucketed mode), the total weight behind them and who took part;
  never one client's input (tested by the adversarial-server harness,
  ``securefml.testing.adversarial_secagg``).
- Server, ``signatures=False``: *honest-but-curious only* (``active_server_secure`` is
  False).  Nothing authenticates the advertised keys, so an active server can substitute its
  own keys for a victim's neighbours, open every share the victim sends and recover its input
  (``test_unsigned_mode_does_not_claim_active_security``).
- Clients: up to ``corrupt_fraction`` colluding with the server (they may also leak their state
  to it), any number dropping at any stage.  ``k`` and ``t`` follow from these fractions
  (``secagg_graph.derive_parameters``, ``2t > k + c``).
- A Byzantine client can still choose its *input*, and since masks are additive any ring
  element as its masked vector: the decoded sum is range-checked (``FixedPoint.check_sum``)
  and an out-of-range sum is discarded with ``AggregateOutOfRange`` (nobody can be named: the
  masks hide who), but a shift *within* the range (up to ``clip * max_weight`` per entry, and
  ``max_weight`` of total weight, per client) is undetectable.  Per-client range proofs are
  future work; bucketed mode with a robust rule is the defense.

Server deviations and what stops each (Bonawitz et al. 2017, section 4 and 6; Bell et al. 2020):

- *Substituting a client's keys* (man in the middle): the advertisements are signed
  (``signatures=True``); the neighbour leaves the victim's key list, and with fewer than ``t``
  authentic neighbours the victim aborts at the share stage.  Unsigned: not stopped (above).
- *Withholding keys or sealed shares, corrupting shares in transit, excluding neighbours*: each
  is a way to make a client mask with fewer peers.  Each client keeps ``|U_i| >= t``: it aborts
  (``ProtocolAbort``) before masking if fewer than ``t`` neighbours are left to mask with, and
  in signed mode it drops a neighbour only on a complaint the accuser signed, bound to round,
  accuser and accused list (the server forwards them with the exclusions); an unbacked,
  forged or replayed complaint aborts the client.  The earlier argument here, that a lying
  exclusion list "can only make clients skip masks", was wrong: stripping *every* pairwise
  mask of a victim left ``y = x + PRG(b)`` and ``b`` is legitimately revealed for a survivor
  (issue 11, finding 1; ``test_finding1_server_cannot_strip_every_pairwise_mask_of_a_victim``).
  With ``t`` mask peers, unmasking a victim alone needs the masking keys of ``t`` peers (so
  ``t`` of them declared dropped) and its seed from its other neighbours, ``k - t + c < t`` of them.
- *Different survivor lists for different clients* (to get ``t`` seed shares of a client from
  some neighbours and ``t`` key shares from others): the consistency round.  Every client
  signs the survivor list it was shown; before revealing anything a client checks ``t``
  signatures of its neighbours, listed as survivors, on *its* list; ``2t > k`` leaves no room
  for two camps of ``t``.
- *Unmask requests asking for both secrets of a peer*, or naming a client both alive and
  dropped, or asking again: a client reveals per peer the seed share (survivor) or the key
  share (dropped), never both, answers once (a second request is "out of order"), and refuses a
  request that lists it as dropped or disagrees with the list it signed.
- *Replays from other rounds or addressed to another client*: every message is bound to round
  and sender; sealed shares to round, sender and receiver (AES-GCM associated data).

Blame, don't abort.  A client whose revealed shares are off the polynomial the majority of
shares lie on is rejected by name (``DecryptionError``); a client whose seed commitment does
not match the seed its consistent shares determine is rejected by name and its masked input,
whose seed the shares fix, stays in the sum (removing it would need both of its secrets).  The
round aborts only when no ``t`` consistent shares determine a needed secret.

Share complaints (after the share stage, before anyone masks): each client reports the
neighbours whose sealed shares fail AES-GCM authentication (or whose keys are unusable); the
server excludes every accused client before the masked stage, and every client masks with
none of them.  So a client that sends bad sealed shares costs only itself (rejected with a
``DecryptionError`` naming it and its accusers), not the round.  The trade-off: a complaint
cannot be verified (only the accuser holds the channel key), so a malicious client, or a
server that corrupts shares in transit, can get honest neighbours excluded from *this* round,
as if they had dropped before masking; the ``t`` floor above bounds what that can do.

Guarantees
----------
- The revealed sum equals the plain weighted sum within ``FixedPoint.error_bound``, or the
  round (bucket) aborts with ``AggregateOutOfRange``: a decoded sum outside what ``m``
  in-range inputs can produce is never returned.
- If some needed secret has fewer than ``t`` shares, ``ProtocolAbort`` is raised before any
  secret is reconstructed: nothing is unmasked.
- A tampered sealed share or advertisement, a replayed or misdirected message, a malformed
  message: a typed ``ProtocolError`` naming the sender, recorded in ``RoundOutput.rejected``;
  the round goes on over the others while thresholds hold.

Weights: each client encodes ``w * x`` and, in one extra coordinate, ``w`` itself, so the server
divides the decoded sum by the decoded total weight and never sees a single weight.

Bucketed mode (``buckets = s >= 2``): the cohort is split into ``n // s`` random buckets of
(at least) ``s`` clients by a partition derived from SHA-256 of the public round data (the
server cannot choose it; clients can recompute it); each bucket runs its own secure sum; the
defense receives the bucket means with the bucket total weights (Karimireddy et al., ICLR 2022,
bucketing), through ``securefml.defenses.buckets.aggregate_buckets``.  The declared leakage
grows as ``s`` shrinks: the server learns the sum of every bucket of ``s`` clients.  A bucket
that falls below threshold aborts alone and the others go on.

Differences from Flower's SecAgg+ (1.42): AES-256-CTR masks from full 256-bit seeds (not
MT19937 seeded with 32 bits); 33-byte Shamir shares of raw 32-byte secrets (not 306-byte PEM
keys); uint32 (or uint16) on the wire (not int64); optional signatures and consistency round; signed,
client-verified exclusions; a range-checked sum with one bit of headroom.

Driving the halves over your own transport (every message is ``bytes``):

>>> import numpy as np
>>> from securefml.protocols.secagg import SecAggPlus
>>> from securefml.protocols.secagg_client import SecAggClient
>>> from securefml.protocols.secagg_server import SecAggServer
>>> plan = SecAggPlus().plan(0, [1, 2, 3], 4, max_weight=1.0)
>>> server, clients = SecAggServer(plan), {c: SecAggClient(c, plan) for c in plan.cohort}
>>> for c, cl in clients.items():
...     server.receive_advertise(c, cl.advertise())
>>> for c, cl in clients.items():
...     server.receive_share(c, cl.share(server.keys_for(c)))
>>> for c, cl in clients.items():
...     server.receive_complaints(c, cl.complain(server.shares_for(c)))
>>> server.close_complaints()
(1, 2, 3)
>>> for c, cl in clients.items():
...     server.receive_masked(c, cl.masked(server.exclusions_for(c), np.full(4, 0.25 * c, np.float32), 1.0))
>>> server.close_masked()
(1, 2, 3)
>>> for c, cl in clients.items():
...     server.receive_unmask(c, cl.unmask(server.request_for(c)))
>>> weighted_sum, total_weight = plan.fixed_point.decode_sum(server.finish())
>>> np.round(weighted_sum / total_weight, 6).tolist(), round(total_weight, 6)
([0.5, 0.5, 0.5, 0.5], 3.0)

References
----------
Bonawitz et al., Practical Secure Aggregation for Privacy-Preserving Machine Learning, CCS 2017.
Bell et al., Secure Single-Server Aggregation with (Poly)Logarithmic Overhead, CCS 2020.
Karimireddy, He, Jaggi, Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing, ICLR 2022.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefml.errors import AggregateOutOfRange, ConfigError, InvalidUpdateError, ProtocolAbort, ProtocolError
from securefml.protocols.base import (
    AggregationProtocol,
    ClientUpdate,
    Reveals,
    RoundOutput,
    Transport,
    nothing_accepted,
)
from securefml.protocols.quantize import FixedPoint
from securefml.protocols.secagg_client import MaskJob, SecAggClient, run_mask_job
from securefml.protocols.secagg_graph import GraphParams, bucket_partition, derive_parameters, round_seed
from securefml.protocols.secagg_messages import Stage
from securefml.protocols.secagg_plan import RoundPlan
from securefml.protocols.secagg_server import MaskRunner, SecAggServer, mask_total
from securefml.updates import LayerLayout

if TYPE_CHECKING:  # pragma: no cover
    from securefml.defenses.base import Defense

__all__ = ["SecAggPlus", "SumResult"]

log = logging.getLogger(__name__)

#: Above this fraction of clipped entries in a round, SecAggPlus warns (once per instance).
CLIP_WARNING_FRACTION = 0.01

MAIN_SHARE = 0.8  # the driver's process takes 80% of an equal share of the mask jobs


@dataclass
class SumResult:
    """The outcome of one secure sum (one bucket, or the whole cohort)."""

    cohort: tuple[int, ...]
    params: GraphParams
    weighted_sum: np.ndarray | None  # float64 [L]; None when aborted
    total_weight: float
    contributors: tuple[int, ...]
    rejected: dict[int, ProtocolError | InvalidUpdateError] = field(default_factory=dict)
    client_errors: dict[int, str] = field(default_factory=dict)
    bytes_uploaded: int = 0
    aborted: str | None = None
    error_bound: float = math.inf
    timings: dict[str, float] = field(default_factory=lambda: {"clients_s": 0.0, "server_s": 0.0})


class SecAggPlus(AggregationProtocol):
    """SecAgg+ secure aggregation: the server learns only (bucket) sums.

    Parameters
    ----------
    neighbours:
        Graph degree ``k``; None derives it from the cohort size and the two fractions;
        ``k >= n - 1`` is classic SecAgg (complete graph).
    threshold:
        Shamir threshold ``t`` (must exceed ``k / 2``); None derives it.
    dropout_fraction, corrupt_fraction:
        Tolerated fractions of dropped and server-colluding clients (used when deriving).
    clip_range:
        Entries are clipped to ``[-clip_range, clip_range]`` before quantization.
    bits:
        Ring size ``2**bits`` (8..32); the scale is picked from the cohort size so sums never overflow.
    buckets:
        Bucket size ``s``. 0 or 1: one secure sum (reveals ``Reveals.SUM``); ``>= 2``: random
        buckets of ``s`` clients, one secure sum each (reveals ``Reveals.BUCKETS``, for robust rules).
    signatures:
        Active-server option: Ed25519-signed advertisements and the consistency round.
    noise_fn:
        Distributed-DP hook: each client applies it to its float update before quantization.
    ring_noise:
        Distributed-DP hook in the integer ring: ``ring_noise(job)`` returns int64 noise of
        ``len(job.vector) + 1`` entries, added to the client's quantized vector before masking
        (``securefml.privacy.distributed.DistributedSkellam`` sets it).
    max_weight:
        Public bound on a client's weight (larger weights are clipped to it); None uses the
        next power of two above the cohort's largest weight.
    identities:
        Client id -> Ed25519 identity key (the PKI) for ``signatures``; None generates one per
        client on first use (simulation).
    public_seed:
        Public randomness mixed into the graph and bucket seeds (e.g. a beacon value).
    workers:
        Processes used for mask expansion in the in-memory driver (1 = in process).
    sigma, eta:
        Security and correctness parameters of the derivation (failure probability ``2**-sigma``
        and ``2**-eta``).
    headroom_bits:
        Ring bits kept free above the largest honest sum so out-of-range sums are detected
        (``FixedPoint.check_sum``); each bit halves the precision.
    checks:
        The issue-11 checks (clients verify exclusions and keep ``t`` mask peers; the decoded
        sum is range-checked).  ``False`` only to measure their cost (``benchmarks/secagg.py``):
        without them a lying server can recover an input and a client can corrupt the sum.
    """

    name = "secagg"

    # Interim (this session's architecture work): the halves of this protocol are being moved
    # behind ``server_half``/``client_half``; until then its own ``run_round`` drives it.
    def server_half(self, round_idx, layout, cohort, *, setup):  # type: ignore[no-untyped-def]
        raise NotImplementedError(f"{self.name}: server_half is being ported; use run_round")

    def client_half(self, round_idx, layout, update):  # type: ignore[no-untyped-def]
        raise NotImplementedError(f"{self.name}: client_half is being ported; use run_round")

    def __init__(
        self,
        *,
        neighbours: int | None = None,
        threshold: int | None = None,
        dropout_fraction: float = 0.1,
        corrupt_fraction: float = 0.0,
        clip_range: float = 1.0,
        bits: int = 32,
        buckets: int = 0,
        signatures: bool = False,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        ring_noise: Callable[[MaskJob], np.ndarray] | None = None,
        max_weight: float | None = None,
        identities: Mapping[int, Ed25519PrivateKey] | None = None,
        public_seed: bytes = b"",
        workers: int = 1,
        sigma: int = 40,
        eta: int = 10,
        headroom_bits: int = 1,
        checks: bool = True,
    ) -> None:
        if neighbours is not None and neighbours < 2:
            raise ConfigError(f"neighbours must be >= 2, got {neighbours}")
        if threshold is not None and threshold < 1:
            raise ConfigError(f"threshold must be >= 1, got {threshold}")
        if buckets < 0:
            raise ConfigError(f"buckets must be >= 0, got {buckets}")
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        if max_weight is not None and not (math.isfinite(max_weight) and max_weight > 0):
            raise ConfigError(f"max_weight must be positive, got {max_weight}")
        if not (0 <= dropout_fraction < 1 and 0 <= corrupt_fraction < 0.5):
            raise ConfigError("need 0 <= dropout_fraction < 1 and 0 <= corrupt_fraction < 1/2")
        FixedPoint(clip_range, 1, bits, headroom_bits=headroom_bits)  # validates them now, not mid-round
        self.neighbours = neighbours
        self.threshold = threshold
        self.dropout_fraction = dropout_fraction
        self.corrupt_fraction = corrupt_fraction
        self.clip_range = float(clip_range)
        self.bits = bits
        self.buckets = buckets
        self.signatures = signatures
        self.noise_fn = noise_fn
        self.ring_noise = ring_noise
        self.max_weight = max_weight
        self.public_seed = public_seed
        self.workers = workers
        self.sigma = sigma
        self.eta = eta
        self.headroom_bits = headroom_bits
        self.checks = checks
        self.reveals = Reveals.BUCKETS if buckets >= 2 else Reveals.SUM
        self._identities: dict[int, Ed25519PrivateKey] = dict(identities or {})
        self._warned: set[str] = set()  # warnings already given by this instance (one per run)
        self._pool: ProcessPoolExecutor | None = None

    def __repr__(self) -> str:
        return (
            f"SecAggPlus(neighbours={self.neighbours}, threshold={self.threshold}, dropout_fraction="
            f"{self.dropout_fraction}, corrupt_fraction={self.corrupt_fraction}, clip_range={self.clip_range}, "
            f"bits={self.bits}, buckets={self.buckets}, signatures={self.signatures}, workers={self.workers}, "
            f"headroom_bits={self.headroom_bits}, checks={self.checks})"
        )

    @property
    def active_server_secure(self) -> bool:
        """Whether the privacy guarantee holds against an *active* (deviating) server.

        Only with ``signatures``: without a PKI nothing authenticates the advertised keys, so an
        active server can substitute its own keys for a victim's neighbours and open every share
        the victim sends (``test_unsigned_mode_does_not_claim_active_security``).  Unsigned mode
        is secure against an honest-but-curious server only.
        """
        return self.signatures

    # -- resources -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Shut down the worker processes, if any."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> SecAggPlus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get_pool(self) -> ProcessPoolExecutor | None:
        """``workers - 1`` helper processes; this process always takes a share of the work."""
        if self.workers <= 1:
            return None
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers - 1)
        return self._pool

    def identity(self, client_id: int) -> Ed25519PrivateKey:
        """The identity key of ``client_id`` (generated on first use when none was given)."""
        if client_id not in self._identities:
            self._identities[client_id] = Ed25519PrivateKey.generate()
        return self._identities[client_id]

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        """Log ``message`` as a warning the first time ``key`` occurs, at debug level after that.

        Bucketed rounds plan one secure sum per bucket: a per-sum warning would repeat
        buckets x rounds times for one cause.
        """
        if key in self._warned:
            log.debug(message, *args)
            return
        self._warned.add(key)
        log.warning(message, *args)

    def clipped_fraction(self, updates: Sequence[ClientUpdate]) -> float:
        """The fraction of the round's entries outside ``[-clip_range, clip_range]`` (clipped on encoding).

        Counted by this in-process driver, which holds the clients' inputs anyway; in a
        deployment each client would count its own.  Only the round's total is recorded.
        """
        total = sum(u.vector.numel() for u in updates)
        if total == 0:
            return 0.0
        over = sum(int((u.vector.detach().abs() > self.clip_range).sum()) for u in updates)
        return over / total

    # -- planning --------------------------------------------------------------------------------------
    def graph_params(self, n: int) -> GraphParams:
        """``k`` and ``t`` for a secure sum over ``n`` clients."""
        if n < 2:
            raise ConfigError(f"secure aggregation needs at least 2 clients, got {n}")
        derived = None
        if self.neighbours is None or self.threshold is None:
            try:
                derived = derive_parameters(n, dropout_fraction=self.dropout_fraction,
                                            corrupt_fraction=self.corrupt_fraction, sigma=self.sigma, eta=self.eta)
            except ConfigError as exc:  # small cohorts: keep the security condition, lose dropout tolerance
                corrupt = math.ceil(self.corrupt_fraction * n)
                derived = GraphParams(n - 1, min(n - 1, (n - 1 + corrupt) // 2 + 1))
                self._warn_once(f"complete-graph-{n}", "secagg: %s; using the complete graph with t=%d "
                                "(said once per run)", exc, derived.t)
        k = min(self.neighbours, n - 1) if self.neighbours is not None else derived.k  # type: ignore[union-attr]
        if self.threshold is not None:
            t = self.threshold
        elif self.neighbours is None:
            t = derived.t  # type: ignore[union-attr]
        else:
            c = math.ceil(self.corrupt_fraction * k)
            t = (k + c) // 2 + 1
        if t > k:
            raise ConfigError(f"threshold {t} exceeds the {k} neighbours of a {n}-client sum")
        return GraphParams(k, t)

    def plan(
        self,
        round_idx: int,
        cohort: Sequence[int],
        length: int,
        *,
        max_weight: float,
        layout: LayerLayout | None = None,
        layers: Sequence[str] = (),
    ) -> RoundPlan:
        """The public plan of one secure sum over ``cohort``."""
        members = tuple(sorted(cohort))
        identities = {}
        if self.signatures:
            identities = {c: self.identity(c).public_key().public_bytes_raw() for c in members}
        return RoundPlan(
            round_idx=round_idx,
            cohort=members,
            params=self.graph_params(len(members)),
            fixed_point=FixedPoint(self.clip_range, len(members), self.bits, max_weight, self.headroom_bits),
            length=length,
            layout_fingerprint=layout.fingerprint() if layout is not None else b"",
            layers=tuple(layers),
            signatures=self.signatures,
            identities=identities,
            public_seed=self.public_seed,
        )

    # -- the in-memory driver ---------------------------------------------------------------------------
    def secure_sum(
        self,
        plan: RoundPlan,
        inputs: Mapping[int, tuple[torch.Tensor | np.ndarray, float]],
        *,
        transport: Transport | None = None,
    ) -> SumResult:
        """Run all stages for ``plan.cohort`` over ``transport``; ``inputs[c] = (vector, weight)``."""
        transport = transport or Transport()
        server = SecAggServer(plan)
        clients = {
            c: SecAggClient(c, plan, identity=self.identity(c) if plan.signatures else None, checks=self.checks)
            for c in plan.cohort
        }
        res = SumResult(plan.cohort, plan.params, None, 0.0, ())
        alive = set(plan.cohort)
        clock = res.timings

        def srv(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock["server_s"] += time.perf_counter() - t0

        def client_step(c: int, fn: Callable[[], Any]) -> Any:
            t0 = time.perf_counter()
            try:
                return fn()
            except InvalidUpdateError as exc:
                server.reject(c, ProtocolError(str(exc), sender=c))
                res.rejected[c] = exc
            except ProtocolError as exc:  # the client stops (e.g. it caught the server cheating)
                log.warning("secagg: client %s stopped: %s", c, exc)
                res.client_errors[c] = f"{type(exc).__name__}: {exc}"
            finally:
                clock["clients_s"] += time.perf_counter() - t0
            alive.discard(c)
            return None

        def deliver(c: int, stage: Stage, data: bytes, receive: Callable[[int, bytes], None]) -> None:
            msg = transport.deliver(c, stage.value, data)
            if msg is None:
                alive.discard(c)
                return
            res.bytes_uploaded += len(msg)
            try:
                srv(receive, c, msg)
            except (ProtocolError, InvalidUpdateError) as exc:
                log.warning("secagg: rejected client %s at %s: %s", c, stage.value, exc)
                server.reject(c, exc if isinstance(exc, ProtocolError) else ProtocolError(str(exc), sender=c))
                res.rejected[c] = exc
                alive.discard(c)

        for c in plan.cohort:
            adv = client_step(c, clients[c].advertise)
            if adv is not None:
                deliver(c, Stage.ADVERTISE, adv, server.receive_advertise)
        for c in sorted(alive):
            keys = srv(server.keys_for, c)
            data = client_step(c, functools.partial(clients[c].share, keys))
            if data is not None:
                deliver(c, Stage.SHARE, data, server.receive_share)
        for c in sorted(alive):
            shares = srv(server.shares_for, c)
            data = client_step(c, functools.partial(clients[c].complain, shares))
            if data is not None:
                deliver(c, Stage.COMPLAINTS, data, server.receive_complaints)
        try:
            srv(server.close_complaints)
            alive.difference_update(server.state.excluded)
            jobs: dict[int, MaskJob] = {}
            for c in sorted(alive):
                vec, weight = inputs[c]
                excluded = srv(server.exclusions_for, c)
                job = client_step(c, functools.partial(clients[c].prepare_masked, excluded, vec, weight,
                                                       noise_fn=self.noise_fn))
                if job is not None:
                    if self.ring_noise is not None:
                        job.ring_noise = self.ring_noise(job)
                    jobs[c] = job
            t0 = time.perf_counter()
            masked_msgs = self._run_jobs(jobs)
            clock["clients_s"] += time.perf_counter() - t0
            for c, masked in masked_msgs:
                if isinstance(masked, InvalidUpdateError):
                    server.reject(c, ProtocolError(str(masked), sender=c))
                    res.rejected[c] = masked
                    alive.discard(c)
                    continue
                deliver(c, Stage.MASKED, masked, server.receive_masked)
            srv(server.close_masked)
            if plan.signatures:
                for c in [c for c in server.state.contributors if c in alive]:
                    msg = srv(server.survivors_for, c)
                    data = client_step(c, functools.partial(clients[c].consistency, msg))
                    if data is not None:
                        deliver(c, Stage.CONSISTENCY, data, server.receive_consistency)
                askers = [c for c in server.state.sigs if c in alive]
            else:
                askers = [c for c in server.state.contributors if c in alive]
            for c in sorted(askers):
                msg = srv(server.request_for, c)
                data = client_step(c, functools.partial(clients[c].unmask, msg))
                if data is not None:
                    deliver(c, Stage.UNMASK, data, server.receive_unmask)
            total = srv(server.finish, mask_runner=self._mask_runner())
        except ProtocolAbort as exc:
            log.warning("secagg: round %s aborted: %s", plan.round_idx, exc)
            res.aborted = str(exc)
            res.rejected.update({c: e for c, e in server.state.rejected.items() if c not in res.rejected})
            return res
        res.rejected.update({c: e for c, e in server.state.rejected.items() if c not in res.rejected})
        contributors = server.state.contributors
        weighted_sum, total_weight = srv(plan.fixed_point.decode_sum, total)
        if self.checks:
            try:
                srv(plan.fixed_point.check_sum, weighted_sum, total_weight, len(contributors))
            except AggregateOutOfRange as exc:  # some client sent a ring element outside the code
                log.warning("secagg: round %s: discarding the sum: %s", plan.round_idx, exc)
                res.aborted = f"AggregateOutOfRange: {exc}"
                return res
        res.contributors = contributors
        res.weighted_sum, res.total_weight = weighted_sum, total_weight
        res.error_bound = plan.fixed_point.error_bound(len(res.contributors), res.total_weight)
        return res

    def _run_jobs(self, jobs: dict[int, MaskJob]) -> list[tuple[int, bytes | InvalidUpdateError]]:
        """Run the clients' mask jobs, some here and the rest in the helper processes.

        This process also feeds the helpers and plays the server, so it keeps a smaller share
        (``MAIN_SHARE`` of an equal split).
        """
        pool = self._get_pool()
        items = list(jobs.items())
        futures = {}
        if pool is not None and len(items) > 1:
            mine = int(len(items) * MAIN_SHARE / self.workers)
            futures = {c: pool.submit(run_mask_job, job) for c, job in items[mine:]}
        done: dict[int, bytes | InvalidUpdateError] = {}
        for c, job in items:
            if c not in futures:
                try:
                    done[c] = run_mask_job(job)
                except InvalidUpdateError as exc:
                    done[c] = exc
        for c, fut in futures.items():
            try:
                done[c] = fut.result()
            except InvalidUpdateError as exc:
                done[c] = exc
        return [(c, done[c]) for c, _ in items]

    def _mask_runner(self) -> MaskRunner | None:
        pool = self._get_pool()
        if pool is None:
            return None
        parts = self.workers

        def runner(n: int, dtype: np.dtype, plus: Sequence[bytes], minus: Sequence[bytes]) -> Callable[[], np.ndarray]:
            # helpers take (parts - 1) / parts of the streams; this process the rest, after its own summation
            futures = [pool.submit(mask_total, n, dtype, list(plus[i::parts]), list(minus[i::parts]))
                       for i in range(1, parts) if plus[i::parts] or minus[i::parts]]

            def wait() -> np.ndarray:
                total = mask_total(n, dtype, list(plus[0::parts]), list(minus[0::parts]))
                for fut in futures:
                    np.add(total, fut.result(), out=total)
                return total

            return wait

        return runner

    def run_round(
        self,
        round_idx: int,
        updates: Sequence[ClientUpdate],
        layout: LayerLayout,
        *,
        defense: Defense,
        transport: Transport | None = None,
        reference: torch.Tensor | None = None,
        context: Mapping[str, object] | None = None,
    ) -> RoundOutput:
        """Securely aggregate ``updates`` (one secure sum, or one per bucket) and run ``defense``.

        Raises ``ConfigError`` if clients upload different layers (SecAgg needs a server-dictated
        plan) and ``ProtocolAbort`` if no (bucket) sum survives.
        """
        self.check_defense(defense)
        if not updates:
            raise nothing_accepted(round_idx, 0, {})
        ids = [u.client_id for u in updates]
        if len(set(ids)) != len(ids):
            raise ConfigError("client ids in one round must be distinct")
        layer_sets = {layout.canonical(u.layers) for u in updates}
        if len(layer_sets) != 1:
            raise ConfigError("SecAgg needs every client to upload the same layers (a server-dictated plan)")
        (layers,) = layer_sets
        length = layout.numel_of(layers)
        max_w = self.max_weight
        if max_w is None:
            top = max(float(u.weight) for u in updates)
            max_w = 2.0 ** math.ceil(math.log2(top)) if top > 0 and math.isfinite(top) else 1.0
        inputs = {u.client_id: (u.vector, float(u.weight)) for u in updates}
        clipped = self.clipped_fraction(updates)
        if clipped > CLIP_WARNING_FRACTION:
            self._warn_once("clipped", "secagg: %.1f%% of round %d's entries exceed clip_range=%g and were clipped "
                            "(said once per run; each round's fraction is in RoundRecord.extras['clipped_fraction'])",
                            100 * clipped, round_idx, self.clip_range)
        cohort = tuple(sorted(ids))
        if self.buckets >= 2:
            if len(cohort) < self.buckets:
                raise ConfigError(f"{len(cohort)} clients cannot fill a bucket of {self.buckets}")
            seed = round_seed(round_idx, cohort, self.public_seed, "buckets")
            groups = bucket_partition(cohort, len(cohort) // self.buckets, seed)
        else:
            groups = [cohort]
        results = [
            self.secure_sum(self.plan(round_idx, g, length, max_weight=max_w, layout=layout, layers=layers),
                            {c: inputs[c] for c in g}, transport=transport)
            for g in groups
        ]
        out = self._output(results, layout, layers, defense, context)
        out.extras["clipped_fraction"] = clipped
        return out

    def _output(
        self,
        results: list[SumResult],
        layout: LayerLayout,
        layers: tuple[str, ...],
        defense: Defense,
        context: Mapping[str, object] | None,
    ) -> RoundOutput:
        rejected = {c: f"{type(e).__name__}: {e}" for r in results for c, e in r.rejected.items()}
        nbytes = sum(r.bytes_uploaded for r in results)
        extras: dict[str, object] = {
            "params": [(r.params.k, r.params.t) for r in results],
            "client_errors": {c: m for r in results for c, m in r.client_errors.items()},
            "error_bound": max((r.error_bound for r in results if r.aborted is None), default=math.inf),
            "timings": {k: sum(r.timings[k] for r in results) for k in ("clients_s", "server_s")},
        }
        if self.buckets >= 2:
            extras["buckets"] = {i: r.cohort for i, r in enumerate(results)}
            extras["aborted_buckets"] = {i: r.aborted for i, r in enumerate(results) if r.aborted is not None}
        ok = [(i, r) for i, r in enumerate(results) if r.aborted is None and r.total_weight > 0]
        if not ok:
            reasons = "; ".join(r.aborted or "no weight" for r in results)
            raise ProtocolAbort(f"no secure sum survived this round: {reasons}")
        sums = torch.stack([torch.from_numpy(r.weighted_sum) for _, r in ok])  # type: ignore[arg-type]
        weights = [r.total_weight for _, r in ok]
        ctx = dict(context or {})
        if self.buckets >= 2:
            from securefml.defenses.buckets import aggregate_buckets  # defenses import protocols: import late

            result = aggregate_buckets(defense, sums.to(torch.float32), weights, [r.contributors for _, r in ok],
                                       context=ctx)
            extras["bucket_index"] = tuple(i for i, _ in ok)
            extras["flagged_buckets"] = result.info.get("flagged_buckets", ())
        else:
            result = defense((sums / weights[0]).to(torch.float32), weights, client_ids=(-1,), context=ctx)
        assert result.aggregate is not None
        agg = layout.scatter(result.aggregate.to(torch.float32), layers)
        total = float(sum(weights))
        totals = {name: (total if name in layers else 0.0) for name in layout.layer_names}
        accepted = tuple(sorted(c for _, r in ok for c in r.contributors))
        return RoundOutput(agg, totals, accepted, rejected, flagged=tuple(result.flagged), bytes_uploaded=nbytes,
                           defense=result, extras=extras)
