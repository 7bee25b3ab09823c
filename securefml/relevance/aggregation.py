"""``RelevanceAggregation``: one aggregate per client, weighted by task relevance, plus the global one.

The step (FedMosaic's RELA, Seo et al., ICLR 2026) takes what the clients upload this round
-- their new local models ``x_j`` and task vectors ``v_j`` -- and returns, for every client i
of the cohort, ``a_i = sum_j w_ij x_j`` with ``w_i = softmax_j(sim(v_i, v_j) / T)`` (see
``weights``), and the global aggregate ``sum_j p_j x_j`` (``p`` = sample weights).  Unrelated
clients get (almost) no weight in each other's aggregates, which removes the interference
between conflicting tasks that a single global average suffers from.

It is self-contained: it runs the protocol halves it needs itself, so it can become the one
aggregation step after the protocols once the round is split into halves.

Under each protocol
-------------------
* ``Plaintext``: weights from the task vectors' cosine matrix; aggregates by one matmul.
* ``CKKS``: task vectors and models are encrypted by the clients (``CKKSClient``); the server
  (public context only) computes the encrypted Gram of the task vectors, the key holder
  decrypts that scalar matrix only, the server derives the weights, forms each ``a_i`` as an
  encrypted weighted sum, and ``a_i`` is decrypted *for client i*.  Before each decryption the
  row is checked against the effective-contributors policy (``weights.check_effective``);
  rows are first tempered towards uniform so that honest rounds never trip it.
* ``SecAggPlus``: the cohort is partitioned into relevance groups of at least
  ``min_group_size`` clients (``grouping``), each group is one SecAgg+ secure sum, and every
  member's aggregate is its group's mean.  Declared leakage: the task vectors' Gram (needed to
  group), group membership, group sums.

Threat model and declared leakage
---------------------------------
Server honest-but-curious.  It learns the task vectors' Gram (cosines), the weight matrix and
the global aggregate.  Per-client aggregates are meant for their client only: a party that
saw *all* n per-client aggregates of a round and the (public) weight matrix could solve the
linear system for individual models when the matrix is invertible, so in a deployment each
``a_i`` is decrypted by (or for) client i alone.  The simulation keeps them in one process.
Client i learns ``sum_{j != i} w_ij x_j``; the policy ``n_eff >= min_effective`` bounds how
concentrated that is on one other client (each other client carries at most
``1 / sqrt(min_effective)`` of the others' mass).  Colluding clients pool their aggregates:
not covered.  Byzantine clients may send any model or task vector: relevance weights alone are
not a defense (a client that copies another group's task vector attracts that group's weight);
``allowed`` lets a robust rule exclude clients first.

How this plugs into the CKKS key holder
---------------------------------------
``CKKSKeyHolder.decrypt_aggregate`` today checks a contributor count.  The check here,
``check_effective(row, i, m_min)``, needs the row of coefficients the server used; the key
holder should be handed that row with the ciphertext (and, to stop a lying server, verify it
against the Gram it decrypted itself, recomputing the softmax) and refuse below ``m_min``.
Until then this step calls the check immediately before each ``decrypt_aggregate``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tenseal as ts
import torch

from securefml.errors import ConfigError, InvalidUpdateError, ProtocolError
from securefml.gram import Gram
from securefml.protocols.base import AggregationProtocol, ClientUpdate, Transport
from securefml.protocols.ckks import CKKS
from securefml.protocols.ckks_stats import PackingFrame, weighted_sum
from securefml.protocols.plaintext import Plaintext
from securefml.protocols.secagg import SecAggPlus
from securefml.relevance.grouping import relevance_groups
from securefml.relevance.weights import (
    check_effective,
    cross_weights,
    effective_contributors,
    relevance_weights,
    temper,
)
from securefml.updates import LayerLayout

__all__ = ["RelevanceConfig", "PersonalizedAggregate", "RelevanceAggregation"]

log = logging.getLogger(__name__)

_TASK_LAYER = "task"


@dataclass(frozen=True)
class RelevanceConfig:
    """Hyper-parameters of relevance-aware aggregation.

    Attributes
    ----------
    temperature:
        Softmax temperature T on the (row-standardized) similarities; small = sharper.
    include_self:
        Whether client i's own model enters its aggregate (default True: its own round of
        training is the most relevant to it; FedMosaic's RELA excludes it).
    standardize:
        Centre and scale each row's similarities before the softmax (T becomes scale-free).
    min_effective:
        ``m_min``: minimum effective number of *other* contributors of a per-client aggregate
        (the key-holder policy; 1 disables it).
    min_group_size:
        SecAgg+ grouping: smallest group (a member learns the sum of >= this - 1 others);
        None = ``ceil(min_effective) + 1``.
    """

    temperature: float = 0.2
    include_self: bool = True
    standardize: bool = True
    min_effective: float = 2.0
    min_group_size: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ConfigError(f"temperature must be positive and finite, got {self.temperature}")
        if not self.min_effective >= 1:
            raise ConfigError(f"min_effective must be >= 1, got {self.min_effective}")
        if self.min_group_size is not None and self.min_group_size < 2:
            raise ConfigError(f"min_group_size must be >= 2 (a secure sum needs 2 clients), got {self.min_group_size}")

    @property
    def group_size(self) -> int:
        return self.min_group_size if self.min_group_size is not None else int(math.ceil(self.min_effective)) + 1


@dataclass
class PersonalizedAggregate:
    """What one relevance step produced.

    Attributes
    ----------
    client_ids:
        The cohort members that were aggregated, in row order.
    weights:
        ``[n, n]`` row-stochastic weights actually applied (row i: client i's aggregate).
    per_client:
        ``[n, d]`` per-client aggregates (row i is meant for client i only).
    global_aggregate:
        ``[d]`` sample-weighted mean of the uploads.
    effective:
        Effective number of other contributors of each row.
    groups:
        SecAgg+ mode: the relevance groups (client ids), else None.
    rejected:
        Client id -> reason, for uploads the protocol rejected.
    """

    client_ids: tuple[int, ...]
    weights: torch.Tensor
    per_client: torch.Tensor
    global_aggregate: torch.Tensor
    effective: tuple[float, ...]
    groups: tuple[tuple[int, ...], ...] | None = None
    rejected: dict[int, str] = field(default_factory=dict)
    bytes_uploaded: int = 0
    timing: dict[str, float] = field(default_factory=dict)

    def row(self, client_id: int) -> torch.Tensor:
        return self.per_client[self.client_ids.index(client_id)]


def _inner(a: Sequence[ts.CKKSVector], b: Sequence[ts.CKKSVector]) -> ts.CKKSVector:
    """Encrypted <a, b> of two chunked vectors: multiply-accumulate, one rotate-and-sum."""
    acc = None
    for x, y in zip(a, b):
        prod = x.square() if x is y else x * y
        acc = prod if acc is None else acc + prod
    if acc is None:
        raise ConfigError("cannot take an inner product of empty vectors")
    return acc.sum()


def _digest(vector: torch.Tensor) -> bytes:
    return hashlib.blake2b(vector.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(),
                           digest_size=16).digest()


class RelevanceAggregation:
    """One aggregate per client by task relevance, under plaintext, CKKS or SecAgg+.

    Parameters
    ----------
    config:
        Temperature, self-inclusion, the effective-contributors policy.
    protocol:
        ``Plaintext``, ``CKKS`` (needs the ``"stats"`` preset: encrypted inner products and
        scalar multiplications) or ``SecAggPlus`` (grouping mode).

    Examples
    --------
    >>> import torch
    >>> from securefml.protocols import Plaintext
    >>> step = RelevanceAggregation(RelevanceConfig(temperature=0.1, min_effective=1), protocol=Plaintext())
    >>> tv = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> models = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])
    >>> out = step.aggregate(0, (0, 1, 2, 3), models, [1.0] * 4, tv)
    >>> [round(float(v), 3) for v in out.per_client[:, 0]]
    [1.0, 1.0, -1.0, -1.0]
    """

    def __init__(self, config: RelevanceConfig | None = None, *, protocol: AggregationProtocol | None = None) -> None:
        self.config = config or RelevanceConfig()
        self.protocol = protocol if protocol is not None else Plaintext()
        if not isinstance(self.protocol, (Plaintext, CKKS, SecAggPlus)):
            raise ConfigError(f"relevance aggregation supports plaintext, ckks and secagg, not {self.protocol.name!r}")
        if isinstance(self.protocol, CKKS) and not self.protocol.preset.statistics:
            raise ConfigError("relevance aggregation under CKKS needs the 'stats' preset (encrypted inner products)")

        self._tv_ct: dict[int, list] = {}
        self._tv_digest: dict[int, bytes] = {}
        self._gram_cache: dict[tuple[int, int], float] = {}

    def __repr__(self) -> str:
        return f"RelevanceAggregation({self.config}, protocol={self.protocol.name})"

    # -- weights ------------------------------------------------------------------------------
    def weights_from_gram(self, gram: Gram, *, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Tempered relevance weights from the task vectors' Gram; ``allowed`` masks columns."""
        w = relevance_weights(gram.cosine(), temperature=self.config.temperature,
                              include_self=self.config.include_self, standardize=self.config.standardize)
        n = w.shape[0]
        if allowed is not None:
            keep = allowed.to(torch.bool).reshape(-1)
            if keep.numel() != n:
                raise ConfigError(f"allowed mask has {keep.numel()} entries for {n} clients")
            cols = keep.clone()
            w = w * cols.to(w.dtype)[None, :]
            empty = w.sum(1) <= 0
            w[empty] = cols.to(w.dtype)  # a row with no allowed candidate: uniform over the allowed
            w = w / w.sum(1, keepdim=True).clamp_min(1e-300)
            if self.config.min_effective > 1:
                w = self._temper_masked(w, keep)
            return w
        if self.config.min_effective > 1 and n - 1 >= self.config.min_effective:
            w = temper(w, self.config.min_effective, include_self=self.config.include_self)
        return w

    def _temper_masked(self, w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``temper`` restricted to the allowed columns (rows mix towards uniform over them)."""
        idx = torch.nonzero(keep).reshape(-1)
        m = self.config.min_effective
        out = w.clone()
        for i in range(w.shape[0]):
            others = idx[idx != i]
            if others.numel() < m or effective_contributors(w[i], exclude=i) >= m:
                continue
            uniform = torch.zeros_like(w[i])
            cand = idx if self.config.include_self or i not in idx.tolist() else others
            uniform[cand] = 1.0 / cand.numel()
            lo, hi = 0.0, 1.0
            for _ in range(60):
                mid = (lo + hi) / 2
                if effective_contributors((1 - mid) * w[i] + mid * uniform, exclude=i) >= m:
                    hi = mid
                else:
                    lo = mid
            out[i] = (1 - hi) * w[i] + hi * uniform
        return out

    def heldout_weights(self, new_vectors: torch.Tensor, train_vectors: torch.Tensor) -> torch.Tensor:
        """``[h, n]`` weights of new (held-out) clients over training clients, plaintext cosines."""
        a = new_vectors.to(torch.float64)
        b = train_vectors.to(torch.float64)
        cos = (a @ b.T) / (a.norm(dim=1, keepdim=True).clamp_min(1e-12) * b.norm(dim=1)[None, :].clamp_min(1e-12))
        return self._cross(cos)

    def _cross(self, cos: torch.Tensor) -> torch.Tensor:
        w = cross_weights(cos, temperature=self.config.temperature, standardize=self.config.standardize)
        m = self.config.min_effective
        if m > 1 and w.shape[1] >= m:
            # a new client is nobody's member: every training client counts as "other"
            padded = torch.cat([torch.zeros(w.shape[0], 1, dtype=w.dtype), w], dim=1)
            out = []
            for row in padded:
                uniform = torch.cat([torch.zeros(1, dtype=w.dtype), torch.full((w.shape[1],), 1.0 / w.shape[1],
                                                                               dtype=w.dtype)])
                lo, hi = 0.0, 1.0
                if effective_contributors(row, exclude=0) < m:
                    for _ in range(60):
                        mid = (lo + hi) / 2
                        if effective_contributors((1 - mid) * row + mid * uniform, exclude=0) >= m:
                            hi = mid
                        else:
                            lo = mid
                    row = (1 - hi) * row + hi * uniform
                out.append(row[1:])
            w = torch.stack(out)
        return w

    # -- one round ----------------------------------------------------------------------------
    def aggregate(
        self,
        round_idx: int,
        client_ids: Sequence[int],
        models: torch.Tensor,
        sample_weights: Sequence[float],
        task_vectors: torch.Tensor,
        *,
        allowed: torch.Tensor | None = None,
        transport: Transport | None = None,
    ) -> PersonalizedAggregate:
        """Per-client and global aggregates of ``models`` ``[n, d]`` weighted by ``task_vectors`` ``[n, k]``."""
        ids = tuple(int(c) for c in client_ids)
        n = len(ids)
        if models.dim() != 2 or models.shape[0] != n or task_vectors.shape[0] != n or len(sample_weights) != n:
            raise ConfigError("models, task vectors, sample weights and client ids must have one row per client")
        if len(set(ids)) != n:
            raise ConfigError("client ids in one round must be distinct")
        if n == 0:
            raise ConfigError("relevance aggregation needs at least one client")
        p = torch.as_tensor(list(sample_weights), dtype=torch.float64)
        if (p <= 0).any() or not torch.isfinite(p).all():
            raise ConfigError("sample weights must be positive and finite")
        if isinstance(self.protocol, CKKS):
            return self._ckks(round_idx, ids, models, p, task_vectors, allowed, transport)
        if isinstance(self.protocol, SecAggPlus):
            return self._secagg(round_idx, ids, models, p, task_vectors, transport)
        return self._plain(ids, models, p, task_vectors, allowed)

    # -- plaintext ----------------------------------------------------------------------------
    def _plain(self, ids: tuple[int, ...], models: torch.Tensor, p: torch.Tensor, tv: torch.Tensor,
               allowed: torch.Tensor | None) -> PersonalizedAggregate:
        for cid, row, v in zip(ids, models, tv):
            if not (torch.isfinite(row).all() and torch.isfinite(v).all()):
                raise InvalidUpdateError("model or task vector contains NaN or Inf", sender=cid)
        w = self.weights_from_gram(Gram.from_updates(tv, ids), allowed=allowed)
        x = models.to(torch.float64)
        per = (w @ x).to(torch.float32)
        pg = p if allowed is None else p * allowed.to(torch.float64)
        glob = ((pg / pg.sum()) @ x).to(torch.float32)
        eff = tuple(effective_contributors(w[i], exclude=i) for i in range(len(ids)))
        return PersonalizedAggregate(ids, w, per, glob, eff)

    # -- CKKS ---------------------------------------------------------------------------------
    def _encrypt_all(
        self, round_idx: int, ids: Sequence[int], rows: torch.Tensor, layout: LayerLayout, stage: str,
        transport: Transport, weights: Sequence[float], rejected: dict[int, str],
    ) -> tuple[dict[int, list], PackingFrame, int]:
        """Each client encrypts its row (client half); the server validates and loads it."""
        assert isinstance(self.protocol, CKKS)
        proto = self.protocol
        frame = PackingFrame(layout, layout.layer_names, proto.preset.slots)
        layers = layout.layer_names
        out: dict[int, list] = {}
        nbytes = 0
        for cid, row, wt in zip(ids, rows, weights):
            if cid in rejected:
                continue
            try:
                msg: bytes | None = proto.client.encode(round_idx, ClientUpdate(cid, row, layers, float(wt)), frame)
            except (InvalidUpdateError, ProtocolError) as exc:
                proto.record_rejection(rejected, cid, exc)
                continue
            msg = transport.deliver(cid, stage, msg)
            if msg is None:
                rejected[cid] = "dropped"
                continue
            nbytes += len(msg)
            try:
                rec = proto.server.decode(round_idx, cid, msg, frame, strict=True)
            except Exception as exc:  # typed errors recorded, anything else re-raised
                proto.record_rejection(rejected, cid, exc)
                continue
            out[cid] = [rec.chunks[k] for k in range(frame.n_chunks)]
        return out, frame, nbytes

    def _ckks(self, round_idx: int, ids: tuple[int, ...], models: torch.Tensor, p: torch.Tensor, tv: torch.Tensor,
              allowed: torch.Tensor | None, transport: Transport | None) -> PersonalizedAggregate:
        assert isinstance(self.protocol, CKKS)
        proto = self.protocol
        transport = transport or Transport()
        rejected: dict[int, str] = {}
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        tv_layout = LayerLayout([(f"{_TASK_LAYER}.vector", (int(tv.shape[1]),))])
        m_layout = LayerLayout([("model.vector", (int(models.shape[1]),))])
        # a client re-sends its task vector only when it changed since it last sent one; the
        # server keeps that ciphertext and the Gram entries it already learned (nothing new leaks)
        changed = [c for c, v in zip(ids, tv) if self._tv_digest.get(c) != _digest(v) or c not in self._tv_ct]
        rows = torch.stack([v for c, v in zip(ids, tv) if c in set(changed)]) if changed else tv[:0]
        fresh, _, b1 = self._encrypt_all(round_idx, changed, rows, tv_layout, "task-vector", transport,
                                         [1.0] * len(changed), rejected)
        for c, v in zip(ids, tv):
            if c in fresh:
                self._tv_ct[c] = fresh[c]
                self._tv_digest[c] = _digest(v)
                self._gram_cache = {k: x for k, x in self._gram_cache.items() if c not in k}
        tv_ct = {c: self._tv_ct[c] for c in ids if c in self._tv_ct and c not in rejected}
        m_ct, m_frame, b2 = self._encrypt_all(round_idx, ids, models, m_layout, "model", transport, p.tolist(),
                                              rejected)
        timing["encrypt_and_receive_s"] = time.perf_counter() - t0
        keep = [i for i, c in enumerate(ids) if c in tv_ct and c in m_ct]
        kept_ids = tuple(ids[i] for i in keep)
        if len(kept_ids) < max(proto.min_contributors, 1):
            raise ProtocolError(f"only {len(kept_ids)} clients survived; the key holder needs {proto.min_contributors}")
        t0 = time.perf_counter()
        gram = self._cached_gram(kept_ids, tv_ct)
        timing["gram_s"] = time.perf_counter() - t0
        sub_allowed = None if allowed is None else allowed.reshape(-1)[keep]
        w = self.weights_from_gram(gram, allowed=sub_allowed)
        t0 = time.perf_counter()
        chunks = [m_ct[c] for c in kept_ids]
        per = torch.zeros((len(kept_ids), models.shape[1]), dtype=torch.float32)
        eff = []
        for i in range(len(kept_ids)):
            row = w[i]
            eff.append(check_effective(row, i, self._policy(len(kept_ids))))  # what the key holder must verify
            per[i] = self._decrypt_weighted(chunks, row.tolist(), m_frame)
        pk = p[keep] if sub_allowed is None else p[keep] * sub_allowed.to(torch.float64)
        glob = self._decrypt_weighted(chunks, (pk / pk.sum()).tolist(), m_frame)
        timing["weighted_sums_s"] = time.perf_counter() - t0
        return PersonalizedAggregate(kept_ids, w, per, glob, tuple(eff), rejected=rejected, bytes_uploaded=b1 + b2,
                                     timing=timing)

    def _cached_gram(self, ids: tuple[int, ...], cts: dict[int, list]) -> Gram:
        """The task vectors' Gram: cached entries plus encrypted inner products for new pairs."""
        assert isinstance(self.protocol, CKKS)
        key = self.protocol.key_holder
        n = len(ids)
        mat = torch.zeros((n, n), dtype=torch.float64)
        for i in range(n):
            for j in range(i, n):
                pair = (min(ids[i], ids[j]), max(ids[i], ids[j]))
                if pair not in self._gram_cache:
                    ct = _inner(cts[ids[i]], cts[ids[j]])
                    # the key holder decrypts a rotate-and-summed scalar, never a vector
                    self._gram_cache[pair] = key._scalar(ct.serialize())
                mat[i, j] = mat[j, i] = self._gram_cache[pair]
        return Gram(ids, mat)

    def _policy(self, n: int) -> float:
        """The enforced minimum: ``min_effective``, unless the cohort is too small to offer it."""
        return min(self.config.min_effective, float(max(n - 1, 1)))

    def _decrypt_weighted(self, chunks: Sequence[Sequence], coeffs: Sequence[float],
                          frame: PackingFrame) -> torch.Tensor:
        assert isinstance(self.protocol, CKKS)
        acc, used = weighted_sum(chunks, coeffs)
        if acc is None:
            return torch.zeros(frame.numel)
        # contributors: the clients with a non-negligible coefficient (the count check of the
        # key holder; the effective-contributors check ran on the row just before)
        dec = self.protocol.key_holder.decrypt_aggregate([a.serialize() for a in acc], contributors=used)
        vec = np.concatenate([dec[k * frame.slots : k * frame.slots + frame.chunk_len(k)]
                              for k in range(frame.n_chunks)])
        return torch.from_numpy(vec).to(torch.float32)

    def ckks_cross_mix(
        self, round_idx: int, new_ids: Sequence[int], new_vectors: torch.Tensor, train_ids: Sequence[int],
        train_vectors: torch.Tensor, train_models: torch.Tensor, *, transport: Transport | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out clients under CKKS: encrypted cross Gram -> weights -> encrypted mixtures.

        Returns ``([h, n] weights, [h, d] mixed models)``; each mixed model is checked against
        the policy before decryption (for the new client it is meant for).
        """
        assert isinstance(self.protocol, CKKS)
        transport = transport or Transport()
        rejected: dict[int, str] = {}
        k = int(train_vectors.shape[1])
        tv_layout = LayerLayout([(f"{_TASK_LAYER}.vector", (k,))])
        m_layout = LayerLayout([("model.vector", (int(train_models.shape[1]),))])
        ones = [1.0] * len(train_ids)
        tr, _, _ = self._encrypt_all(round_idx, train_ids, train_vectors, tv_layout, "task-vector", transport, ones,
                                     rejected)
        nw, _, _ = self._encrypt_all(round_idx, new_ids, new_vectors, tv_layout, "task-vector", transport,
                                     [1.0] * len(new_ids), rejected)
        mods, frame, _ = self._encrypt_all(round_idx, train_ids, train_models, m_layout, "model", transport, ones,
                                           rejected)
        tids = [c for c in train_ids if c in tr and c in mods]
        hids = [c for c in new_ids if c in nw]
        key = self.protocol.key_holder
        sq_t = [key._scalar(tr[c][0].square().sum().serialize()) for c in tids]
        cos = torch.zeros((len(hids), len(tids)), dtype=torch.float64)
        for a, h in enumerate(hids):
            sq_h = key._scalar(nw[h][0].square().sum().serialize())
            for b, c in enumerate(tids):
                ip = key._scalar((nw[h][0] * tr[c][0]).sum().serialize())
                cos[a, b] = ip / max(math.sqrt(max(sq_h, 0) * max(sq_t[b], 0)), 1e-12)
        w = self._cross(cos.clamp(-1, 1))
        chunks = [mods[c] for c in tids]
        mixed = torch.zeros((len(hids), train_models.shape[1]))
        for a in range(len(hids)):
            padded = torch.cat([torch.zeros(1, dtype=w.dtype), w[a]])
            check_effective(padded, 0, min(self.config.min_effective, float(len(tids))))
            mixed[a] = self._decrypt_weighted(chunks, w[a].tolist(), frame)
        return w, mixed

    # -- SecAgg+ ------------------------------------------------------------------------------
    def _secagg(self, round_idx: int, ids: tuple[int, ...], models: torch.Tensor, p: torch.Tensor, tv: torch.Tensor,
                transport: Transport | None) -> PersonalizedAggregate:
        assert isinstance(self.protocol, SecAggPlus)
        proto = self.protocol
        gram = Gram.from_updates(tv, ids)  # declared leakage of the grouping mode
        groups = relevance_groups(gram.cosine(), self.config.group_size)
        d = models.shape[1]
        max_w = float(2.0 ** math.ceil(math.log2(float(p.max())))) if float(p.max()) > 0 else 1.0
        n = len(ids)
        w = torch.zeros((n, n), dtype=torch.float64)
        per = torch.zeros((n, d), dtype=torch.float32)
        rejected: dict[int, str] = {}
        total = torch.zeros(d, dtype=torch.float64)
        total_w = 0.0
        nbytes = 0
        done: list[int] = []
        t0 = time.perf_counter()
        for g in groups:
            members = tuple(ids[i] for i in g)
            plan = proto.plan(round_idx, members, d, max_weight=max_w)
            inputs = {ids[i]: (models[i], float(p[i])) for i in g}
            res = proto.secure_sum(plan, inputs, transport=transport)
            nbytes += res.bytes_uploaded
            rejected.update({c: f"{type(e).__name__}: {e}" for c, e in res.rejected.items()})
            if res.aborted is not None or res.weighted_sum is None or res.total_weight <= 0:
                log.warning("round %d: relevance group %s aborted: %s", round_idx, members, res.aborted)
                continue
            mean = torch.from_numpy(res.weighted_sum / res.total_weight).to(torch.float32)
            contrib = set(res.contributors)
            cw = torch.tensor([float(p[i]) if ids[i] in contrib else 0.0 for i in g], dtype=torch.float64)
            for i in g:
                per[i] = mean
                w[i, list(g)] = cw / cw.sum()
                done.append(i)
            total += torch.from_numpy(res.weighted_sum)
            total_w += res.total_weight
        if not done:
            raise ProtocolError(f"round {round_idx}: no relevance group's secure sum survived")
        keep = sorted(done)
        kept_ids = tuple(ids[i] for i in keep)
        w = w[keep][:, keep]
        eff = tuple(effective_contributors(w[i], exclude=i) for i in range(len(keep)))
        glob = (total / total_w).to(torch.float32)
        gid = tuple(tuple(ids[i] for i in g) for g in groups)
        return PersonalizedAggregate(kept_ids, w, per[keep], glob, eff, groups=gid, rejected=rejected,
                                     bytes_uploaded=nbytes, timing={"secure_sums_s": time.perf_counter() - t0})
