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
from typing import TYPE_CHECKING, Protocol, TypeAlias, runtime_checkable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from securefml.defenses.base import AggregationResult
    from securefml.gram import Gram

__all__ = [
    "Reveals",
    "Revealed",
    "RevealedUpdates",
    "RevealedSums",
    "RevealedLayerMeans",
    "RevealedGram",
    "RoundStats",
    "GramDecision",
    "GramCombiner",
]


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


@runtime_checkable
class RoundStats(Protocol):
    """What a protocol measured in one round (bytes, ciphertexts, timings), as a typed value.

    Each protocol defines its own frozen dataclass; ``to_dict`` gives the JSON-ready form the
    aggregation step places in ``RoundOutput.extras`` (and so in the round's history).
    """

    def to_dict(self) -> dict[str, object]:
        """The measured values by name (ints, floats, strings, tuples of them)."""
        ...


@dataclass(frozen=True)
class RevealedLayerMeans:
    """``Reveals.SUM`` per layer: each layer's weighted mean over the clients that sent it.

    What the CKKS key holder decrypts under the weighted mean: per frame chunk the sum of the
    signed uploads (each client encrypted ``weight / W * update``), which the server half
    rescales per layer by ``W / (total weight behind the layer)``.  No single client's
    coordinates are revealed, only per-layer sums and the declared leakage (participants,
    layer manifests, weights).

    Attributes
    ----------
    mean:
        Full-layout vector; zeros on layers that were withheld or that nobody sent.
    layer_weight:
        Total weight behind each layer (0 where withheld or not sent).
    client_ids:
        The clients whose uploads entered the sums.
    withheld_layers:
        Layers some clients sent but that were not decrypted (too few contributors, or a
        combination the key holder's policy refuses).
    layer_counts:
        How many accepted clients sent each layer (layout order).
    error_bound:
        Bound on each entry's encryption error.
    """

    mean: torch.Tensor
    layer_weight: Mapping[str, float]
    client_ids: tuple[int, ...]
    withheld_layers: tuple[str, ...]
    layer_counts: Mapping[str, int]
    error_bound: float
    rejected: Mapping[int, str] = field(default_factory=dict)
    stats: RoundStats | None = None
    kind: Reveals = Reveals.SUM


@dataclass(frozen=True)
class RevealedGram:
    """``Reveals.GRAM``: the Gram of the round's uploads, the rule's decision, its combination.

    A Gram-revealing protocol asks the aggregation step for its decision mid-round
    (``GramCombiner``) and then reveals the one combination that decision names; this value
    carries all three to the aggregation step, which applies the rule's post-processing
    (``AggregationResult.noise_std``) and places the combination in the full layout.

    Attributes
    ----------
    client_ids, sample_weights:
        The clients the Gram was built over, in its order, and their declared weights.
    layers:
        The (frame) layers the combination covers, layout order.
    gram:
        The decrypted Gram; ``None`` when none was computed (fewer clients than the key
        holder's minimum, or nothing to pack).
    decision:
        The aggregation step's decision on ``gram`` (``None`` with ``gram``).
    combination:
        ``sum_i c_i u_i`` over ``layers`` (float64); ``None`` when it was not decrypted.
    kept_weight:
        Total sample weight of the clients with a non-negligible coefficient.
    layer_counts:
        How many accepted clients sent each layer.
    policy_refused:
        Why the key holder's policy refuses the decided combination (it was then not asked).
    """

    client_ids: tuple[int, ...]
    sample_weights: tuple[float, ...]
    layers: tuple[str, ...]
    gram: Gram | None
    decision: GramDecision | None
    combination: torch.Tensor | None
    kept_weight: float
    layer_counts: Mapping[str, int]
    policy_refused: str | None = None
    rejected: Mapping[int, str] = field(default_factory=dict)
    stats: RoundStats | None = None
    kind: Reveals = Reveals.GRAM


#: What a server half can hand the aggregation step.
Revealed: TypeAlias = RevealedUpdates | RevealedSums | RevealedLayerMeans | RevealedGram


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
