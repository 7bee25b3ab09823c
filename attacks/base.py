"""The attack interface: what a malicious client may do before its update is encoded.

An attack controls its own data (``poison_task``) and/or its own update
(``poison_updates``).  An omniscient attack also sees the round's honest updates, which the
federation loop passes in ``AttackContext.honest_updates`` only when ``omniscient`` is True.
Subclass ``Attack`` and override one or both hooks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from securefml.attacks.registry import ATTACKS

__all__ = ["Attack", "AttackContext"]


@dataclass
class AttackContext:
    """What a malicious client knows in a round.

    Attributes
    ----------
    round:
        The round index.
    n_clients:
        Size of the round's cohort (honest + malicious).
    n_malicious:
        How many of the cohort are malicious (the colluding group).
    honest_updates:
        ``[h, d]`` honest updates of the round (omniscient attacks only; else None).
    defense:
        The server's defense, for adaptive attacks that know the rule (else None).
    generator:
        Randomness the attack must use (injected, never global).
    layout:
        The model's flat layout (``LayerLayout``), for attacks that act per layer.
    global_vector:
        The flat global model of the round.
    lr_mask:
        Boolean mask of the learned-rate coordinates (Meta-SGD), for attacks on them.
    defense_context:
        What the server passes its rule (a ``RoundContext``, without the server's stimuli): a
        white-box attacker knows it (e.g. the derived ``f``).
    attack_info:
        Filled by the attack: what it chose (a strength, a target), under its name; it reaches
        the round record.
    """

    round: int
    n_clients: int
    n_malicious: int
    honest_updates: torch.Tensor | None = None
    defense: Any = None
    generator: torch.Generator | None = None
    layout: Any = None
    global_vector: torch.Tensor | None = None
    lr_mask: torch.Tensor | None = None
    defense_context: Mapping[str, Any] | None = None
    attack_info: dict[str, dict[str, Any]] = field(default_factory=dict)


@ATTACKS.register("none")
class Attack:
    """Base class of every attack; by default it changes nothing (an honest client).

    Subclass it and override ``poison_task`` (data poisoning: return a modified ``Task``),
    ``poison_updates`` (model poisoning: return the ``[m, d]`` rows the malicious clients send
    instead of their own), or both.  Set ``omniscient = True`` (class or instance attribute)
    when the attack needs the round's honest updates: the federation loop passes them in
    ``AttackContext.honest_updates`` only then.  Draw randomness from ``context.generator``
    (or the ``generator`` argument), never from global state, so runs are reproducible.  An
    attack may report what it chose (a strength, a target) under ``context.attack_info[name]``.

    Threat model: the malicious clients are the colluding group of ``context.n_malicious``
    clients; they act before their update is encoded, so any protocol carries their rows.

    Examples
    --------
    An attack that sends the negated honest mean, scaled (a simple omniscient attack):

    >>> import torch
    >>> class NegMean(Attack):
    ...     name = "negmean"
    ...     omniscient = True
    ...     def __init__(self, scale: float = 1.0) -> None:
    ...         self.scale = scale
    ...     def poison_updates(self, own, context):
    ...         mean = context.honest_updates.mean(0)
    ...         return (-self.scale * mean).expand_as(own).clone()
    >>> ctx = AttackContext(round=0, n_clients=4, n_malicious=1, honest_updates=torch.ones(3, 2))
    >>> NegMean(2.0).poison_updates(torch.zeros(1, 2), ctx)
    tensor([[-2., -2.]])
    >>> NegMean(2.0)
    NegMean(scale=2.0)
    """

    name: str = "none"
    omniscient: bool = False

    def poison_task(self, task: Any, *, generator: torch.Generator | None = None) -> Any:
        """Return the (possibly poisoned) local task a malicious client trains on."""
        return task

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        """Return the ``[m, d]`` updates the malicious clients send, given their own ``[m, d]``."""
        return own

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"
