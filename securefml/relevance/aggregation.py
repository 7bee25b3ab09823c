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
* ``CKKS`` (``encrypted``): the key holder decrypts the Gram of the signed, encrypted task
  vectors; the weights come from it; each client's aggregate is one ``AggregateRequest`` with
  its row of coefficients, checked against the key holder's ``RelevancePolicy`` by the server
  before it asks and by the key holder itself before it decrypts.  The key holder must have
  been given a ``RelevancePolicy`` (``ConfigError`` otherwise).  The bound is then
  recipient-blind (``policy``): rows are tempered to ``worst_case_effective >= m_min`` with
  ``m_min`` the larger of the config's and the key holder's.
* ``SecAggPlus``: the cohort is partitioned into relevance groups of at least
  ``min_group_size`` clients (``grouping``), each group is one SecAgg+ secure sum, and every
  member's aggregate is its group's mean.  Declared leakage: the task vectors' Gram (needed to
  group), group membership, group sums.  An undersized group that no group is relevant enough
  to join (``group_min_link``) is a fragment: not summed, its members keep their own models.

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
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from securefml.errors import ConfigError, InvalidUpdateError, ProtocolError
from securefml.gram import Gram
from securefml.protocols.base import AggregationProtocol, Transport
from securefml.protocols.ckks import CKKS
from securefml.protocols.ckks_keys import CKKSKeyHolder
from securefml.protocols.plaintext import Plaintext
from securefml.protocols.secagg import SecAggPlus
from securefml.relevance.encrypted import EncryptedRelevance
from securefml.relevance.grouping import relevance_groups
from securefml.relevance.weights import (
    cross_cosine,
    cross_weights,
    effective_contributors,
    relevance_weights,
    temper,
    temper_row,
    worst_case_effective,
)

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
    group_min_link:
        SecAgg+ grouping: an undersized group joins another only if their average task-vector
        cosine is at least this (``relevance_groups(min_link=...)``); a group left undersized
        (a *fragment*) is not summed and its members keep their own models for the round.
        None forces every client into a group of ``group_size`` (the earlier rule, which mixed
        unrelated tasks whenever a task had fewer than ``group_size`` members in the cohort).
        Default 0.25: on ``digits-clusters`` (seeds 10 and 11, task vectors only, no accuracy
        looked at) same-group pairs have mean cosine 0.47-0.51 and other-group pairs 0.09-0.16.
    blind:
        Temper rows to the recipient-blind bound (``worst_case_effective``: ``n_eff`` after
        leaving out any one client) instead of leaving out the row's own client.  Always on
        under CKKS (what its key holder can check); settable here so a plaintext run can
        apply exactly the CKKS weights.
    """

    temperature: float = 0.2
    include_self: bool = True
    standardize: bool = True
    min_effective: float = 2.0
    min_group_size: int | None = None
    group_min_link: float | None = 0.25
    blind: bool = False

    def __post_init__(self) -> None:
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ConfigError(f"temperature must be positive and finite, got {self.temperature}")
        if not self.min_effective >= 1:
            raise ConfigError(f"min_effective must be >= 1, got {self.min_effective}")
        if self.min_group_size is not None and self.min_group_size < 2:
            raise ConfigError(f"min_group_size must be >= 2 (a secure sum needs 2 clients), got {self.min_group_size}")
        if self.group_min_link is not None and not -1.0 <= self.group_min_link <= 1.0:
            raise ConfigError(f"group_min_link is a cosine in [-1, 1], got {self.group_min_link}")

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


def _with_margin(m_min: float) -> float:
    """Temper a hair above the bound: the CKKS path drops coefficients below ``SKIP_BELOW``
    before it asks, which lowers ``n_eff`` by about that much, and the key holder checks
    ``>= m_min`` exactly."""
    return m_min * (1 + 1e-6) if m_min > 1 else m_min


def _digest(vector: torch.Tensor) -> bytes:
    data = vector.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


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
        self.encrypted: EncryptedRelevance | None = None
        self.min_effective = self.config.min_effective
        self.blind = self.config.blind
        if isinstance(self.protocol, CKKS):
            key_holder = getattr(self.protocol, "key_holder", None)
            if not isinstance(key_holder, CKKSKeyHolder):
                raise ConfigError("the CKKS protocol object holds no CKKSKeyHolder")
            self.encrypted = EncryptedRelevance(key_holder)
            self.min_effective = max(self.config.min_effective, self.encrypted.policy.min_effective)
            self.blind = True
        # CKKS: decrypted task-vector inner products, kept while a client's vector is unchanged
        self._inner: dict[tuple[int, int], float] = {}
        self._digests: dict[int, bytes] = {}

    def __repr__(self) -> str:
        return f"RelevanceAggregation({self.config}, protocol={self.protocol.name})"

    # -- weights ------------------------------------------------------------------------------
    def weights_from_gram(self, gram: Gram, *, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Tempered relevance weights from the task vectors' Gram; ``allowed`` masks columns."""
        w = relevance_weights(gram.cosine(), temperature=self.config.temperature,
                              include_self=self.config.include_self, standardize=self.config.standardize)
        n = w.shape[0]
        m = self.min_effective
        target = _with_margin(m)
        if allowed is not None:
            keep = allowed.to(torch.bool).reshape(-1)
            if keep.numel() != n:
                raise ConfigError(f"allowed mask has {keep.numel()} entries for {n} clients")
            cols = keep.clone()
            w = w * cols.to(w.dtype)[None, :]
            empty = w.sum(1) <= 0
            w[empty] = cols.to(w.dtype)  # a row with no allowed candidate: uniform over the allowed
            w = w / w.sum(1, keepdim=True).clamp_min(1e-300)
            if m > 1:
                w = self._temper_masked(w, keep)
            return w
        if m > 1 and n - 1 >= m * (1 - 1e-5):
            w = temper(w, target, include_self=self.config.include_self, blind=self.blind)
        return w

    def _temper_masked(self, w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``temper`` restricted to the allowed columns (a row's fallback spreads over them only)."""
        m = self.min_effective
        out = w.clone()
        for i in range(w.shape[0]):
            cand = keep.clone()
            if not self.config.include_self:
                cand[i] = False
            others = keep.clone()
            others[i] = False
            if int(others.sum()) < m:
                continue
            out[i] = temper_row(w[i], i, _with_margin(m), cand, blind=self.blind)
        return out

    def heldout_weights(self, new_vectors: torch.Tensor, train_vectors: torch.Tensor) -> torch.Tensor:
        """``[h, n]`` weights of new (held-out) clients over training clients, plaintext cosines."""
        return self.cross_from_cosines(cross_cosine(new_vectors, train_vectors))

    def cross_from_cosines(self, cos: torch.Tensor) -> torch.Tensor:
        """``[h, n]`` held-out weights from their cosines to the training clients, tempered.

        A new client is nobody's member: every training client counts as "other" in its
        effective number of contributors.
        """
        w = cross_weights(cos, temperature=self.config.temperature, standardize=self.config.standardize)
        m = self.min_effective
        if m > 1 and w.shape[1] >= m:
            cand = torch.ones(w.shape[1], dtype=torch.bool)
            w = torch.stack([temper_row(row, None, _with_margin(m), cand, blind=self.blind) for row in w])
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
        if isinstance(self.protocol, SecAggPlus):
            return self._secagg(round_idx, ids, models, p, task_vectors, transport)
        for cid, row, v in zip(ids, models, task_vectors):
            if not (torch.isfinite(row).all() and torch.isfinite(v).all()):
                raise InvalidUpdateError("model or task vector contains NaN or Inf", sender=cid)
        if self.encrypted is not None:
            if allowed is not None:
                raise ConfigError("a robust filter before relevance weighting needs the plaintext protocol")
            return self._ckks(round_idx, ids, models, p, task_vectors)
        return self._plain(ids, models, p, task_vectors, allowed)

    # -- plaintext ----------------------------------------------------------------------------
    def _plain(self, ids: tuple[int, ...], models: torch.Tensor, p: torch.Tensor, tv: torch.Tensor,
               allowed: torch.Tensor | None) -> PersonalizedAggregate:
        w = self.weights_from_gram(Gram.from_updates(tv, ids), allowed=allowed)
        x = models.to(torch.float64)
        per = (w @ x).to(torch.float32)
        pg = p if allowed is None else p * allowed.to(torch.float64)
        glob = ((pg / pg.sum()) @ x).to(torch.float32)
        eff = tuple(self._effective(w[i], i) for i in range(len(ids)))
        return PersonalizedAggregate(ids, w, per, glob, eff)

    def _effective(self, row: torch.Tensor, position: int | None) -> float:
        return worst_case_effective(row) if self.blind else effective_contributors(row, exclude=position)

    # -- CKKS -----------------------------------------------------------------------------------
    def register(self, round_idx: int, client_ids: Sequence[int], task_vectors: torch.Tensor, *,
                 slot: int = 0) -> Gram:
        """CKKS: one key-holder Gram of these clients' encrypted task vectors, remembered.

        A gradient task vector at a frozen reference network on fixed support data does not
        change from round to round, so its inner products are learned once (e.g. in an
        enrolment phase over every client, held-out ones included) and reused while the
        client's vector stays the same; a client whose vector changed (a shift, noise) is
        dropped from the cache and the next round asks for a fresh Gram.  Declared leakage: the
        same inner products, once.  The digest stands for the client saying "unchanged" (the
        simulation computes it from the vector in-process).
        """
        enc = self.encrypted
        if enc is None:
            raise ConfigError("register is the CKKS path's enrolment of task vectors")
        ids = tuple(int(c) for c in client_ids)
        gram = enc.gram(round_idx, ids, task_vectors, slot=slot)
        for c, v in zip(ids, task_vectors):
            d = _digest(v)
            if self._digests.get(c) != d:
                self._inner = {k: x for k, x in self._inner.items() if c not in k}
                self._digests[c] = d
        for a in range(len(ids)):
            for b in range(a, len(ids)):
                key = (min(ids[a], ids[b]), max(ids[a], ids[b]))
                self._inner[key] = float(gram.inner[a, b])
        return gram

    def _task_gram(self, round_idx: int, ids: tuple[int, ...], tv: torch.Tensor, *, slot: int = 0) -> Gram:
        cached = all(self._digests.get(c) == _digest(v) for c, v in zip(ids, tv))
        if cached:
            try:
                mat = torch.tensor([[self._inner[(min(a, b), max(a, b))] for b in ids] for a in ids],
                                   dtype=torch.float64)
            except KeyError:
                cached = False
        if not cached:
            return self.register(round_idx, ids, tv, slot=slot)
        return Gram(ids, mat, None, None)

    def _ckks(self, round_idx: int, ids: tuple[int, ...], models: torch.Tensor, p: torch.Tensor,
              tv: torch.Tensor) -> PersonalizedAggregate:
        enc = self.encrypted
        assert enc is not None
        t0 = time.perf_counter()
        gram = self._task_gram(round_idx, ids, tv, slot=0)
        t_gram = time.perf_counter() - t0
        w = self.weights_from_gram(gram)
        n = len(ids)
        rows = torch.cat([w, (p / p.sum())[None, :]])  # the last row: the global aggregate
        got = enc.combine(round_idx, ids, models, rows, first_slot=1)
        if n not in got.vectors:
            raise ProtocolError(f"round {round_idx}: the global aggregate was refused: {got.refused.get(n)}")
        rejected = {ids[r]: reason for r, reason in got.refused.items() if r < n}
        keep = sorted(r for r in got.vectors if r < n)
        applied = torch.stack([got.applied[r] for r in range(n + 1) if r in got.vectors and r < n]) \
            if keep else torch.zeros((0, n), dtype=torch.float64)
        per = torch.stack([torch.from_numpy(got.vectors[r]).to(torch.float32) for r in keep]) if keep else \
            torch.zeros((0, models.shape[1]))
        glob = torch.from_numpy(got.vectors[n]).to(torch.float32)
        kept_ids = tuple(ids[r] for r in keep)
        square = applied[:, keep] if keep else applied
        eff = tuple(self._effective(applied[k], keep[k]) for k in range(len(keep)))
        for r, why in got.refused.items():
            log.warning("round %d: per-client aggregate of client %s not decrypted: %s", round_idx,
                        ids[r] if r < n else "global", why)
        return PersonalizedAggregate(kept_ids, square, per, glob, eff, rejected=rejected,
                                     bytes_uploaded=got.bytes_uploaded,
                                     timing={"gram_s": t_gram, "combine_s": time.perf_counter() - t0 - t_gram})

    def heldout_encrypted(
        self, round_idx: int, new_ids: Sequence[int], new_vectors: torch.Tensor, train_ids: Sequence[int],
        train_vectors: torch.Tensor, train_models: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, str]]:
        """CKKS: held-out clients' weights and mixtures of the training models.

        One key-holder Gram over the training and new task vectors (declared leakage: their
        cosines), the new clients' rows tempered to the recipient-blind bound, one request per
        new client.  Returns ``([h, n] weights, [h, d] mixtures, refused)``; a refused client's
        mixture row is NaN and its id is in ``refused`` (the caller falls back to the global model).
        """
        enc = self.encrypted
        if enc is None:
            raise ConfigError("heldout_encrypted needs the CKKS protocol")
        all_ids = tuple(int(c) for c in train_ids) + tuple(int(c) for c in new_ids)
        gram = self._task_gram(round_idx, all_ids, torch.cat([train_vectors, new_vectors]), slot=0)
        cos = gram.cosine()
        n = len(train_ids)
        w = self.cross_from_cosines(cos[n:, :n])
        got = enc.combine(round_idx, train_ids, train_models, w, first_slot=1)
        mixed = torch.full((w.shape[0], train_models.shape[1]), float("nan"))
        applied = torch.zeros_like(w)
        for r, vec in got.vectors.items():
            mixed[r] = torch.from_numpy(vec).to(torch.float32)
            applied[r] = got.applied[r]
        refused = {int(new_ids[r]): why for r, why in got.refused.items()}
        return applied, mixed, refused

    # -- SecAgg+ ------------------------------------------------------------------------------
    def _secagg(self, round_idx: int, ids: tuple[int, ...], models: torch.Tensor, p: torch.Tensor, tv: torch.Tensor,
                transport: Transport | None) -> PersonalizedAggregate:
        assert isinstance(self.protocol, SecAggPlus)
        proto = self.protocol
        gram = Gram.from_updates(tv, ids)  # declared leakage of the grouping mode
        groups = relevance_groups(gram.cosine(), self.config.group_size, min_link=self.config.group_min_link)
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
            if len(g) < self.config.group_size and len(groups) > 1:
                # a fragment (group_min_link): not summed; each member keeps its own model
                for i in g:
                    per[i] = models[i]
                    w[i, i] = 1.0
                    done.append(i)
                continue
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
        if not done or total_w <= 0:
            raise ProtocolError(f"round {round_idx}: no relevance group's secure sum survived")
        keep = sorted(done)
        kept_ids = tuple(ids[i] for i in keep)
        w = w[keep][:, keep]
        eff = tuple(effective_contributors(w[i], exclude=i) for i in range(len(keep)))
        glob = (total / total_w).to(torch.float32)
        gid = tuple(tuple(ids[i] for i in g) for g in groups)
        return PersonalizedAggregate(kept_ids, w, per[keep], glob, eff, groups=gid, rejected=rejected,
                                     bytes_uploaded=nbytes, timing={"secure_sums_s": time.perf_counter() - t0})
