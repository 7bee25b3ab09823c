"""Hypothesis strategies and property checkers for robust aggregation rules.

Use them in your own tests the way ``hypothesis.extra.numpy`` is used::

    from hypothesis import given
    from securefml.defenses import TrimmedMean
    from securefml.testing.defense_checks import client_updates, assert_within_honest_range

    @given(client_updates(9, 4, byzantine=4))
    def test_trimmed_mean_stays_inside(batch):
        res = TrimmedMean(f=4)(batch.updates)
        assert_within_honest_range(res.aggregate, batch.honest)

``client_updates`` draws honest rows from a seeded Gaussian (so the geometry is generic: no
accidental ties between distinct vectors) around a hypothesis-chosen offset, and Byzantine
rows that hypothesis chooses freely among kinds ("huge", "nan", "inf", "adversarial",
"far", "mimic"), placed at hypothesis-chosen positions.  It shrinks towards fewer, simpler
Byzantine rows and small offsets.  Hypothesis is imported only here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

from securefml.defenses.base import AggregationResult, Defense
from securefml.errors import ConfigError
from securefml.gram import Gram
from securefml.reveals import Reveals

__all__ = [
    "BYZANTINE_KINDS",
    "UpdateBatch",
    "client_updates",
    "assert_within_honest_range",
    "assert_permutation_invariant",
    "assert_translation_equivariant",
    "assert_selects_honest",
    "assert_weighted_mean",
    "assert_gram_matches_plaintext",
    "GramWeightedMean",
]

#: What a Byzantine row may be.  "far": a point at distance >= ``far_factor`` x sqrt(n) x the
#: honest diameter from the honest centre (the regime of Krum's guarantee); "mimic": a copy
#: of an honest row; "adversarial": arbitrary finite values up to 1e6.
BYZANTINE_KINDS = ("huge", "nan", "inf", "adversarial", "far", "mimic")


@dataclass(frozen=True)
class UpdateBatch:
    """A drawn round: the ``[n, d]`` updates and which rows are Byzantine.

    Attributes
    ----------
    updates:
        All rows, honest and Byzantine, in drawn order.
    byzantine:
        Positions (row indices) of the Byzantine rows.
    kinds:
        The kind of each Byzantine row, aligned with ``byzantine``.
    """

    updates: torch.Tensor
    byzantine: tuple[int, ...]
    kinds: tuple[str, ...]

    @property
    def honest_positions(self) -> tuple[int, ...]:
        bad = set(self.byzantine)
        return tuple(i for i in range(self.updates.shape[0]) if i not in bad)

    @property
    def honest(self) -> torch.Tensor:
        return self.updates[list(self.honest_positions)]


def _as_strategy(value: int | st.SearchStrategy[int], name: str, minimum: int) -> st.SearchStrategy[int]:
    if isinstance(value, st.SearchStrategy):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum} or a strategy, got {value!r}")
    return st.just(value)


def client_updates(
    n: int | st.SearchStrategy[int],
    d: int | st.SearchStrategy[int],
    *,
    byzantine: int | st.SearchStrategy[int] = 0,
    kinds: Sequence[str] = BYZANTINE_KINDS,
    scale: float = 1.0,
    max_offset: float = 100.0,
    far_factor: float = 4.0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> st.SearchStrategy[UpdateBatch]:
    """Strategy for an ``UpdateBatch`` of ``n`` rows of dimension ``d``, ``byzantine`` of them bad.

    Parameters
    ----------
    n, d, byzantine:
        A fixed value or a strategy; ``byzantine`` must stay below ``n``.
    kinds:
        The Byzantine kinds hypothesis may choose from (a subset of ``BYZANTINE_KINDS``).
    scale:
        Standard deviation of the honest rows around their common offset.
    max_offset:
        The honest offset (one value per coordinate) lies in ``[-max_offset, max_offset]``.
    far_factor:
        How far the "far" kind is placed, in units of sqrt(n) x the honest diameter.
    """
    unknown = set(kinds) - set(BYZANTINE_KINDS)
    if unknown or not kinds:
        raise ConfigError(f"kinds must be a non-empty subset of {BYZANTINE_KINDS}, got {tuple(kinds)}")
    if not scale > 0 or not max_offset >= 0:
        raise ConfigError(f"scale must be > 0 and max_offset >= 0, got {scale}, {max_offset}")
    n_s = _as_strategy(n, "n", 1)
    d_s = _as_strategy(d, "d", 1)
    b_s = _as_strategy(byzantine, "byzantine", 0)
    kinds = tuple(kinds)

    @st.composite
    def build(draw: Callable[[st.SearchStrategy[Any]], Any]) -> UpdateBatch:
        nn, dd, bb = draw(n_s), draw(d_s), draw(b_s)
        if bb >= nn:
            raise ConfigError(f"byzantine={bb} must be below n={nn}")
        seed = draw(st.integers(0, 2**31 - 1))
        gen = torch.Generator().manual_seed(seed)
        offset = torch.tensor(
            draw(st.lists(st.floats(-max_offset, max_offset, allow_nan=False), min_size=dd, max_size=dd)),
            dtype=torch.float64,
        )
        honest = offset + scale * torch.randn(nn - bb, dd, generator=gen, dtype=torch.float64)
        centre = honest.mean(dim=0)
        diam = float(torch.cdist(honest, honest).max()) if nn - bb > 1 else scale
        rows, row_kinds = [], []
        for _ in range(bb):
            kind = draw(st.sampled_from(kinds))
            row_kinds.append(kind)
            if kind == "huge":
                sign = draw(st.sampled_from([-1.0, 1.0]))
                rows.append(torch.full((dd,), sign * draw(st.sampled_from([1e15, 1e30])), dtype=torch.float64))
            elif kind == "nan":
                row = centre.clone()
                row[draw(st.integers(0, dd - 1))] = float("nan")
                rows.append(row)
            elif kind == "inf":
                row = centre.clone()
                row[draw(st.integers(0, dd - 1))] = draw(st.sampled_from([float("inf"), float("-inf")]))
                rows.append(row)
            elif kind == "adversarial":
                vals = draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=dd, max_size=dd))
                rows.append(torch.tensor(vals, dtype=torch.float64))
            elif kind == "far":
                direction = torch.randn(dd, generator=gen, dtype=torch.float64)
                direction /= direction.norm().clamp_min(1e-12)
                radius = far_factor * (nn**0.5) * max(diam, scale) * draw(st.floats(1.0, 10.0))
                rows.append(centre + radius * direction)
            else:  # mimic
                rows.append(honest[draw(st.integers(0, nn - bb - 1))].clone())
        positions = draw(st.permutations(range(nn)))
        bad_pos = tuple(sorted(positions[:bb]))
        out = torch.empty(nn, dd, dtype=torch.float64)
        good_pos = [i for i in range(nn) if i not in set(bad_pos)]
        out[good_pos] = honest
        for p, r in zip(positions[:bb], rows):
            out[p] = r
        kinds_by_pos = dict(zip(positions[:bb], row_kinds))
        return UpdateBatch(out.to(device=device, dtype=dtype), bad_pos, tuple(kinds_by_pos[p] for p in bad_pos))

    return build()


def assert_within_honest_range(aggregate: torch.Tensor, honest: torch.Tensor, *, atol: float = 1e-9) -> None:
    """Every coordinate of ``aggregate`` lies within the honest rows' range for that coordinate."""
    h = honest.to(torch.float64)
    a = aggregate.to(torch.float64).cpu()
    lo, hi = h.min(dim=0).values.cpu(), h.max(dim=0).values.cpu()
    tol = atol * (1 + torch.maximum(lo.abs(), hi.abs()))
    bad = ((a < lo - tol) | (a > hi + tol) | ~torch.isfinite(a)).nonzero().flatten().tolist()
    if bad:
        j = bad[0]
        raise AssertionError(
            f"{len(bad)} coordinate(s) outside the honest range; e.g. coordinate {j}: {float(a[j])} not in "
            f"[{float(lo[j])}, {float(hi[j])}]"
        )


