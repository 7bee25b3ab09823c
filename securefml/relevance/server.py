"""``RelevanceServer``: the round loop with one model per client, aggregated by task relevance.

A subclass of ``securefml.server.Server`` (nothing in ``server.py`` changes): it reuses the
local update, the colluding attack and the server's global vector, and replaces the single
aggregate by ``RelevanceAggregation``.

One round
---------
1. Each cohort client i starts from its personalized model ``theta_i`` (the global model
   until it first took part), runs the learner's client step and obtains ``x_i = theta_i +
   u_i``; malicious clients rewrite ``u_i`` together (the attack), as in ``Server``.
2. It computes its task vector (``TaskVectorizer``) and smooths it (``TaskVectorSmoother``).
3. Optional robust rule: when the defense is not the plain mean, it runs on the cohort's
   updates ``u`` (plaintext only) and the clients it gives zero weight (or flags) are
   excluded from every aggregate this round.
4. ``RelevanceAggregation`` returns ``a_i`` for every cohort client and the global aggregate;
   ``theta_i <- a_i`` and the global model becomes the global aggregate.

In plaintext the server holds every ``theta_i``; under CKKS and SecAgg+ they stand for what
each client holds after decrypting its own aggregate (the simulation keeps all parties in one
process).  Held-out clients personalize from their relevance to the training clients: their
task vector on their support set weighs the training clients' models (``personalize_new``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import torch

from securefml.client import Client, LocalResult
from securefml.data.base import Task
from securefml.defenses.base import Defense
from securefml.errors import ConfigError, ProtocolError, SecureFMLError
from securefml.meta.base import MetaLearner
from securefml.personalize import evaluate_task
from securefml.protocols.base import AggregationProtocol, Transport
from securefml.protocols.plaintext import Plaintext
from securefml.protocols.secagg import SecAggPlus
from securefml.relevance.aggregation import PersonalizedAggregate, RelevanceAggregation
from securefml.relevance.grouping import relevance_groups
from securefml.relevance.task_vectors import TaskVectorizer, TaskVectorSmoother
from securefml.server import RoundRecord, Server

__all__ = ["RelevanceServer", "ClientScores", "RoundOptions", "ENROL_ROUND"]

log = logging.getLogger(__name__)

#: the federation round index of the CKKS enrolment Gram (outside the training rounds)
ENROL_ROUND = 1 << 21


class RoundOptions(TypedDict, total=False):
    """The keyword options of ``Server.run_round``, forwarded unchanged (same names and types)."""

    transport: Transport | None
    generator: torch.Generator | None
    reference: torch.Tensor | None
    defense_context: Mapping[str, Any] | None


@dataclass(frozen=True)
class ClientScores:
    """Per-client personalized scores (query accuracy or MSE after fine-tuning) and weights used."""

    client_ids: tuple[int, ...]
    scores: tuple[float, ...]
    weights: torch.Tensor | None = None

    @property
    def mean(self) -> float:
        return float(torch.tensor(self.scores, dtype=torch.float64).mean()) if self.scores else float("nan")

    def by_group(self, groups: Mapping[int, int]) -> dict[int, float]:
        out: dict[int, list[float]] = {}
        for cid, s in zip(self.client_ids, self.scores):
            out.setdefault(groups[cid], []).append(s)
        return {g: sum(v) / len(v) for g, v in sorted(out.items())}


class RelevanceServer(Server):
    """Personalized federation: one model per client, aggregated by task relevance.

    Parameters
    ----------
    learner, protocol, defense:
        As for ``Server``; ``protocol`` must be the one ``relevance`` runs under.  A defense
        other than the plain mean is used as a filter before relevance weighting (plaintext).
    relevance:
        The aggregation step.
    vectorizer:
        Computes task vectors (its reference network is frozen).
    smoothing:
        Round-to-round EMA factor of task vectors (default: the vectorizer config's).
    """

    def __init__(
        self,
        learner: MetaLearner,
        protocol: AggregationProtocol,
        defense: Defense,
        *,
        relevance: RelevanceAggregation,
        vectorizer: TaskVectorizer,
        smoothing: float | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(learner, protocol, defense, device=device)
        if relevance.protocol is not protocol:
            raise ConfigError("the relevance step must run under the server's protocol")
        if not defense.is_weighted_mean and not isinstance(protocol, Plaintext):
            raise ConfigError(f"a robust filter ({defense!r}) before relevance weighting needs the plaintext protocol")
        self.relevance = relevance
        self.vectorizer = vectorizer
        self.smoother = TaskVectorSmoother(vectorizer.config.smoothing if smoothing is None else smoothing)
        self.models: dict[int, torch.Tensor] = {}
        self.last: PersonalizedAggregate | None = None

    def enroll(self, tasks: Sequence[Task], *, round_idx: int = ENROL_ROUND,
               generator: torch.Generator | None = None) -> None:
        """CKKS: learn the inner products of these clients' task vectors once (one key-holder Gram).

        An enrolment phase before training (training and, when known, held-out clients): their
        gradient task vectors do not change while their data does not, so rounds reuse the
        decrypted inner products (``RelevanceAggregation.register``) instead of asking the key
        holder for a Gram every round.  A no-op for the other protocols.
        """
        if self.relevance.encrypted is None or not tasks:
            return
        vectors = torch.stack([self._new_vector(t, generator) for t in tasks])
        self.relevance.register(round_idx, tuple(t.client_id for t in tasks), vectors)

    def model_of(self, client_id: int) -> torch.Tensor:
        """Client ``client_id``'s personalized flat model (the global one before it took part)."""
        return self.models.get(client_id, self.global_vector)

    def run_round(self, round_idx: int, cohort: Sequence[Client], **options: Unpack[RoundOptions]) -> RoundRecord:
        """One personalized round (the module docstring's steps); ``options`` as for ``Server.run_round``."""
        start = time.perf_counter()
        transport = options.get("transport")
        generator = options.get("generator")
        defense_context = options.get("defense_context")
        results: list[LocalResult] = []
        starts: dict[int, torch.Tensor] = {}
        rejected: dict[int, str] = {}
        for client in cohort:
            base = self.model_of(client.client_id)
            try:
                r = client.local_update(self.learner, self.layout.unflatten(base), self.layout, device=self.device)
            except SecureFMLError as exc:
                log.warning("round %d: client %d failed locally: %s", round_idx, client.client_id, exc)
                rejected[client.client_id] = f"{type(exc).__name__}: {exc}"
                continue
            results.append(r)
            starts[r.client_id] = base
        by_id = {c.client_id: c for c in cohort}
        context = self.context(round_idx, generator=generator, reference=options.get("reference"),
                               defense_context=defense_context)
        self.adversary_step(cohort, results, context)
        if not results:
            return self._record(round_idx, cohort, rejected, None, [], start)
        ids = tuple(r.client_id for r in results)
        updates = torch.stack([r.update for r in results])
        models = torch.stack([starts[r.client_id] + r.update for r in results])
        tvs = torch.stack([
            self.smoother(r.client_id, self.vectorizer(by_id[r.client_id].task, update=r.update, generator=generator))
            for r in results
        ])
        weights = [r.weight for r in results]
        allowed = None
        flagged: tuple[int, ...] = ()
        if not self.defense.is_weighted_mean:
            ctx = {"layout": self.layout, "global_vector": self.global_vector, "generator": generator,
                   "round": round_idx, **dict(defense_context or {})}
            res = self.defense(updates, weights, client_ids=ids, context=ctx)
            flagged = tuple(res.flagged)
            if res.weights is not None:
                allowed = (res.weights.reshape(-1) > 1e-12).cpu()
            else:
                allowed = torch.tensor([c not in set(flagged) for c in ids])
            if not bool(allowed.any()):
                allowed = None
        try:
            agg = self.relevance.aggregate(round_idx, ids, models, weights, tvs, allowed=allowed, transport=transport)
        except ProtocolError as exc:
            log.warning("round %d: relevance aggregation aborted: %s", round_idx, exc)
            rejected.update({c: f"{type(exc).__name__}: {exc}" for c in ids})
            return self._record(round_idx, cohort, rejected, None, results, start)
        for i, cid in enumerate(agg.client_ids):
            self.models[cid] = agg.per_client[i].to(self.device)
        self.model.assign(agg.global_aggregate)
        self._sync_params()
        self.last = agg
        return self._record(round_idx, cohort, {**rejected, **agg.rejected}, agg, results, start, flagged)

    def _record(self, round_idx: int, cohort: Sequence[Client], rejected: dict[int, str],
                agg: PersonalizedAggregate | None, results: Sequence[LocalResult], start: float,
                flagged: tuple[int, ...] = ()) -> RoundRecord:
        malicious = [c.client_id for c in cohort if c.malicious]
        extras: dict[str, Any] = {"aggregation": "relevance"}
        if agg is not None:
            mal = torch.tensor([c in set(malicious) for c in agg.client_ids])
            honest_rows = ~mal
            if bool(mal.any()) and bool(honest_rows.any()):
                extras["malicious_weight"] = float(agg.weights[honest_rows][:, mal].sum(1).mean())
            if agg.effective:
                extras["min_effective"] = float(min(agg.effective))
            extras["self_weight"] = float(torch.diagonal(agg.weights).mean())
            if agg.groups is not None:
                extras["groups"] = [list(g) for g in agg.groups]
            extras["timing"] = dict(agg.timing)
        losses = [v for r in results for k, v in r.metrics.items() if k.endswith("loss")]
        accepted = list(agg.client_ids) if agg is not None else []
        return RoundRecord(
            round=round_idx, cohort=[c.client_id for c in cohort], malicious=malicious, accepted=accepted,
            rejected=rejected, flagged=list(flagged), bytes_uploaded=agg.bytes_uploaded if agg is not None else 0,
            train_loss=float(sum(losses) / len(losses)) if losses else float("nan"),
            update_norm=float(torch.stack([r.update for r in results]).norm()) if results else 0.0,
            seconds=time.perf_counter() - start, extras=extras,
        )

    # -- evaluation -----------------------------------------------------------------------------
    def _finetune_score(self, vector: torch.Tensor, task: Task, steps: int) -> float:
        params = self.layout.unflatten(vector.to(self.device))
        t = task.to(self.device)
        if steps > 0:
            adapted = self.learner.adapt(params, t.support_x, t.support_y, t.kind, steps=steps)
            params = {**params, **{n: p.detach() for n, p in adapted.items()}}
        return evaluate_task(self.learner, params, t)

    def evaluate_clients(self, tasks: Sequence[Task], *, steps: int) -> ClientScores:
        """Training clients: their own personalized model, fine-tuned on support, scored on query."""
        ids = tuple(t.client_id for t in tasks)
        return ClientScores(ids, tuple(self._finetune_score(self.model_of(t.client_id), t, steps) for t in tasks))

    def personalize_new(
        self, tasks: Sequence[Task], *, steps: int, generator: torch.Generator | None = None,
        round_idx: int = 1 << 20,
    ) -> ClientScores:
        """Held-out clients: relevance to the training clients -> initial model -> fine-tune -> score.

        Each new client's task vector comes from its support set (for the projection method:
        from an update on its support set starting at the global model).  Under CKKS the cross
        Gram and the mixtures are computed encrypted; under SecAgg+ the training clients are
        grouped by relevance, the new client joins its most similar group and receives that
        group's securely summed mean.
        """
        train_ids = tuple(sorted(c for c in self.models if self.smoother.get(c) is not None))
        if not train_ids:
            return ClientScores(tuple(t.client_id for t in tasks),
                                tuple(self._finetune_score(self.global_vector, t, steps) for t in tasks))
        train_tv = torch.stack([self.smoother.get(c) for c in train_ids])  # type: ignore[misc]
        train_models = torch.stack([self.models[c].cpu() for c in train_ids])
        new_tv = torch.stack([self._new_vector(t, generator) for t in tasks])
        proto = self.relevance.protocol
        new_ids = tuple(t.client_id for t in tasks)
        if isinstance(proto, SecAggPlus):
            w, mixed = self._secagg_mix(round_idx, new_tv, train_ids, train_tv, train_models)
        elif self.relevance.encrypted is not None:
            w, mixed, refused = self.relevance.heldout_encrypted(round_idx, new_ids, new_tv, train_ids, train_tv,
                                                                 train_models)
            for cid in refused:
                log.warning("held-out client %d: relevance mixture refused (%s); it starts from the global model",
                            cid, refused[cid])
                mixed[new_ids.index(cid)] = self.global_vector.detach().cpu()
        else:
            w = self.relevance.heldout_weights(new_tv, train_tv)
            mixed = (w @ train_models.to(torch.float64)).to(torch.float32)
        scores = tuple(self._finetune_score(mixed[i], t, steps) for i, t in enumerate(tasks))
        return ClientScores(new_ids, scores, w)

    def _new_vector(self, task: Task, generator: torch.Generator | None) -> torch.Tensor:
        if self.vectorizer.config.method == "gradient":
            return self.vectorizer(task, generator=generator)
        upd, _ = self.learner.update(self.params, task.to(self.device))
        return self.vectorizer(task, update=self.layout.flatten(upd), generator=generator)

    def _secagg_mix(self, round_idx: int, new_tv: torch.Tensor, train_ids: tuple[int, ...], train_tv: torch.Tensor,
                    train_models: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        proto = self.relevance.protocol
        assert isinstance(proto, SecAggPlus)
        size = self.relevance.config.group_size
        found = relevance_groups(self._cos(train_tv, train_tv), size, min_link=self.relevance.config.group_min_link)
        groups = [g for g in found if len(g) >= size]  # a fragment's sum is never computed
        if not groups:
            raise ProtocolError(f"no relevance group of at least {size} training clients to join")
        cross = self._cos(new_tv, train_tv)
        means = []
        for g in groups:
            members = tuple(train_ids[i] for i in g)
            plan = proto.plan(round_idx, members, train_models.shape[1], max_weight=1.0)
            res = proto.secure_sum(plan, {train_ids[i]: (train_models[i], 1.0) for i in g})
            if res.aborted is not None or res.weighted_sum is None:
                raise ProtocolError(f"secure sum of relevance group {members} aborted: {res.aborted}")
            means.append(torch.from_numpy(res.weighted_sum / res.total_weight).to(torch.float32))
        w = torch.zeros((new_tv.shape[0], len(train_ids)), dtype=torch.float64)
        mixed = torch.zeros((new_tv.shape[0], train_models.shape[1]))
        for a in range(new_tv.shape[0]):
            best = max(range(len(groups)), key=lambda k: float(cross[a, list(groups[k])].mean()))
            w[a, list(groups[best])] = 1.0 / len(groups[best])
            mixed[a] = means[best]
        return w, mixed

    @staticmethod
    def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        den = a64.norm(dim=1, keepdim=True).clamp_min(1e-12) * b64.norm(dim=1)[None, :].clamp_min(1e-12)
        return (a64 @ b64.T) / den
