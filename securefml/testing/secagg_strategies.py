"""Hypothesis strategies and a property checker for SecAgg+ (``securefml.protocols.secagg``).

Use them in your own property tests of the protocol or of a transport you wrote::

    from hypothesis import given
    from securefml.testing.secagg_strategies import secagg_scenarios

    @given(secagg_scenarios(max_clients=8))
    def test_my_transport(scenario): ...

Every strategy takes plain values or strategies for its data-defining arguments and checks
its tuning options eagerly (a bad value raises ``ConfigError`` at construction, repeating it).
Examples shrink towards fewer clients, shorter vectors, smaller values and no dropouts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st

from securefml.errors import ConfigError
from securefml.protocols.base import ClientUpdate, Transport
from securefml.protocols.secagg_graph import neighbour_graph, round_seed
from securefml.protocols.secagg_plan import RoundPlan
from securefml.updates import LayerLayout

__all__ = [
    "DROP_STAGES",
    "SecAggScenario",
    "cohorts",
    "neighbour_graphs",
    "dropout_patterns",
    "update_vectors",
    "client_weights",
    "secagg_scenarios",
    "recoverable",
    "DropAt",
    "Tamper",
    "Replay",
]

DROP_STAGES = ("advertise", "share", "complaints", "masked", "unmask")


def _draw(data: st.DataObject | None, value):  # noqa: ANN001, ANN202 - value or strategy
    if isinstance(value, st.SearchStrategy):
        assert data is not None
        return data.draw(value)
    return value


def cohorts(*, min_size: int = 3, max_size: int = 12, max_id: int = 10_000) -> st.SearchStrategy[tuple[int, ...]]:
    """Sorted tuples of distinct client ids (shrinks to ``0, 1, 2, ...``)."""
    if not 2 <= min_size <= max_size:
        raise ConfigError(f"need 2 <= min_size <= max_size, got {min_size}, {max_size}")
    if max_id + 1 < max_size:
        raise ConfigError(f"max_id={max_id} cannot give {max_size} distinct ids")
    return st.lists(st.integers(0, max_id), min_size=min_size, max_size=max_size, unique=True).map(
        lambda ids: tuple(sorted(ids))
    )


@st.composite
def neighbour_graphs(
    draw: st.DrawFn,
    cohort: Sequence[int] | st.SearchStrategy[tuple[int, ...]] | None = None,
    *,
    min_k: int = 2,
) -> tuple[tuple[int, ...], int, dict[int, tuple[int, ...]]]:
    """``(cohort, k, graph)`` for a random round seed and a degree ``min_k <= k <= n - 1``."""
    if min_k < 2:
        raise ConfigError(f"min_k must be >= 2, got {min_k}")
    ids = draw(cohort) if isinstance(cohort, st.SearchStrategy) else tuple(cohort or draw(cohorts()))
    n = len(ids)
    k = draw(st.integers(min(min_k, n - 1), n - 1))
    seed = round_seed(draw(st.integers(0, 2**32 - 1)), ids)
    return ids, k, neighbour_graph(ids, k, seed)


def dropout_patterns(
    cohort: Sequence[int],
    *,
    stages: Sequence[str] = DROP_STAGES,
    max_fraction: float = 0.5,
) -> st.SearchStrategy[dict[int, str]]:
    """Client id -> the stage at which it drops (clients not in the dict never drop)."""
    bad = set(stages) - set(DROP_STAGES) - {"consistency"}
    if bad:
        raise ConfigError(f"unknown stages {sorted(bad)}; stages are {DROP_STAGES + ('consistency',)}")
    if not 0 <= max_fraction <= 1:
        raise ConfigError(f"max_fraction must be in [0, 1], got {max_fraction}")
    ids = list(cohort)
    most = int(max_fraction * len(ids))
    return st.lists(st.sampled_from(ids), unique=True, max_size=most).flatmap(
        lambda who: st.tuples(*[st.sampled_from(tuple(stages)) for _ in who]).map(lambda where: dict(zip(who, where)))
        if who
        else st.just({})
    )


def update_vectors(
    n: int, length: int | st.SearchStrategy[int], *, scale: float = 1.0
) -> st.SearchStrategy[np.ndarray]:
    """``[n, length]`` float32 arrays with entries in ``[-2 * scale, 2 * scale]`` (some get clipped)."""
    if n < 1 or scale <= 0:
        raise ConfigError(f"need n >= 1 and scale > 0, got n={n}, scale={scale}")

    @st.composite
    def _arrays(draw: st.DrawFn) -> np.ndarray:
        m = draw(length) if isinstance(length, st.SearchStrategy) else length
        vals = draw(st.lists(st.floats(-2 * scale, 2 * scale, width=32), min_size=n * m, max_size=n * m))
        return np.asarray(vals, dtype=np.float32).reshape(n, m)

    return _arrays()


def client_weights(n: int, *, max_weight: float = 100.0) -> st.SearchStrategy[list[float]]:
    """``n`` positive weights (sample counts) up to ``max_weight``."""
    if max_weight < 1:
        raise ConfigError(f"max_weight must be >= 1, got {max_weight}")
    return st.lists(st.floats(1.0, max_weight), min_size=n, max_size=n)


@dataclass(frozen=True)
class SecAggScenario:
    """A cohort, its inputs, the graph degree/threshold and who drops where."""

    cohort: tuple[int, ...]
    vectors: np.ndarray
    weights: tuple[float, ...]
    k: int
    t: int
    drops: Mapping[int, str]

    def round_inputs(self) -> tuple[LayerLayout, list[ClientUpdate]]:
        """The scenario as one round's inputs: a one-layer layout and each client's update of it."""
        layout = LayerLayout([("w.weight", (self.vectors.shape[1],))])
        updates = [ClientUpdate(c, torch.from_numpy(self.vectors[i]), ("w",), self.weights[i])
                   for i, c in enumerate(self.cohort)]
        return layout, updates


@st.composite
def secagg_scenarios(
    draw: st.DrawFn,
    *,
    min_clients: int = 3,
    max_clients: int = 10,
    max_length: int = 16,
    max_weight: float = 50.0,
    max_drop_fraction: float = 0.5,
    slack: int = 0,
) -> SecAggScenario:
    """Whole SecAgg+ rounds: cohort, vectors, weights, any ``k``, any majority ``t``, any dropouts.

    ``slack`` keeps ``t <= k - slack`` (room for dropouts) where the cohort allows it.
    """
    if not 0 <= max_drop_fraction <= 1 or slack < 0:
        raise ConfigError(f"need 0 <= max_drop_fraction <= 1 and slack >= 0, got {max_drop_fraction}, {slack}")
    ids = draw(cohorts(min_size=min_clients, max_size=max_clients, max_id=4 * max_clients))
    n = len(ids)
    k = draw(st.integers(2, n - 1))
    t = draw(st.integers(k // 2 + 1, max(k // 2 + 1, k - slack)))
    m = draw(st.integers(1, max_length))
    vecs = draw(update_vectors(n, m))
    w = draw(client_weights(n, max_weight=max_weight))
    drops = draw(dropout_patterns(ids, max_fraction=max_drop_fraction))
    return SecAggScenario(ids, vecs, tuple(w), k, t, drops)


def recoverable(plan: RoundPlan, drops: Mapping[int, str]) -> bool:
    """Whether an honest SecAgg+ round (no signatures) must finish under ``drops``.

    The reference semantics, stage by stage: a client shares only if at least ``t`` of its
    neighbours advertised keys; a client that shared but whose complaints never arrived is
    excluded before masking (nobody masks with it); a client masks only if at least ``t`` of its
    neighbours are left to mask with (``|U_i| >= t``); the contributors ``C`` are the clients
    that sent a masked input; a contributor answers the unmask request only if at least ``t``
    of its neighbours are in ``C``; the round finishes iff ``|C| >= t`` and every contributor, and
    every dropped client some contributor masked with, has at least ``t`` neighbours that answer.
    """
    t = plan.t
    nb = {c: set(plan.neighbours(c)) for c in plan.cohort}
    u1 = {c for c in plan.cohort if drops.get(c) != "advertise"}
    u2 = {c for c in u1 if len(nb[c] & u1) >= t and drops.get(c) != "share"}
    u3 = {c for c in u2 if drops.get(c) != "complaints"}
    masking = {c for c in u3 if len(nb[c] & u3) >= t}
    contributors = {c for c in masking if drops.get(c) != "masked"}
    if len(contributors) < t:
        return False
    responders = {c for c in contributors if drops.get(c) != "unmask" and len(nb[c] & contributors) >= t}
    dropped = u3 - contributors
    need = set(contributors) | {d for d in dropped if nb[d] & contributors}
    return all(len(nb[c] & responders) >= t for c in need)


class DropAt(Transport):
    """Fault injection: client ``c`` drops at stage ``drops[c]`` (its message there is lost)."""

    def __init__(self, drops: Mapping[int, str]) -> None:
        self.drops = dict(drops)

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        return None if self.drops.get(sender) == stage else data


class Tamper(Transport):
    """Flip one byte of ``victim``'s message at ``stage`` (``offset`` counted from the end)."""

    def __init__(self, victim: int, stage: str, offset: int = 1) -> None:
        self.victim, self.stage, self.offset = victim, stage, offset

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        if sender != self.victim or stage != self.stage:
            return data
        buf = bytearray(data)
        buf[len(buf) - self.offset] ^= 0x01
        return bytes(buf)


class Replay(Transport):
    """Record every message; replay ``victim``'s message of a recorded round at ``stage``."""

    def __init__(self) -> None:
        self.recorded: dict[tuple[int, str], bytes] = {}
        self.victim: int | None = None
        self.stage = ""

    def arm(self, victim: int, stage: str) -> None:
        self.victim, self.stage = victim, stage

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        if sender == self.victim and stage == self.stage and (sender, stage) in self.recorded:
            return self.recorded[(sender, stage)]
        self.recorded[(sender, stage)] = data
        return data