def _call(rule: Defense | Callable[[], Defense], *args: Any, **kwargs: Any) -> AggregationResult:
    r = rule() if not isinstance(rule, Defense) else rule
    return r(*args, **kwargs)


def assert_permutation_invariant(
    rule: Defense | Callable[[], Defense],
    updates: torch.Tensor,
    perm: Sequence[int],
    *,
    weights: torch.Tensor | None = None,
    context: Mapping[str, Any] | None = None,
    atol: float = 1e-7,
    rtol: float = 1e-7,
) -> None:
    """Reordering the clients (ids travel with their rows) changes neither output nor flags.

    Pass a factory (``lambda: CenteredClipping()``) for stateful rules so each call starts
    fresh.  Compares the aggregate, the per-client weights (matched by id) and the flagged set.
    """
    n = updates.shape[0]
    p = torch.as_tensor(list(perm), dtype=torch.long)
    if sorted(p.tolist()) != list(range(n)):
        raise ConfigError("perm must be a permutation of range(n)")
    ids = list(range(100, 100 + n))
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    a = _call(rule, updates, w, client_ids=ids, context=context)
    b = _call(rule, updates[p], None if w is None else w[p], client_ids=[ids[i] for i in p.tolist()], context=context)
    finite = updates[torch.isfinite(updates)]
    magnitude = 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)
    if a.aggregate is not None and b.aggregate is not None:
        # summation order changes rounding: the tolerance scales with the largest input
        torch.testing.assert_close(
            b.aggregate, a.aggregate, atol=atol * magnitude, rtol=rtol, equal_nan=True,
            msg=lambda m: f"{rule!r}: aggregate changed under permutation: {m}",
        )
    if a.weights is not None and b.weights is not None:
        torch.testing.assert_close(
            b.weights, a.weights[p.to(a.weights.device)], atol=atol, rtol=rtol,
            msg=lambda m: f"{rule!r}: per-client weights changed under permutation: {m}",
        )
    if set(a.flagged) != set(b.flagged):
        raise AssertionError(
            f"{rule!r}: flagged set changed under permutation: {sorted(a.flagged)} vs {sorted(b.flagged)}"
        )


