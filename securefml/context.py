"""What the server knows about a round, as one frozen value for defenses and attacks.

``RoundContext`` replaces the context dictionaries that used to be assembled in three places
with ad-hoc keys.  Its fields are typed; it is also a read-only ``Mapping`` over the fields
that are set (plus ``extra``), so a rule written against the mapping (``context.get("reference")``)
and one written against attributes (``context.reference``) read the same value.  The mapping
keys are the field names, except ``byzantine_budget`` which is ``defenses.budget.BYZANTINE_KEY``
(the same string).

``extra`` is the one open door: keys a user's own rule needs that the federation does not know
(passed as ``defense_context`` to ``Server.run_round``).  Library rules read only typed fields.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from securefml.updates import LayerLayout

__all__ = ["RoundContext"]

_SKIP = ("extra",)


@dataclass(frozen=True)
class RoundContext(Mapping[str, Any]):
    """One round's public context, as the server passes it to the defense and the adversary.

    Attributes
    ----------
    round:
        The round index.
    layout:
        The model's flat layout (``LayerLayout``).
    global_vector:
        The flat global model the cohort received.
    generator:
        The round's randomness (rules and attacks draw from it, never from global state).
    reference:
        The server's own update on its root dataset (FLTrust), over the full layout.
    layers:
        The one layer set every client uploaded, when the selection plan is server-dictated.
    forward:
        ``forward(vector) -> outputs`` on fixed stimuli, for behavioural detectors (Cedar).
    byzantine_budget:
        The federation's derived ``f`` (``defenses.budget.byzantine_budget``), for rules built without one.
    extra:
        Keys of a user's own rule (read through the mapping view only).
    """

    round: int
    layout: LayerLayout | None = None
    global_vector: torch.Tensor | None = None
    generator: torch.Generator | None = None
    reference: torch.Tensor | None = None
    layers: tuple[str, ...] | None = None
    forward: Callable[[torch.Tensor], Any] | None = None
    byzantine_budget: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    # -- the mapping view ------------------------------------------------------------------------
    def _items(self) -> dict[str, Any]:
        items = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _SKIP}
        return {**dict(self.extra), **{k: v for k, v in items.items() if v is not None}}

    def __getitem__(self, key: str) -> Any:
        return self._items()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __hash__(self) -> int:  # identity: the fields hold tensors
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    def with_reference(self, reference: torch.Tensor | None) -> RoundContext:
        """The same context with another reference (e.g. restricted to the uploaded layers)."""
        return replace(self, reference=reference)

    def public(self) -> RoundContext:
        """What a white-box adversary may know of it: everything but the forward hook on the server's stimuli."""
        return replace(self, forward=None)

    @classmethod
    def from_mapping(cls, round_idx: int, values: Mapping[str, Any] | None) -> RoundContext:
        """A context from a user's mapping: known keys become fields, the rest ``extra``."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)} - {"round", *_SKIP}
        typed = {k: values.pop(k) for k in list(values) if k in known}
        return cls(round=int(values.pop("round", round_idx)), **typed, extra=values)
