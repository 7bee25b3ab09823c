"""What a protocol's server half can show a defense: the one vocabulary both sides import.

It lives in neither ``securefml.protocols`` nor ``securefml.defenses`` so that neither package
imports the other for it (DESIGN.md, "Robust aggregation under secrecy"): a protocol declares the
one value it reveals, a defense declares the set it can run on, and the aggregation step matches
them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, TypeAlias

import torch

if TYPE_CHECKING:  # pragma: no cover
    from securefml.defenses.base import AggregationResult
    from securefml.gram import Gram

__all__ = ["Reveals", "Revealed", "RevealedUpdates", "RevealedSums", "GramDecision", "GramCombiner"]


class Reveals(str, Enum):
    """What the server half can show a defense.

    A ``str`` enum, so a member compares equal to its value (``Reveals.SUM == "sum"``) and
    serializes as that string in ``result.json``.

    >>> Reveals.GRAM == "gram", str(Reveals.GRAM)
    (True, 'gram')
    """

    UPDATES = "updates"
    """Every client's coordinates (plaintext)."""
    GRAM = "gram"
    """Norms and pairwise inner products only (CKKS statistics)."""
    BUCKETS = "buckets"
    """Sums of random buckets of clients (SecAgg+ bucketed mode)."""
    SUM = "sum"
    """Only the total (SecAgg+)."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class RevealedUpdates:
    """``Reveals.UPDATES``: every accepted client's coordinates (the plaintext protocol).

    ``vectors[i]`` covers ``layer_sets[i]`` (layout order) of client ``client_ids[i]``.
    """

    client_ids: tuple[int, ...]
    vectors: tuple[torch.Tensor, ...]
    layer_sets: tuple[tuple[str, ...], ...]
    weights: tuple[float, ...]
    rejected: Mapping[int, str] = field(default_factory=dict)
    kind: Reveals = Reveals.UPDATES


@dataclass(frozen=True)
class RevealedSums:
    """``Reveals.SUM`` (one group) or ``Reveals.BUCKETS`` (several): weighted sums only.

    ``sums[g]`` is the weighted sum over ``layers`` of the clients in ``contributors[g]``, whose
    total weight is ``total_weights[g]``; the server never sees a single client's weight.
    ``error_bound`` bounds each entry's quantization error.
    """

    kind: Reveals
    layers: tuple[str, ...]
    sums: tuple[torch.Tensor, ...]
    total_weights: tuple[float, ...]
    contributors: tuple[tuple[int, ...], ...]
    error_bound: float
    rejected: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in (Reveals.SUM, Reveals.BUCKETS):
            raise ValueError(f"RevealedSums reveals a sum or bucket sums, not {self.kind}")
        if not (len(self.sums) == len(self.total_weights) == len(self.contributors)):
            raise ValueError("one total weight and one contributor set per sum")


#: What a server half can hand the aggregation step.
Revealed: TypeAlias = RevealedUpdates | RevealedSums


@dataclass(frozen=True)
class GramDecision:
    """What the aggregation step decided from a revealed Gram matrix (``Reveals.GRAM``).

    ``coefficients[i]`` is the weight of the i-th client (in the order the Gram was built) in
    the combination the protocol then reveals; ``result`` is the defense's full
    ``AggregationResult`` (flags, scores, post-processing such as noise), kept for the round's
    record.
    """

    coefficients: torch.Tensor
    result: AggregationResult


#: How a Gram-revealing protocol asks the aggregation step for its decision mid-round:
#: ``combine(gram, sample_weights) -> GramDecision`` (``gram`` a ``securefml.gram.Gram``).  The
#: protocol never calls a defense itself.
GramCombiner: TypeAlias = "Callable[[Gram, torch.Tensor], GramDecision]"