def assert_translation_equivariant(
    rule: Defense | Callable[[], Defense],
    updates: torch.Tensor,
    shift: torch.Tensor,
    *,
    context: Mapping[str, Any] | None = None,
    atol: float = 1e-6,
    rtol: float = 1e-6,
) -> None:
    """``rule(u + s) == rule(u) + s`` for a common shift ``s`` of every row."""
    a = _call(rule, updates, context=context)
    b = _call(rule, updates + shift.to(updates), context=context)
    if a.aggregate is None or b.aggregate is None:
        raise ConfigError("translation equivariance needs rules that return an aggregate")
    finite = updates[torch.isfinite(updates)]
    scale = (float(finite.abs().max()) if finite.numel() else 0.0) + float(shift.abs().max()) + 1.0
    torch.testing.assert_close(
        b.aggregate, a.aggregate + shift.to(a.aggregate), atol=atol * scale, rtol=rtol,
        msg=lambda m: f"{rule!r}: not translation equivariant: {m}",
    )


def assert_selects_honest(result: AggregationResult, byzantine_ids: Sequence[int], *, atol: float = 1e-12) -> None:
    """No Byzantine client carries a non-zero coefficient in ``result.weights``."""
    if result.weights is None:
        raise ConfigError("the result has no per-client weights to check")
    bad = set(int(b) for b in byzantine_ids)
    picked = [cid for cid, w in zip(result.client_ids, result.weights.tolist()) if abs(w) > atol and cid in bad]
    if picked:
        raise AssertionError(f"Byzantine client(s) {picked} were given non-zero weight")


def assert_weighted_mean(
    result: AggregationResult, updates: torch.Tensor, weights: torch.Tensor, *, atol: float = 1e-9, rtol: float = 1e-9
) -> None:
    """``result.aggregate`` equals ``sum_i w_i u_i / sum_i w_i`` (computed in float64)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    expect = (w[:, None] * updates.to(torch.float64)).sum(0) / w.sum()
    if result.aggregate is None:
        raise ConfigError("the result has no aggregate")
    torch.testing.assert_close(result.aggregate.to(torch.float64), expect, atol=atol, rtol=rtol)


def assert_gram_matches_plaintext(
    rule: Defense | Callable[[], Defense],
    updates: torch.Tensor,
    gram: Any,
    *,
    context: Mapping[str, Any] | None = None,
    atol: float = 1e-6,
    rtol: float = 1e-9,
) -> None:
    """The rule decides the same per-client weights and flags from ``gram`` as from ``updates``.

    Weights are compared within ``atol + rtol * |w|``: a rule may give a weight of any size
    legitimately (FLTrust rescales each update to the reference's norm, so an update of norm
    1e-72 gets a weight near 1e72), and two float64 routes to it agree in relative terms only.
    """
    plain = _call(rule, updates, client_ids=list(gram.client_ids), context=context)
    r = rule() if not isinstance(rule, Defense) else rule
    on_gram = r.aggregate_gram(gram, context=context)
    if plain.weights is None or on_gram.weights is None:
        raise ConfigError("both results need per-client weights")
    torch.testing.assert_close(on_gram.weights.cpu(), plain.weights.to(torch.float64).cpu(), atol=atol, rtol=rtol)
    if set(plain.flagged) != set(on_gram.flagged):
        raise AssertionError(f"flags differ: plaintext {sorted(plain.flagged)} vs Gram {sorted(on_gram.flagged)}")


class GramWeightedMean(Defense):
    """A geometry rule whose decision is the sample-weighted mean, computed through the Gram path.

    Why: under CKKS a rule that runs on the Gram makes the key holder decrypt a Gram and then a
    coefficient-weighted combination; this rule's coefficients are the plain weighted mean, so a
    test can compare the Gram path's decrypted combination with the plaintext mean directly
    (the error bounds, the decode's resolution floor) without a rule's own decision in between.
    Testing only: it never runs on plaintext updates.
    """

    name = "gram-mean"
    runs_on = frozenset({Reveals.UPDATES, Reveals.GRAM})

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *,
                  context: Mapping[str, Any]) -> AggregationResult:  # pragma: no cover - not used
        raise ConfigError("GramWeightedMean runs through the Gram path only")

    def aggregate_gram(self, gram: Gram, weights: torch.Tensor | None = None, *,
                       context: Mapping[str, Any] | None = None) -> AggregationResult:
        w = torch.ones(gram.n, dtype=torch.float64) if weights is None else weights.to(torch.float64)
        return AggregationResult(None, gram.client_ids, weights=w / w.sum())
