"""The colluding malicious clients of a round, as one explicit party.

Model poisoning by a colluding group used to be a side effect of the server loop, which applied
the first malicious client's attack to every malicious client.  ``Adversary`` makes the threat
model a value: each distinct attack controls its own group of clients, and a group sees exactly
what the threat model grants it:

- its members' own honest updates (it controls those clients, so it trains on their data);
- the honest clients' updates of the round only when its attack is ``omniscient`` (the strongest
  adversary of the robust-aggregation literature; a realistic one is not omniscient);
- the defense and the round's public context (a white-box adversary knows the rule and the
  federation's ``f``), never the server's behavioural stimuli (``RoundContext.public``).

Groups act one after another in a fixed order (by attack name, then the smallest member id), on
the honest updates only: one group never sees another group's poisoned rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from securefml.attacks.base import Attack, AttackContext
from securefml.client import LocalResult
from securefml.context import RoundContext

__all__ = ["Adversary", "AdversaryReport"]


@dataclass(frozen=True)
class AdversaryReport:
    """What the adversary did in one round: its groups and what each attack reported choosing."""

    groups: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    attack_info: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"groups": {k: list(v) for k, v in self.groups.items()},
                "attack_info": {k: dict(v) for k, v in self.attack_info.items()}}


def _name(attack: Attack) -> str:
    """An attack's registered name (a user's duck-typed attack may have none: its class name)."""
    return str(getattr(attack, "name", type(attack).__name__))


class Adversary:
    """The round's malicious clients, grouped by the attack that controls them.

    Parameters
    ----------
    attacks:
        Client id -> the attack controlling it (honest clients are absent).  Clients that share
        one attack object collude as one group.
    """

    def __init__(self, attacks: Mapping[int, Attack]) -> None:
        self.attacks = dict(attacks)

    @property
    def members(self) -> frozenset[int]:
        return frozenset(self.attacks)

    def groups(self, present: Sequence[int]) -> list[tuple[Attack, tuple[int, ...]]]:
        """The colluding groups among ``present`` clients: one per distinct attack object."""
        by_attack: dict[int, tuple[Attack, list[int]]] = {}
        for cid in sorted(present):
            attack = self.attacks.get(cid)
            if attack is not None:
                by_attack.setdefault(id(attack), (attack, []))[1].append(cid)
        groups = [(a, tuple(ids)) for a, ids in by_attack.values()]
        return sorted(groups, key=lambda g: (_name(g[0]), g[1][0]))

    def act(
        self,
        results: Sequence[LocalResult],
        context: RoundContext,
        *,
        cohort_size: int,
        defense: object = None,
        lr_mask: torch.Tensor | None = None,
    ) -> AdversaryReport:
        """Rewrite the malicious clients' updates in ``results`` in place, group by group.

        ``lr_mask`` marks the learned-rate coordinates (Meta-SGD) for attacks on them.
        """
        groups = self.groups([r.client_id for r in results])
        if not groups:
            return AdversaryReport()
        by_id = {r.client_id: r for r in results}
        honest = [r.update for r in results if r.client_id not in self.attacks]
        honest_matrix = torch.stack(honest) if honest else None
        info: dict[str, Mapping[str, Any]] = {}
        named: dict[str, tuple[int, ...]] = {}
        for attack, ids in groups:
            ctx = AttackContext(
                round=context.round,
                n_clients=cohort_size,
                n_malicious=len(ids),
                honest_updates=honest_matrix if getattr(attack, "omniscient", False) else None,
                defense=defense,
                generator=context.generator,
                layout=context.layout,
                global_vector=context.global_vector,
                lr_mask=lr_mask,
                defense_context=context.public(),
            )
            own = torch.stack([by_id[c].update for c in ids])
            poisoned = attack.poison_updates(own, ctx)
            for cid, vec in zip(ids, poisoned):
                by_id[cid].update = vec.to(by_id[cid].update.dtype)
            name = _name(attack)
            key = name if name not in named else f"{name}@{ids[0]}"
            named[key] = ids
            info.update(ctx.attack_info)
        return AdversaryReport(named, info)
