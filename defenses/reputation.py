"""Detection across rounds: per-client reputation from what the protocol reveals.

One round tells little on heterogeneous few-shot clients: honest updates are nearly
orthogonal (cosine about 0.09 +- 0.25 on digits-fewshot) and a unit-scale sign flipper has
the same norm as everyone else, so a per-round detector with a fixed ``f`` flags close to at
random.  Evidence *accumulates*, though: a client's update points against the cohort's
consensus every time it participates.  ``Reputation`` keeps, per client, the sum and count
of a standardised per-round score and flags a client once the evidence is significant; the
flagged clients are excluded before the wrapped rule runs.

Score (per round, per client ``i``): the cosine between ``u_i`` and the sum of the other
non-flagged updates' unit vectors, ``c_i = <v_i, S - v_i> / ||S - v_i||`` with ``v = u / ||u||``
and ``S`` the sum of the consensus members' ``v``.  Normalising makes every member's weight in
the consensus the same whatever its norm: with a raw sum, Byzantine rows scaled by 10 *are* the
consensus, so they score as agreeing and honest clients as disagreeing (the scaled attack then
got honest clients excluded; property-tested now: no attacker scale changes an honest score).
Every term is an entry of the Gram matrix, so the score is computed from a CKKS ``Gram`` (the key holder decrypts
only that matrix) exactly as from plaintext updates.  Evidence: the sum of a client's scores
over the ``k`` rounds it took part in.  The scale ``sigma`` is pooled over every score seen
in the last ``window`` observations (1.4826 times their median absolute deviation, robust to
the attackers' scores).  A client with ``k >= min_rounds`` observations (default 3) is flagged
while ``sum(c) / (sigma sqrt(k)) < -threshold``; at the default ``threshold = 0`` that is while
its mean agreement with the consensus is negative.  Honest clients agree with the consensus
*on average* (on digits-fewshot their cosine is about +0.12, a unit sign flipper's about
-0.15, both +- 0.28 per round), so the evidence separates them as participations accumulate,
while a single round cannot.

Re-scoring the stored rounds (``rescore``, default 6 passes; ``history``, default the last 250
rounds).  A round's consensus contains that round's attackers (2 of 8 on average at 25 %), which
pulls it towards them: the honest clients' scores shrink and the flippers' grow.  Measured on
digits-fewshot (25 % unit sign flippers, 100 rounds, the Gram matrices of real runs), scoring
every client against the consensus of the *honest* members only would separate them almost
perfectly (AUC 0.98-0.99 of the final statistic), against 0.85-0.94 with the round's own
consensus.  The key holder reveals one small cosine matrix per round, so the server keeps them:
each round, every stored round is re-scored, pass 0 against all its members (near-copies
excepted), every later pass against the members whose statistic after the previous pass is not
negative.  Evidence against an attacker thereby removes it from the consensus of the past
rounds too.  Measured: AUC 0.96-0.99 with 3-6 passes; the defaults (6 passes, flag below 0 after
3 rounds) were chosen on seeds 7 and 8 (cumulative TPR/FPR 0.84/0.067 and 0.84/0.027 there)
and then measured on the benchmark's seeds 0-2 (``docs/robustness.md``).  ``rescore=0`` is the
single-pass rule.  Cost: ``rescore + 1`` batched passes over at most ``history`` rounds of
``n x n`` matrices per round (milliseconds for 100 rounds of 8 clients).

Near-copies.  Honest clients with their own data never upload near-identical updates, but
colluders that all send one crafted vector (ALIE, IPM and their "optimal" versions, whose
strength is searched against this very rule) do, and a mimic copies an honest client.  A member
whose cosine with another member of the round is at least ``duplicate`` (default 0.99) scores
-1 that round (the strongest disagreement), does not vote on the consensus, and is excluded from
that round's aggregate.  Measured: under ``optimal-alie`` at 20 % (digits-fewshot FOMAML, 50
rounds, seed 0) ``recommended`` scored 0.2 (chance) without this rule and 0.694 with it, with
TPR 1.0 / FPR 0.03.  Cost and limit: the honest client a mimic copies is a near-copy too, so it
is excluded in the rounds it is copied (and accrues that evidence); colluders that add
independent noise to their common vector are no longer near-copies, but noise of honest size
dilutes the common component by the same factor after ARC's clipping.

Threat model and limits: Byzantine clients that *disagree with the consensus* over the
rounds they take part in (sign flip, IPM, large scaling) are found; an attacker that copies
the consensus (mimic, small ALIE shifts) scores like an honest client and is left to the
wrapped rule, which still bounds its influence.  An attacker that behaves honestly most of
the time accumulates evidence only in the rounds it attacks.  Exclusion is never less robust
than the wrapped rule: the rule runs on the non-flagged rows with the same ``f``, and at
most ``(n - 1) // 2`` of a cohort of ``n`` are excluded (those with the strongest evidence),
so the rule always sees a majority of the cohort.  Reputation
is keyed by client id, so it assumes ids cannot be freshly minted by the attacker (no Sybil
re-registration), as in the reputation literature.

References
----------
J. Regatti, H. Chen, A. Gupta. ByGARS: Byzantine SGD with Arbitrary Number of Attackers,
2020 (reputation scores accumulated over rounds).  L. Muñoz-González, K. T. Co, E. C. Lupu.
Byzantine-Robust Federated Machine Learning through Adaptive Model Averaging (AFA), 2019
(per-client evidence across rounds, blocking of flagged clients).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch

from securefml.defenses.base import AggregationResult, Defense
from securefml.defenses.mean import Mean
from securefml.defenses.registry import DEFENSES
from securefml.errors import ConfigError
from securefml.gram import Gram
from securefml.reveals import Reveals

__all__ = ["consensus_cosine", "batched_consensus_cosine", "cosine_matrix", "copy_groups", "duplicates",
           "robust_scale", "Reputation"]


def consensus_cosine(inner: torch.Tensor, include: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """Cosine of each row with the sum of the *other* included rows, from a Gram matrix.

    ``include`` is a boolean ``[n]`` mask of the rows forming the consensus (a row is never
    compared with itself).  Rows with zero norm get cosine 0.  With ``normalize`` (the
    default) the consensus is the sum of the other rows' *unit* vectors, i.e. the formula runs
    on the cosine matrix: a row's weight in everyone else's consensus does not grow with its
    norm.  Without it, one row scaled by 10 dominates the sum, so the scaled rows agree with
    "the consensus" and honest rows appear to disagree (measured: under 10x sign flips the raw
    sum made reputation flag honest clients and keep the attackers).
    """
    g = inner.to(torch.float64)
    if normalize:
        norms = torch.diagonal(g).clamp_min(0).sqrt()
        unit = torch.where(norms > 0, 1 / norms.clamp_min(1e-300), torch.zeros_like(norms))
        g = g * unit[:, None] * unit[None, :]
    inc = include.to(g.device, torch.float64)
    rowsum = g @ inc  # <u_i, S> with S the sum of the included rows
    diag = torch.diagonal(g)
    own = inc * diag  # subtract u_i itself when it is part of S
    a = rowsum - own
    total = inc @ g @ inc
    sq_rest = (total - 2 * inc * rowsum + own).clamp_min(0)
    denom = diag.clamp_min(0).sqrt() * sq_rest.sqrt()
    return torch.where(denom > 1e-300, a / denom.clamp_min(1e-300), torch.zeros_like(a)).clamp(-1, 1)


def cosine_matrix(inner: torch.Tensor) -> torch.Tensor:
    """The cosine matrix of a Gram matrix (rows with zero norm get cosine 0 with everything)."""
    g = inner.to(torch.float64)
    norms = torch.diagonal(g).clamp_min(0).sqrt()
    unit = torch.where(norms > 0, 1 / norms.clamp_min(1e-300), torch.zeros_like(norms))
    return g * unit[:, None] * unit[None, :]


def batched_consensus_cosine(cos: torch.Tensor, include: torch.Tensor) -> torch.Tensor:
    """``consensus_cosine`` for a stack of ``[r, n, n]`` cosine matrices and ``[r, n]`` masks.

    Rounds with fewer members are zero-padded (a padded row has zero norm, so cosine 0, and is
    never included).  Matches ``consensus_cosine(cos[k], include[k])`` round by round.
    """
    inc = include.to(torch.float64)
    rowsum = (cos @ inc[..., None]).squeeze(-1)
    diag = torch.diagonal(cos, dim1=-2, dim2=-1)
    own = inc * diag
    a = rowsum - own
    total = (inc[:, None, :] @ cos @ inc[..., None]).reshape(-1, 1)
    sq_rest = (total - 2 * inc * rowsum + own).clamp_min(0)
    denom = diag.clamp_min(0).sqrt() * sq_rest.sqrt()
    return torch.where(denom > 1e-300, a / denom.clamp_min(1e-300), torch.zeros_like(a)).clamp(-1, 1)


def duplicates(inner: torch.Tensor, threshold: float) -> torch.Tensor:
    """Rows whose cosine with some *other* row is at least ``threshold`` (near-copies), from a Gram.

    Honest clients with their own data do not upload near-identical updates; colluding
    attackers that send one crafted vector (ALIE, IPM and their optimal versions) or copy an
    honest client (mimic) do.  A copied honest client is a near-copy too (see ``Reputation``).
    """
    g = inner.to(torch.float64)
    norms = torch.diagonal(g).clamp_min(0).sqrt()
    unit = torch.where(norms > 0, 1 / norms.clamp_min(1e-300), torch.zeros_like(norms))
    cos = g * unit[:, None] * unit[None, :]
    cos.fill_diagonal_(-2.0)
    return cos.max(dim=1).values >= threshold if g.shape[0] > 1 else torch.zeros(g.shape[0], dtype=torch.bool)


def copy_groups(inner: torch.Tensor, threshold: float) -> list[list[int]]:
    """The groups of near-copies of a round: connected components of ``cosine >= threshold``, from a Gram.

    Only rows with at least one near-copy appear; each group lists row indices in ascending order.
    Connected components (not cliques), so a chain of near-copies is one group, whatever order the
    rows arrive in.
    """
    n = inner.shape[0]
    if n < 2:
        return []
    cos = cosine_matrix(inner)
    cos.fill_diagonal_(-2.0)
    near = (cos >= threshold).tolist()
    seen: set[int] = set()
    groups: list[list[int]] = []
    for start in range(n):
        if start in seen or not any(near[start]):
            continue
        stack, group = [start], []
        seen.add(start)
        while stack:
            i = stack.pop()
            group.append(i)
            for j in range(n):
                if near[i][j] and j not in seen:
                    seen.add(j)
                    stack.append(j)
        groups.append(sorted(group))
    return groups


def robust_scale(values: torch.Tensor) -> float:
    """1.4826 times the median absolute deviation (the standard deviation for normal data)."""
    med = values.median()
    return float((values - med).abs().median() * 1.4826)


@DEFENSES.register("reputation")
class Reputation(Defense):
    """Accumulate per-client evidence over rounds; exclude flagged clients before ``rule``.

    Parameters
    ----------
    rule:
        The aggregation rule run on the non-flagged clients (default: the mean).  Must run
        on the same protocol reveals (a Gram rule under CKKS).
    threshold:
        Flag while ``sum(c) / (sigma sqrt(k)) < -threshold`` (0: while the mean agreement is negative).
    min_rounds:
        Observations needed before a client can be flagged.
    window:
        How many recent scores (all clients) the pooled scale ``sigma`` is estimated from.
    consensus:
        ``"unflagged"`` (default): the consensus is every non-flagged member; ``"trusted"``:
        only the members whose statistic is not negative (measured on 3 seeds: TPR +0.04 on
        average, FPR up to 0.11 on one seed; not the default).
    duplicate:
        Cosine at or above which two members are near-copies (None: off).
    rescore:
        Passes re-scoring the stored rounds against the members without evidence against them
        (0: score each round once, against its own consensus, as it arrives).
    history:
        How many recent rounds' cosine matrices are stored and re-scored.
    soft:
        Down-weight the members that cannot be flagged yet (seen fewer than ``min_rounds``
        times) by their round's score: weight times ``clip(1 + z / sigma, 0, 1)``, ``z`` the
        member's cosine to the consensus and ``sigma`` the pooled scale (False, the default: full
        weight until flagged).  Meant for attackers that act before ``min_rounds``; measured in
        ``docs/robustness.md``.
    copies:
        What reaches the wrapped rule from a group of near-copies (rows whose cosine is at least
        ``duplicate``): ``"exclude"`` (the default) leaves the whole group out; ``"one"`` lets one
        member through, the non-flagged member with the highest statistic, so the group weighs
        as one client.  Under mimic (colluders copying an honest update) ``"one"`` keeps the
        copied honest update at its own weight instead of dropping it; under a common crafted
        vector (ALIE, IPM) it lets that vector through at one client's weight.  The evidence is
        the same either way (every near-copy scores -1).  Measured in ``docs/robustness.md``.

    Notes
    -----
    ``flagged`` in the result lists the cohort members the reputation currently excludes
    (the wrapped rule's own flags are in ``info["rule_flagged"]``); ``info["scores"]`` has
    the round's cosines and ``info["evidence"]`` each member's running statistic.
    """

    name = "reputation"

    def __init__(
        self, rule: Defense | None = None, *, threshold: float = 0.0, min_rounds: int = 3, window: int = 2000,
        consensus: str = "unflagged", duplicate: float | None = 0.99, rescore: int = 6, history: int = 250,
        soft: bool = False, copies: str = "exclude",
    ) -> None:
        if copies not in ("exclude", "one"):
            raise ConfigError(f"copies must be 'exclude' or 'one', got {copies!r}")
        self.copies = copies
        if not isinstance(soft, bool):
            raise ConfigError(f"soft must be True or False, got {soft!r}")
        self.soft = soft
        if isinstance(threshold, bool) or not (isinstance(threshold, (int, float)) and 0 <= threshold < float("inf")):
            raise ConfigError(f"threshold must be non-negative and finite, got {threshold!r}")
        if isinstance(rescore, bool) or not isinstance(rescore, int) or rescore < 0:
            raise ConfigError(f"rescore must be an integer >= 0 (passes over the stored rounds), got {rescore!r}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ConfigError(f"history must be a positive number of rounds, got {history!r}")
        self.rescore = rescore
        self.history = history
        self._rounds: deque[tuple[tuple[int, ...], torch.Tensor, torch.Tensor]] = deque(maxlen=history)
        if isinstance(min_rounds, bool) or not isinstance(min_rounds, int) or min_rounds < 1:
            raise ConfigError(f"min_rounds must be a positive integer, got {min_rounds!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 8:
            raise ConfigError(f"window must be an integer >= 8, got {window!r}")
        if consensus not in ("trusted", "unflagged"):
            raise ConfigError(f"consensus must be 'trusted' or 'unflagged', got {consensus!r}")
        self.consensus = consensus
        if duplicate is not None and not (isinstance(duplicate, (int, float)) and 0 < duplicate <= 1):
            raise ConfigError(f"duplicate must be a cosine in (0, 1] or None, got {duplicate!r}")
        self.duplicate = None if duplicate is None else float(duplicate)
        self.rule = rule if rule is not None else Mean()
        if not isinstance(self.rule, Defense):
            raise ConfigError(f"rule must be a Defense, got {self.rule!r}")
        self.threshold = float(threshold)
        self.min_rounds = min_rounds
        self.window = window
        self._recent: deque[float] = deque(maxlen=window)
        self.runs_on = frozenset(self.rule.runs_on & {Reveals.UPDATES, Reveals.GRAM})
        self.needs_reference = self.rule.needs_reference
        self._count: dict[int, int] = {}
        self._sum: dict[int, float] = {}

    # -- evidence ------------------------------------------------------------------------------
    def scale(self) -> float:
        """The pooled robust scale of recent scores (1.0 until there are 8 of them)."""
        if len(self._recent) < 8:
            return 1.0
        return max(robust_scale(torch.tensor(list(self._recent), dtype=torch.float64)), 1e-6)

    def statistic(self, client_id: int) -> float | None:
        """``sum(c) / (sigma sqrt(k))`` for a client seen ``k`` times, None if never seen."""
        k = self._count.get(int(client_id), 0)
        return None if k == 0 else self._sum[int(client_id)] / (self.scale() * math.sqrt(k))

    def is_flagged(self, client_id: int) -> bool:
        stat = self.statistic(client_id)
        return stat is not None and self._count[int(client_id)] >= self.min_rounds and stat < -self.threshold

    def flagged_ids(self) -> tuple[int, ...]:
        """Every client (seen so far) the reputation currently flags."""
        return tuple(sorted(c for c in self._count if self.is_flagged(c)))

    def _observe(self, gram: Gram) -> tuple[torch.Tensor, torch.Tensor]:
        """Score the round, update the evidence; returns (scores, keep mask)."""
        ids = gram.client_ids
        if self.rescore > 0:
            return self._observe_rescored(gram)
        prior = torch.tensor([not self.is_flagged(c) for c in ids])
        if gram.n < 3 or int(prior.sum()) < 2:
            return torch.zeros(gram.n, dtype=torch.float64), self._cap(ids, prior)
        members = prior
        if self.consensus == "trusted":
            # the consensus is formed by the members without evidence against them (statistic >= 0
            # or never seen): suspected attackers no longer dilute it before they are flagged
            trusted = torch.tensor([(self.statistic(c) or 0.0) >= 0 for c in ids]) & prior
            if int(trusted.sum()) >= 2:
                members = trusted
        dup = (duplicates(gram.inner, self.duplicate) if self.duplicate is not None
               else torch.zeros(gram.n, dtype=torch.bool))
        if int((members & ~dup).sum()) >= 2:
            members = members & ~dup  # near-copies do not vote on the consensus either
        z = consensus_cosine(gram.inner, members)
        z = torch.where(dup, torch.full_like(z, -1.0), z)  # a near-copy is the strongest evidence
        for c, zi in zip(ids, z.tolist()):
            self._count[c] = self._count.get(c, 0) + 1
            self._sum[c] = self._sum.get(c, 0.0) + zi
            self._recent.append(zi)
        keep = torch.tensor([not self.is_flagged(c) for c in ids]) & ~dup
        return z, self._cap(ids, self._admit_one_copy(gram, keep, dup))

    def _observe_rescored(self, gram: Gram) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the round's cosine matrix, re-score every stored round against today's trust."""
        ids = gram.client_ids
        dup = (duplicates(gram.inner, self.duplicate) if self.duplicate is not None
               else torch.zeros(gram.n, dtype=torch.bool))
        if gram.n < 3:
            return torch.zeros(gram.n, dtype=torch.float64), self._cap(ids, ~dup)
        self._rounds.append((tuple(int(c) for c in ids), cosine_matrix(gram.inner).cpu(), dup.cpu()))
        z = self._rescore()
        keep = torch.tensor([not self.is_flagged(c) for c in ids]) & ~dup
        return z, self._cap(ids, self._admit_one_copy(gram, keep, dup))

    def _admit_one_copy(self, gram: Gram, keep: torch.Tensor, dup: torch.Tensor) -> torch.Tensor:
        """``copies="one"``: let one non-flagged member of each group of near-copies through.

        The member with the highest statistic (ties: the lowest row); a group whose members are
        all flagged stays out.  Near-copies carry one update between them, so admitting one row
        adds at most one client's weight of that update (after clipping, at most the bound).
        """
        if self.copies != "one" or self.duplicate is None or not bool(dup.any()):
            return keep
        keep = keep.clone()
        ids = gram.client_ids
        for group in copy_groups(gram.inner, self.duplicate):
            candidates = [i for i in group if not self.is_flagged(ids[i])]
            if candidates:
                best = max(candidates, key=lambda i: (self.statistic(ids[i]) or 0.0, -i))
                keep[best] = True
        return keep

    def _rescore(self) -> torch.Tensor:
        """Recompute every stored round's scores; ``rescore`` passes; returns the last round's scores.

        Pass 0 forms each round's consensus from all its members (near-copies excepted); every
        later pass only from the members whose statistic after the previous pass is not
        negative.  The Byzantine rows then leave the consensus of the *past* rounds too, once
        evidence against them exists, so the honest clients' early scores stop being diluted
        by them (the clean-consensus limit measured in ``docs/robustness.md``).
        """
        rounds = list(self._rounds)
        r, width = len(rounds), max(len(ids) for ids, _, _ in rounds)
        index: dict[int, int] = {}
        slot = torch.full((r, width), -1, dtype=torch.long)
        cos = torch.zeros(r, width, width, dtype=torch.float64)
        dup = torch.zeros(r, width, dtype=torch.bool)
        for k, (ids, c, d) in enumerate(rounds):
            n = len(ids)
            slot[k, :n] = torch.tensor([index.setdefault(i, len(index)) for i in ids])
            cos[k, :n, :n] = c
            dup[k, :n] = d
        valid = slot >= 0
        flat = slot.clamp_min(0)
        count = torch.zeros(len(index), dtype=torch.float64).scatter_add_(
            0, flat[valid], torch.ones(int(valid.sum()), dtype=torch.float64))
        stat = torch.zeros(len(index), dtype=torch.float64)
        base = valid & ~dup
        base = torch.where((base.sum(1, keepdim=True) >= 2), base, valid)
        for it in range(self.rescore + 1):
            members = base
            if it > 0:
                trusted = base & (stat[flat] >= 0)
                members = torch.where(trusted.sum(1, keepdim=True) >= 2, trusted, base)
            z = batched_consensus_cosine(cos, members)
            z = torch.where(dup, torch.full_like(z, -1.0), z)
            scores = z[valid]  # row-major: rounds in order
            total = torch.zeros(len(index), dtype=torch.float64).scatter_add_(0, flat[valid], scores)
            recent = scores[-self.window:]
            sigma = max(robust_scale(recent), 1e-6) if recent.numel() >= 8 else 1.0
            stat = total / (sigma * count.sqrt())
        names = {v: c for c, v in index.items()}
        self._count = {names[i]: int(count[i]) for i in range(len(index))}
        self._sum = {names[i]: float(total[i]) for i in range(len(index))}
        self._recent = deque(recent.tolist(), maxlen=self.window)
        n_last = len(rounds[-1][0])
        return z[-1, :n_last].clone()

    def _cap(self, ids: tuple[int, ...], keep: torch.Tensor) -> torch.Tensor:
        """Exclude at most ``(n - 1) // 2`` of ``n``: those with the strongest evidence."""
        n = len(ids)
        limit = (n - 1) // 2  # a majority of the cohort always reaches the rule
        excluded = (~keep).nonzero().flatten().tolist()
        if len(excluded) > limit:
            worst = sorted(excluded, key=lambda i: self.statistic(ids[i]) or 0.0)[:limit]
            keep = torch.ones(n, dtype=torch.bool)
            keep[worst] = False
        return keep

    def _finish(
        self, res: AggregationResult, ids: tuple[int, ...], keep: torch.Tensor, z: torch.Tensor
    ) -> AggregationResult:
        kept = keep.nonzero().flatten()
        if res.weights is not None:
            full = torch.zeros(len(ids), dtype=res.weights.dtype, device=res.weights.device)
            full[kept.to(res.weights.device)] = res.weights
            res.weights = full
        info = dict(res.info)
        info.update(rule_flagged=res.flagged, scores=z, evidence={c: self.statistic(c) for c in ids})
        flagged = tuple(c for c, k in zip(ids, keep.tolist()) if not k)
        # the detector's verdict, before the cap: every member flagged now (plus what a wrapped
        # detector suspects), so detection is not scored on the capped exclusion
        inner = set(res.suspected)
        suspected = tuple(c for c in ids if self.is_flagged(c) or c in inner)
        return AggregationResult(res.aggregate, ids, weights=res.weights, scores=None, flagged=flagged, info=info,
                                 suspected=suspected)

    def _soft_weights(
        self, ids: tuple[int, ...], z: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """``soft``: scale the weights of members not yet flaggable by ``clip(1 + z / sigma, 0, 1)``.

        Unchanged when that would leave the kept members no weight at all (the rule needs some).
        """
        if not self.soft:
            return weights
        young = torch.tensor([self._count.get(int(c), 0) < self.min_rounds for c in ids])
        factor = (1.0 + z.to(torch.float64).cpu() / self.scale()).clamp(0.0, 1.0)
        factor = torch.where(young, factor, torch.ones_like(factor))
        scaled = weights * factor.to(weights.device, weights.dtype)
        return scaled if float(scaled[keep.to(weights.device)].sum()) > 0 else weights

    # -- entry points ------------------------------------------------------------------------
    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        z, keep = self._observe(Gram.from_updates(updates, client_ids))
        weights = self._soft_weights(client_ids, z, weights, keep)
        idx = keep.nonzero().flatten()
        sub_ids = tuple(client_ids[i] for i in idx.tolist())
        res = self.rule.aggregate(updates[idx.to(updates.device)], weights[idx.to(weights.device)], sub_ids,
                                  context=context)
        return self._finish(res, client_ids, keep, z)

    def decide_gram(self, gram: Gram, weights: torch.Tensor, *, context: Mapping[str, Any]) -> AggregationResult:
        if Reveals.GRAM not in self.rule.runs_on:
            raise ConfigError(f"{self.rule!r} cannot run on a Gram matrix")
        z, keep = self._observe(gram)
        weights = self._soft_weights(gram.client_ids, z, weights, keep)
        idx = keep.nonzero().flatten()
        res = self.rule.decide_gram(gram.subset(idx.tolist()), weights[idx], context=context)
        return self._finish(res, gram.client_ids, keep, z)

    def reduces_to_mean(self, n: int, context: Mapping[str, Any]) -> str | None:
        return None  # excluding flagged clients is not the mean, even around the mean

    def state_dict(self) -> dict[str, Any]:
        return {"count": dict(self._count), "sum": dict(self._sum), "recent": list(self._recent),
                "rounds": [{"ids": list(ids), "cos": c.tolist(), "dup": d.tolist()} for ids, c, d in self._rounds],
                "rule": self.rule.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        count, total = state.get("count", {}), state.get("sum", {})
        if not isinstance(count, Mapping) or not isinstance(total, Mapping) or set(count) != set(total):
            raise ConfigError("Reputation state needs 'count' and 'sum' mappings over the same client ids")
        self._count = {int(c): int(k) for c, k in count.items()}
        self._sum = {int(c): float(v) for c, v in total.items()}
        self._recent = deque((float(v) for v in state.get("recent", [])), maxlen=self.window)
        rounds = state.get("rounds", [])
        if not isinstance(rounds, list):
            raise ConfigError("Reputation state 'rounds' must be a list of {ids, cos, dup} records")
        self._rounds = deque(maxlen=self.history)
        for rec in rounds:
            ids = tuple(int(c) for c in rec["ids"])
            cos = torch.tensor(rec["cos"], dtype=torch.float64)
            dup = torch.tensor(rec["dup"], dtype=torch.bool)
            if cos.shape != (len(ids), len(ids)) or dup.shape != (len(ids),):
                raise ConfigError(f"Reputation state round over {len(ids)} clients has a {tuple(cos.shape)} matrix")
            self._rounds.append((ids, cos, dup))
        self.rule.load_state_dict(state.get("rule", {}))

    def __repr__(self) -> str:
        return (f"Reputation({self.rule!r}, threshold={self.threshold}, min_rounds={self.min_rounds}, "
                f"window={self.window}, consensus={self.consensus!r}, duplicate={self.duplicate}, "
                f"rescore={self.rescore}, history={self.history}" + (", soft=True" if self.soft else "")
                + (f", copies={self.copies!r})" if self.copies != "exclude" else ")"))
