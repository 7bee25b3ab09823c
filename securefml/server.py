"""The round loop: cohort, broadcast, local updates, attack, selection, protocol, defense, step."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from securefml.attacks.base import AttackContext
from securefml.client import Client, LocalResult
from securefml.defenses.base import Defense
from securefml.errors import ConfigError, ProtocolAbort, SecureFMLError
from securefml.meta.base import MetaLearner, Params
from securefml.protocols.base import AggregationProtocol, ClientUpdate, RoundOutput, Transport, check_finite
from securefml.selection import AllLayers, LayerSelector, NamedLayers, shadowed_layer
from securefml.updates import LayerLayout

__all__ = ["Server", "RoundRecord"]

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """One round's history entry (JSON-ready)."""

    round: int
    cohort: list[int]
    malicious: list[int]
    accepted: list[int]
    rejected: dict[int, str]
    flagged: list[int]
    bytes_uploaded: int
    train_loss: float
    update_norm: float
    seconds: float
    uploaded_layers: dict[str, int] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


class Server:
    """Holds the meta-parameters and runs rounds.

    Parameters
    ----------
    learner:
        The meta-learner every honest client runs.
    protocol:
        How updates travel and are aggregated (plaintext, CKKS, SecAgg...).
    defense:
        The aggregation rule, checked against what the protocol reveals.
    server_optimizer:
        ``"sgd"`` or ``"adam"`` on the meta-parameters, fed the pseudo-gradient -aggregate.
    equal_weights:
        Give every client weight 1 instead of its sample count (user-level DP sizes its noise
        for one client's equal share: ``PrivacySetup.equal_weights``).
    vectorize:
        Run the local updates of clients whose tasks have the same shapes as one
        ``torch.func.vmap`` (``MetaLearner.update_many``) instead of one client at a time,
        when the learner supports it; the results agree with the loop to float rounding.
    """

    def __init__(
        self,
        learner: MetaLearner,
        protocol: AggregationProtocol,
        defense: Defense,
        *,
        selector: LayerSelector | None = None,
        server_optimizer: str = "sgd",
        server_lr: float = 1.0,
        device: torch.device | str = "cpu",
        update_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        aggregate_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        equal_weights: bool = False,
        vectorize: bool = True,
    ) -> None:
        protocol.check_defense(defense)
        self.equal_weights = equal_weights
        self.vectorize = bool(vectorize)
        self.learner = learner
        self.protocol = protocol
        self.defense = defense
        self.selector = selector or AllLayers()
        self.device = torch.device(device)
        self.params: Params = learner.init_params(self.device)
        self.layout = LayerLayout.from_params(self.params)
        self.update_hook = update_hook
        self.aggregate_hook = aggregate_hook
        self._vector = torch.nn.Parameter(self.layout.flatten(self.params).detach().clone())
        if server_lr <= 0:
            raise ConfigError(f"server_lr must be positive, got {server_lr}")
        if server_optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD([self._vector], lr=server_lr)
        elif server_optimizer == "adam":
            self.optimizer = torch.optim.Adam([self._vector], lr=server_lr)
        else:
            raise ConfigError(f"unknown server optimizer {server_optimizer!r}; choose sgd or adam")
        self._last_aggregate: torch.Tensor | None = None

    # -- state -------------------------------------------------------------------------------
    @property
    def global_vector(self) -> torch.Tensor:
        return self._vector.detach()

    def _sync_params(self) -> None:
        self.params = {n: t.clone() for n, t in self.layout.unflatten(self._vector.detach()).items()}

    # -- one round ---------------------------------------------------------------------------
    def _probe(self, client: Client) -> Callable[[torch.Tensor], Mapping[str, torch.Tensor]]:
        """Per-layer features on the client's own support inputs (Cedar's stimulus batch)."""
        stimulus = client.task.support_x[:32].to(self.device)
        model = self.learner.model
        names = [n for n in self.layout.layer_names if shadowed_layer(n) == n]

        def probe(vector: torch.Tensor) -> Mapping[str, torch.Tensor]:
            feats: dict[str, torch.Tensor] = {}
            hooks = [
                model.get_submodule(n).register_forward_hook(lambda _m, _i, out, n=n: feats.__setitem__(n, out))
                for n in names
            ]
            try:
                with torch.no_grad():
                    self.learner.forward(self.layout.unflatten(vector), stimulus)
            finally:
                for h in hooks:
                    h.remove()
            return feats

        return probe

    def _plan(self) -> tuple[str, ...] | None:
        """One layer set for the whole cohort when the selector is server-dictated.

        Update-driven dictated selectors rank layers by the server's previous aggregate,
        which every client also received; before the first aggregate, every layer is sent.
        """
        if not self.selector.server_dictated:
            return None
        needs_update = not isinstance(self.selector, (AllLayers, NamedLayers))
        if needs_update and self._last_aggregate is None:
            return self.layout.layer_names
        last = self._last_aggregate if self._last_aggregate is not None else torch.zeros_like(self.global_vector)
        return self.selector.select(self.layout, last, self.global_vector)

    def _poison(
        self,
        round_idx: int,
        results: list[LocalResult],
        by_id: Mapping[int, Client],
        cohort_size: int,
        generator: torch.Generator | None,
        defense_context: Mapping[str, Any] | None = None,
    ) -> None:
        """Let the colluding malicious clients rewrite their updates together (before encoding)."""
        malicious = [r for r in results if by_id[r.client_id].malicious]
        if not malicious:
            return
        honest = [r for r in results if not by_id[r.client_id].malicious]
        attack = by_id[malicious[0].client_id].attack
        assert attack is not None
        ctx = AttackContext(
            round=round_idx,
            n_clients=cohort_size,
            n_malicious=len(malicious),
            honest_updates=torch.stack([r.update for r in honest]) if attack.omniscient and honest else None,
            defense=self.defense,
            generator=generator,
            extras={"layout": self.layout, "global_vector": self.global_vector,
                    "lr_mask": self.layout.mask([n for n in self.layout.layer_names if n.startswith("alpha.")]),
                    # what the server passes its rule (a white-box attacker knows it, e.g. the derived f)
                    "defense_context": {k: v for k, v in (defense_context or {}).items() if k != "forward"}},
        )
        poisoned = attack.poison_updates(torch.stack([r.update for r in malicious]), ctx)
        for r, vec in zip(malicious, poisoned):
            r.update = vec.to(r.update.dtype)

    def _prepare_uploads(self, results: list[LocalResult], by_id: Mapping[int, Client]) -> list[ClientUpdate]:
        """Client side, after training: error feedback, layer selection, then the update hook.

        The hook (user-level DP clipping and noise) runs last, on exactly what is sent, so its
        bound holds for the uploaded vector whatever selection and error feedback did.
        """
        plan = self._plan()
        feedback = bool(getattr(self.selector, "error_feedback", False))
        updates = []
        for r in results:
            client = by_id[r.client_id]
            if feedback and client.residual is not None and not client.malicious:
                r.update = r.update + client.residual
            layers = plan if plan is not None else self.selector.select(
                self.layout, r.update, self.global_vector, probe=self._probe(client)
            )
            sent = self.layout.gather(r.update, layers)
            if feedback and not client.malicious:
                # error feedback: what was withheld now is added to this client's next upload
                client.residual = r.update - self.layout.scatter(sent, layers)
            if self.update_hook is not None:
                sent = self.layout.gather(self.update_hook(r.client_id, self.layout.scatter(sent, layers)), layers)
            updates.append(ClientUpdate(r.client_id, sent, layers, 1.0 if self.equal_weights else r.weight))
        return updates

    def _local_updates(self, round_idx: int, cohort: Sequence[Client]) -> tuple[list[LocalResult], dict[int, str]]:
        """Every client's local update, in cohort order; failures recorded per client.

        With ``vectorize``, clients whose tasks stack (same shapes) run as one vmap per group;
        the rest, and every client of a group whose vmap raised, run one at a time.
        """
        done: dict[int, LocalResult] = {}
        rejected: dict[int, str] = {}
        if self.vectorize:
            groups: dict[tuple[object, ...], list[Client]] = {}
            for c in cohort:
                t = c.task
                key = (t.kind, *(x.shape for x in (t.support_x, t.support_y, t.query_x, t.query_y)),
                       *(x.dtype for x in (t.support_x, t.support_y, t.query_x, t.query_y)))
                groups.setdefault(key, []).append(c)
            for members in groups.values():
                tasks = [c.task.to(self.device) for c in members]
                if not self.learner.vectorizes(tasks):
                    continue
                try:
                    outs = self.learner.update_many(self.params, tasks)
                except SecureFMLError as exc:  # attribute it by running the group one at a time
                    log.info("round %d: vectorized group failed (%s); running it client by client", round_idx, exc)
                    continue
                for c, task, (upd, metrics) in zip(members, tasks, outs):
                    flat = self.layout.flatten(upd).detach()
                    try:
                        check_finite(flat, c.client_id)
                    except SecureFMLError as exc:
                        log.warning("round %d: client %d failed locally: %s", round_idx, c.client_id, exc)
                        rejected[c.client_id] = f"{type(exc).__name__}: {exc}"
                        continue
                    done[c.client_id] = LocalResult(c.client_id, flat, float(task.support_x.shape[0]), metrics)
        results: list[LocalResult] = []
        for client in cohort:
            if client.client_id in done:
                results.append(done[client.client_id])
                continue
            if client.client_id in rejected:
                continue
            try:
                results.append(client.local_update(self.learner, self.params, self.layout, device=self.device))
            except SecureFMLError as exc:
                log.warning("round %d: client %d failed locally: %s", round_idx, client.client_id, exc)
                rejected[client.client_id] = f"{type(exc).__name__}: {exc}"
        return results, rejected

    def run_round(
        self,
        round_idx: int,
        cohort: Sequence[Client],
        *,
        transport: Transport | None = None,
        generator: torch.Generator | None = None,
        reference: torch.Tensor | None = None,
        defense_context: Mapping[str, Any] | None = None,
    ) -> RoundRecord:
        start = time.perf_counter()
        results, rejected = self._local_updates(round_idx, cohort)
        by_id = {c.client_id: c for c in cohort}
        self._poison(round_idx, results, by_id, len(cohort), generator, defense_context)
        updates = self._prepare_uploads(results, by_id)
        layer_sets = {u.layers for u in updates}
        context = {
            # one layer set for the whole cohort: rules that keep per-layer state need its names
            **({"layers": next(iter(layer_sets))} if len(layer_sets) == 1 else {}),
            "layout": self.layout,
            "global_vector": self.global_vector,
            "generator": generator,
            "round": round_idx,
            **({"reference": reference} if reference is not None else {}),
            **dict(defense_context or {}),
        }
        try:
            out = self.protocol.run_round(
                round_idx, updates, self.layout, defense=self.defense, transport=transport,
                reference=reference, context=context,
            )
        except ProtocolAbort as exc:  # too few survivors: nothing revealed, the model stays as it is
            log.warning("round %d aborted: %s", round_idx, exc)
            out = RoundOutput(torch.zeros(self.layout.numel), dict.fromkeys(self.layout.layer_names, 0.0), (),
                              rejected, extras={"aborted": str(exc)})
        if self.aggregate_hook is not None and out.accepted:
            out.aggregate = self.aggregate_hook(len(out.accepted), out.aggregate)
        self._step(out)
        uploaded: dict[str, int] = {}
        for u in updates:
            for n in u.layers:
                uploaded[n] = uploaded.get(n, 0) + 1
        losses = [v for r in results for k, v in r.metrics.items() if k.endswith("loss")]
        return RoundRecord(
            round=round_idx,
            cohort=[c.client_id for c in cohort],
            malicious=[c.client_id for c in cohort if c.malicious],
            accepted=list(out.accepted),
            rejected={**rejected, **out.rejected},
            flagged=list(out.flagged),
            bytes_uploaded=out.bytes_uploaded,
            train_loss=float(sum(losses) / len(losses)) if losses else float("nan"),
            update_norm=float(out.aggregate.norm()),
            seconds=time.perf_counter() - start,
            uploaded_layers=uploaded,
            extras={k: v for k, v in out.extras.items() if isinstance(v, (int, float, str, list, dict))},
        )

    def _step(self, out: RoundOutput) -> None:
        """Server optimizer step on the layers someone uploaded; the others keep their value."""
        if not out.accepted:
            return
        agg = out.aggregate.to(self.device, self._vector.dtype)
        untouched = self.layout.mask([n for n, w in out.layer_weight.items() if w == 0], device=self.device)
        before = self._vector.detach().clone()
        self.optimizer.zero_grad(set_to_none=False)
        self._vector.grad = -agg
        self.optimizer.step()
        with torch.no_grad():
            self._vector[untouched] = before[untouched]
        self._last_aggregate = agg
        self._sync_params()
