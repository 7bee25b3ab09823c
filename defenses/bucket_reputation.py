"""Reputation under bucketed SecAgg: attribute bucket disagreement to members over rounds.

Bucketed SecAgg reveals one weighted sum per random bucket of ``s`` clients and the bucket
membership (public: the partition is derived from the round's public seed).  One round says
nothing about a single client.  But the buckets are re-drawn every round, so a client that
keeps landing in outlying buckets accumulates evidence while its honest partners change
(group testing): an honest client shares a bucket with an attacker only in the rounds the
partition pairs them, an attacker is in an outlying bucket every round it attacks.

Per round, with ``m_b`` the bucket means:

* **Score.**  Each bucket's cosine with the consensus of the other buckets (the sum of their
  *unit* means; ``reputation.consensus_cosine`` on the buckets' Gram), as ``Reputation`` scores
  clients.  Every member of bucket ``b`` receives ``z_b``.
* **Norm gate** (``gate``, default 3).  A bucket whose mean is longer than ``gate`` times the
  round's (lower) median bucket norm scores -1 and is left out of this round's consensus and
  aggregate.  Honest bucket means in a round have comparable norms; a bucket holding an
  attacker that scales its update (10x sign flip) does not.  An attacker that stays below the
  gate is clipped by the wrapped rule (median clipping by default) exactly as without the gate,
  so the gate never weakens that bound; it only spends, in the rounds it fires, the honest
  partners of the gated bucket (a majority of the buckets is always kept, see below).
* **Evidence.**  Per client the sum ``S`` of its buckets' scores over the ``k`` rounds it took
  part in, and ``stat = S / (sigma sqrt(k))`` with ``sigma`` a robust scale of recent bucket
  scores.  As in ``Reputation``, all stored rounds (``history``) are re-scored every round
  (``rescore`` passes): later passes form each round's consensus only from buckets none of
  whose members has negative evidence, so the attackers leave the consensus of past rounds too.
* **Exclusion.**  A client with ``k >= min_rounds`` and ``stat < -threshold`` is flagged; every
  bucket holding a flagged client, and every gated bucket, is left out of the aggregate, at most
  ``(K - 1) // 2`` of ``K`` buckets (gated buckets first, then by their worst member's
  evidence), so the wrapped rule always sees a majority of the buckets.  The honest partners of
  a flagged client lose their contribution in that round; nothing else happens to them.

What the server learns: nothing beyond what every rule on bucketed SecAgg sees, the bucket
sums, the bucket total weights and the membership (the protocol's declared leakage).  The
client flags are a function of those values over rounds; the rule never receives a single
client's update (``BucketAware.decide_buckets`` is only given ``aggregate_buckets``' inputs).

Limits: the evidence per client is diluted by its partners (a bucket of ``s`` with one
attacker is a ``1/s`` mixture), so separating clients takes more participations than per-client
reputation; an attacker that agrees with the consensus on average (mimic, small ALIE shifts) is
left to the wrapped rule; reputation is keyed by client id (no Sybil re-registration).  On
plaintext rows (``aggregate``) each row is its own bucket of one client.

References
----------
Karimireddy, He, Jaggi, Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing,
ICLR 2022 (random buckets before a robust rule).  Dorfman, The Detection of Defective Members
of Large Populations, 1943, and Du and Hwang, Combinatorial Group Testing, 2000 (identifying
members from tests on random pools).  Regatti, Chen, Gupta, ByGARS, 2020 (reputation over rounds).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import torch

from securefml.defenses.base import AggregationResult, Defense
from securefml.defenses.buckets import BucketAware, BucketMembership
from securefml.defenses.mean import Mean
from securefml.defenses.preaggregators import MedianClipping
from securefml.defenses.registry import DEFENSES
from securefml.defenses.reputation import batched_consensus_cosine, cosine_matrix, robust_scale
from securefml.errors import ConfigError
from securefml.gram import Gram
from securefml.reveals import Reveals

__all__ = ["BucketReputation", "norm_gate", "lower_median"]


def norm_gate(norms: torch.Tensor, gate: float | None, reference: float | None = None) -> torch.Tensor:
    """Rows whose norm exceeds ``gate`` times ``reference`` (default: the lower median norm).

    No row is gated with fewer than 3 rows or ``gate`` None.
    """
    n = norms.numel()
    if gate is None or n < 3:
        return torch.zeros(n, dtype=torch.bool)
    ref = lower_median(norms) if reference is None else reference
    return norms.to(torch.float64) > gate * ref


def lower_median(values: torch.Tensor) -> float:
    """The ``ceil(n/2)``-th smallest value."""
    n = values.numel()
    return float(values.to(torch.float64).sort().values[(n + 1) // 2 - 1])


@DEFENSES.register("bucketrep")
class BucketReputation(BucketAware):
    """Per-client evidence from bucket scores across rounds; leaves out buckets with flagged members.

    Parameters
    ----------
    rule:
        The rule run on the kept bucket means (default ``MedianClipping() >> Mean()``); must run
        on bucket sums.
    threshold:
        Flag while ``S / (sigma sqrt(k)) < -threshold`` (0: while the mean bucket agreement is negative).
    min_rounds:
        Participations needed before a client can be flagged.
    gate:
        Bucket norm above ``gate`` x the round's median bucket norm: score -1, left out (None: off).
    rescore:
        Passes re-scoring the stored rounds against the buckets without distrusted members.
    history:
        How many recent rounds are stored and re-scored.
    window:
        How many recent bucket scores the pooled scale ``sigma`` is estimated from.
    """

    name = "bucketrep"
    runs_on = frozenset({Reveals.UPDATES, Reveals.BUCKETS})

    def __init__(
        self, rule: Defense | None = None, *, threshold: float = 0.0, min_rounds: int = 3, gate: float | None = 3.0,
        gate_history: int = 10, growth: float = 2.0, rescore: int = 6, history: int = 250, window: int = 2000,
    ) -> None:
        if isinstance(threshold, bool) or not (isinstance(threshold, (int, float)) and 0 <= threshold < float("inf")):
            raise ConfigError(f"threshold must be non-negative and finite, got {threshold!r}")
        if isinstance(min_rounds, bool) or not isinstance(min_rounds, int) or min_rounds < 1:
            raise ConfigError(f"min_rounds must be a positive integer, got {min_rounds!r}")
        if gate is not None and (isinstance(gate, bool) or not isinstance(gate, (int, float))
                                 or not 1 < gate < float("inf")):
            raise ConfigError(f"gate must be a finite factor > 1 or None, got {gate!r}")
        if isinstance(rescore, bool) or not isinstance(rescore, int) or rescore < 0:
            raise ConfigError(f"rescore must be an integer >= 0, got {rescore!r}")
        if isinstance(gate_history, bool) or not isinstance(gate_history, int) or gate_history < 0:
            raise ConfigError(f"gate_history must be a number of rounds >= 0, got {gate_history!r}")
        if isinstance(growth, bool) or not (isinstance(growth, (int, float)) and 1 <= growth < float("inf")):
            raise ConfigError(f"growth must be a finite factor >= 1, got {growth!r}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ConfigError(f"history must be a positive number of rounds, got {history!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 8:
            raise ConfigError(f"window must be an integer >= 8, got {window!r}")
        self.rule = rule if rule is not None else MedianClipping(history=10) >> Mean()
        if not isinstance(self.rule, Defense) or Reveals.BUCKETS not in self.rule.runs_on:
            raise ConfigError(f"rule must be a Defense that runs on bucket sums, got {self.rule!r}")
        self.threshold = float(threshold)
        self.min_rounds = min_rounds
        self.gate = None if gate is None else float(gate)
        self.gate_history = gate_history
        self.growth = float(growth)
        self._references: list[float] = []
        self.rescore = rescore
        self.history = history
        self.window = window
        self.needs_reference = self.rule.needs_reference
        self._rounds: deque[tuple[tuple[tuple[int, ...], ...], torch.Tensor, torch.Tensor]] = deque(maxlen=history)
        self._count: dict[int, int] = {}
        self._stat: dict[int, float] = {}

    # -- evidence ------------------------------------------------------------------------------
    def statistic(self, client_id: int) -> float | None:
        """``S / (sigma sqrt(k))`` for a client seen ``k`` times (after the latest re-scoring), None if never."""
        return self._stat.get(int(client_id))

    def is_flagged(self, client_id: int) -> bool:
        stat = self.statistic(client_id)
        return stat is not None and self._count[int(client_id)] >= self.min_rounds and stat < -self.threshold

    def flagged_ids(self) -> tuple[int, ...]:
        """Every client (seen so far) currently flagged."""
        return tuple(sorted(c for c in self._count if self.is_flagged(c)))

    def _rescore(self) -> torch.Tensor:
        """Re-score every stored round (``rescore`` passes); returns the latest round's bucket scores."""
        rounds = list(self._rounds)
        r, width = len(rounds), max(len(mem) for mem, _, _ in rounds)
        cos = torch.zeros(r, width, width, dtype=torch.float64)
        valid = torch.zeros(r, width, dtype=torch.bool)
        gated = torch.zeros(r, width, dtype=torch.bool)
        index: dict[int, int] = {}
        t_round: list[int] = []
        t_bucket: list[int] = []
        t_client: list[int] = []
        for k, (mem, c, g) in enumerate(rounds):
            nb = len(mem)
            cos[k, :nb, :nb] = c
            valid[k, :nb] = True
            gated[k, :nb] = g
            for b, group in enumerate(mem):
                for cid in group:
                    t_round.append(k)
                    t_bucket.append(b)
                    t_client.append(index.setdefault(cid, len(index)))
        tr, tb, tc = torch.tensor(t_round), torch.tensor(t_bucket), torch.tensor(t_client)
        m = len(index)
        count = torch.zeros(m, dtype=torch.float64).scatter_add_(0, tc, torch.ones(tc.numel(), dtype=torch.float64))
        base = valid & ~gated
        base = torch.where(base.sum(1, keepdim=True) >= 2, base, valid)
        stat = torch.zeros(m, dtype=torch.float64)
        z = torch.zeros(r, width, dtype=torch.float64)
        for it in range(self.rescore + 1):
            members = base
            if it > 0:  # buckets none of whose members has negative evidence
                worst = torch.full((r * width,), float("inf"), dtype=torch.float64)
                flat = worst.scatter_reduce(0, tr * width + tb, stat[tc], reduce="amin")
                trusted = base & (flat.view(r, width) >= 0)
                members = torch.where(trusted.sum(1, keepdim=True) >= 2, trusted, base)
            z = batched_consensus_cosine(cos, members)
            z = torch.where(gated, torch.full_like(z, -1.0), z)
            z = torch.where(valid, z, torch.zeros_like(z))
            scores = z[valid]
            recent = scores[-self.window:]
            sigma = max(robust_scale(recent), 1e-6) if recent.numel() >= 8 else 1.0
            total = torch.zeros(m, dtype=torch.float64).scatter_add_(0, tc, z[tr, tb])
            stat = total / (sigma * count.sqrt())
        names = {v: c for c, v in index.items()}
        self._count = {names[i]: int(count[i]) for i in range(m)}
        self._stat = {names[i]: float(stat[i]) for i in range(m)}
        return z[-1, :len(rounds[-1][0])].clone()

    def _excluded(self, membership: BucketMembership, gated: torch.Tensor) -> torch.Tensor:
        """Buckets left out this round: gated or holding a flagged client, at most ``(K - 1) // 2``."""
        k = membership.k
        worst = [min((self.statistic(c) or 0.0) if self.is_flagged(c) else 0.0 for c in mem)
                 for mem in membership.members]
        out = [b for b in range(k) if bool(gated[b]) or worst[b] < 0]
        out.sort(key=lambda b: (not bool(gated[b]), worst[b]))
        mask = torch.zeros(k, dtype=torch.bool)
        mask[out[:(k - 1) // 2]] = True
        return mask

    def _reference(self, norms: torch.Tensor) -> float:
        """The gate's reference norm: the round's lower median, capped at ``growth`` x the median of past ones.

        A round whose buckets are mostly held by attackers (3 attackers of 10 in buckets of 2
        land in 3 of the 5 buckets more often than not) puts an attacker's norm at the median;
        the cap keeps such a round's reference within ``growth`` of the recent honest ones.
        """
        ref = lower_median(norms)
        if self.gate_history and self._references:
            past = sorted(self._references)
            ref = min(ref, self.growth * past[(len(past) - 1) // 2])
        if self.gate_history:
            self._references = [*self._references, ref][-self.gate_history:]
        return ref

    # -- entry points --------------------------------------------------------------------------
    def decide_buckets(
        self, means: torch.Tensor, totals: torch.Tensor, membership: BucketMembership, *, context: Mapping[str, Any]
    ) -> AggregationResult:
        if means.dim() != 2 or means.shape[0] != membership.k:
            raise ConfigError(f"{tuple(means.shape)} bucket means for {membership.k} buckets")
        t = torch.as_tensor(totals, dtype=torch.float64).reshape(-1)
        if t.numel() != membership.k or not bool((t > 0).all()) or not bool(torch.isfinite(t).all()):
            raise ConfigError("one positive finite total weight per bucket is required")
        finite = torch.isfinite(means).all(dim=1).cpu()
        if not bool(finite.any()):
            raise ConfigError("every bucket mean is non-finite")
        k = membership.k
        gram = Gram.from_updates(torch.where(finite[:, None].to(means.device), means, torch.zeros_like(means)),
                                 tuple(range(k)))
        norms = torch.diagonal(gram.inner).clamp_min(0).sqrt().cpu()
        gated = norm_gate(norms, self.gate, self._reference(norms[finite])) | ~finite
        if k >= 3:
            self._rounds.append((membership.members, cosine_matrix(gram.inner).cpu(), gated.clone()))
            z = self._rescore()
            drop = self._excluded(membership, gated)
        else:
            z = torch.zeros(k, dtype=torch.float64)
            drop = ~finite
        drop |= ~finite
        keep = (~drop).nonzero().flatten()
        res = self.rule(means[keep.to(means.device)], t[keep], client_ids=tuple(-(b + 1) for b in keep.tolist()),
                        context=context)
        flagged = tuple(c for c in membership.clients if self.is_flagged(c))
        info = {"bucket_scores": z, "rule_flagged_buckets": tuple(-c - 1 for c in res.flagged),
                "evidence": {c: self.statistic(c) for c in membership.clients}, "gated_buckets":
                tuple(int(b) for b in gated.nonzero().flatten().tolist())}
        return AggregationResult(res.aggregate, membership.clients, weights=None, scores=None, flagged=flagged,
                                 info=info, flagged_buckets=tuple(int(b) for b in drop.nonzero().flatten().tolist()),
                                 suspected=flagged)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        """Plaintext rows: each row is a bucket of one client."""
        return self.decide_buckets(updates, weights, BucketMembership.of([[c] for c in client_ids]), context=context)

    def reduces_to_mean(self, n: int, context: Mapping[str, Any]) -> str | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": [{"members": [list(m) for m in mem], "cos": c.tolist(), "gated": g.tolist()}
                           for mem, c, g in self._rounds], "references": list(self._references),
                "rule": self.rule.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        rounds = state.get("rounds", [])
        if not isinstance(rounds, list):
            raise ConfigError("BucketReputation state 'rounds' must be a list of {members, cos, gated} records")
        self._rounds = deque(maxlen=self.history)
        for rec in rounds:
            mem = BucketMembership.of(rec["members"]).members
            cos = torch.tensor(rec["cos"], dtype=torch.float64)
            gated = torch.tensor(rec["gated"], dtype=torch.bool)
            if cos.shape != (len(mem), len(mem)) or gated.shape != (len(mem),):
                raise ConfigError(f"BucketReputation state round of {len(mem)} buckets has a {tuple(cos.shape)} matrix")
            self._rounds.append((mem, cos, gated))
        self._references = [float(v) for v in state.get("references", [])][-self.gate_history:] \
            if self.gate_history else []
        self._count, self._stat = {}, {}
        if self._rounds:
            self._rescore()
        self.rule.load_state_dict(state.get("rule", {}))

    def __repr__(self) -> str:
        return (f"BucketReputation({self.rule!r}, threshold={self.threshold}, min_rounds={self.min_rounds}, "
                f"gate={self.gate}, gate_history={self.gate_history}, growth={self.growth}, "
                f"rescore={self.rescore}, history={self.history}, window={self.window})")
