"""Which layers a client uploads: all, named, the most changed, or Cedar's representational change.

Non-uploaded layers cost zero bytes; the server aggregates each layer over the clients that
sent it and keeps the global value where nobody did.  A selector is either *client-chosen*
(each client decides from its own update) or *server-dictated* (every client uploads the same
layers, which mask-based protocols and robust rules need): a dictated selector decides from the
server's previous aggregate, which every client also knows.

A budget smaller than a layer needs chunks: ``ChunkRotation`` works on a ``ChunkedLayout``
(every layer split into contiguous chunks that protocols and rules see as layers) and sends
about ``fraction`` of the parameters per round, every chunk once in every ``ceil(1/fraction)``
rounds; ``run_experiment`` installs the chunked layout on the server for it.

A learner's extra meta-parameters (Meta-SGD's rates, the Bayesian learners' log-variances)
follow the layer they belong to by the roles the learner declares on the layout
(``securefml.updates.Role``), never by their names; a layout without roles has only weights.
The server's step on a round that uploaded part of the model is ``securefml.optimizer``'s (Adam
state per entry: an idle chunk's moments do not decay).  Guarantees, measurements and the
diagnosis of the half-budget gap: ``docs/selection.md``.

References
----------
You et al., "A framework reforming personalized IoT by federated meta-learning" (Cedar),
Nat. Commun. 2025: layers are ranked by how much their representational dissimilarity
structure changed; the min(3, floor(L/4)) least-changed layers are withheld each round.
"""

from __future__ import annotations

import hashlib
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping

import torch

from securefml.errors import ConfigError
from securefml.registry import Registry
from securefml.updates import LayerLayout, ParamRole, Role

__all__ = [
    "LayerSelector",
    "AllLayers",
    "NamedLayers",
    "TopKImportance",
    "RepresentationalChange",
    "SELECTORS",
    "make_selector",
    "relative_change",
    "rdm_change",
    "ChunkedLayout",
    "chunk_layout",
    "ChunkRotation",
    "CHUNK_SEPARATOR",
]

#: maps a full flat parameter vector to {layer name: features of that layer on the stimulus}
Probe = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


def _tie_extras(layout: LayerLayout, chosen: Iterable[str]) -> tuple[str, ...]:
    """Layers that belong to a model layer (their declared role's ``owner``) follow that layer's choice.

    Roles come from the layout only (``MetaLearner.layout()`` declares them); a layout built
    without roles has every layer ``Role.WEIGHT``, so each of its layers is chosen on its own.
    """
    chosen = set(chosen)
    chosen |= {n for n in layout.layer_names if layout.owner(n) != n and layout.owner(n) in chosen}
    return layout.canonical(chosen)


def _model_layers(layout: LayerLayout) -> tuple[str, ...]:
    return layout.layers_with_role(Role.WEIGHT)


class LayerSelector(ABC):
    """Base class.  ``server_dictated`` selectors return one plan for the whole cohort."""

    name = "selector"
    server_dictated = False

    @abstractmethod
    def select(
        self,
        layout: LayerLayout,
        update: torch.Tensor,
        global_vector: torch.Tensor,
        *,
        probe: Probe | None = None,
    ) -> tuple[str, ...]:
        """Layers to upload given a full-length ``update`` and the received ``global_vector``."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class AllLayers(LayerSelector):
    """Upload everything (the default)."""

    name = "all"
    server_dictated = True

    def select(self, layout, update, global_vector, *, probe=None):  # type: ignore[no-untyped-def]
        return layout.layer_names


class NamedLayers(LayerSelector):
    """Upload the layers whose name matches one of ``patterns`` (exact names or regexes)."""

    name = "named"
    server_dictated = True

    def __init__(self, patterns: Iterable[str] | str) -> None:
        pats = [patterns] if isinstance(patterns, str) else list(patterns)
        if not pats:
            raise ConfigError("NamedLayers needs at least one name or pattern")
        try:
            self._compiled = [re.compile(p) for p in pats]
        except re.error as exc:
            raise ConfigError(f"bad layer pattern: {exc}") from None
        self.patterns = tuple(pats)

    def select(self, layout, update, global_vector, *, probe=None):  # type: ignore[no-untyped-def]
        chosen = [n for n in layout.layer_names if any(p.fullmatch(n) for p in self._compiled)]
        if not chosen:
            raise ConfigError(f"no layer matches {self.patterns}; layers are {layout.layer_names}")
        return _tie_extras(layout, chosen)


def relative_change(layout: LayerLayout, update: torch.Tensor, global_vector: torch.Tensor) -> dict[str, float]:
    """||delta_l|| / ||theta_l|| per layer (a tiny floor keeps zero-initialised layers finite)."""
    out = {}
    for name, s in layout.slices().items():
        out[name] = float(update[s].norm() / global_vector[s].norm().clamp_min(1e-8))
    return out


def _budget_pick(
    layout: LayerLayout, scores: Mapping[str, float], fraction: float, *, first: str | None = None
) -> tuple[str, ...]:
    """Highest-scoring model layers while their bytes (with tied extras) stay within the budget.

    ``first`` (if given) is taken before any other layer, even when it alone exceeds the budget.
    """
    total = layout.numel
    budget = fraction * total
    chosen: list[str] = []
    used = 0
    order = sorted(scores, key=scores.__getitem__, reverse=True)
    if first is not None:
        order = [first] + [n for n in order if n != first]
    for name in order:
        size = layout.numel_of(_tie_extras(layout, [name]))
        if chosen and used + size > budget:
            continue
        chosen.append(name)
        used += size
    return _tie_extras(layout, chosen)


class TopKImportance(LayerSelector):
    """Keep the layers with the largest relative change ||delta_l|| / ||theta_l||.

    Parameters
    ----------
    fraction:
        Byte budget as a fraction of the all-layers upload (at least one layer is sent).
    server_dictated:
        If True the server ranks layers by its previous aggregate and every client uploads
        the same ones (needed by SecAgg and by robust rules); else each client ranks its own.
    error_feedback:
        If True each client keeps what it withheld and adds it to its next update (error
        feedback / memory, Stich et al. 2018; Karimireddy et al. 2019), so withheld layers
        are delayed rather than dropped.

    Notes
    -----
    **No starved layer (server-dictated).**  Ranking by change alone can starve a layer for
    ever: on the bundled MLP a 50 % budget sent only the 325-parameter head after round 0,
    because the hidden layer's score never beat it within the budget.  A server-dictated
    plan therefore always includes the *stalest* model layer (the one uploaded longest ago,
    ties broken in layout order) before filling the rest of the budget by score.  Guarantee:
    with ``L`` model layers every layer is uploaded at least once in every ``R = L``
    consecutive dictated rounds (the layers uploaded before a given layer's last upload can
    only shrink, and one of them, the stalest, is uploaded every round).  The round that
    forces a layer larger than the budget exceeds the budget by that layer (at least one
    layer is always sent).  Client-chosen selection keeps the per-client ranking (no state is
    shared between clients).  ``state_dict()`` / ``load_state_dict()`` carry the ages.
    """

    name = "topk"

    def __init__(self, fraction: float = 0.25, *, server_dictated: bool = False, error_feedback: bool = False) -> None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"topk fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)
        self.server_dictated = bool(server_dictated)
        self.error_feedback = bool(error_feedback)
        self._plans = 0
        self._last_sent: dict[str, int] = {}

    def stalest(self, layout: LayerLayout) -> str:
        """The model layer uploaded longest ago by a dictated plan (never uploaded: oldest)."""
        layers = _model_layers(layout)
        return min(layers, key=lambda n: (self._last_sent.get(n, -1), layers.index(n)))

    def select(self, layout, update, global_vector, *, probe=None):  # type: ignore[no-untyped-def]
        scores = relative_change(layout, update, global_vector)
        model_scores = {n: scores[n] for n in _model_layers(layout)}
        if not self.server_dictated:
            return _budget_pick(layout, model_scores, self.fraction)
        plan = _budget_pick(layout, model_scores, self.fraction, first=self.stalest(layout))
        for name in plan:
            self._last_sent[name] = self._plans
        self._plans += 1
        return plan

    def state_dict(self) -> dict[str, object]:
        return {"plans": self._plans, "last_sent": dict(self._last_sent)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        plans, last = state.get("plans", 0), state.get("last_sent", {})
        if not isinstance(plans, int) or not isinstance(last, Mapping):
            raise ConfigError("TopKImportance state needs an int 'plans' and a mapping 'last_sent'")
        self._plans = plans
        self._last_sent = {str(k): int(v) for k, v in last.items()}


#: joins a layer's name and its chunk index (``layers.0#2``); never part of a module name
CHUNK_SEPARATOR = "#"


def _chunk_entry(layer: str, index: int) -> str:
    """The one virtual parameter of chunk ``index`` of ``layer`` (its layer is ``layer#index``)."""
    return f"{layer}{CHUNK_SEPARATOR}{index}.flat"


class ChunkedLayout(LayerLayout):
    """A ``LayerLayout`` whose "layers" are contiguous chunks of the model's layers.

    Chunks partition the same flat vector as ``base`` (same order, same offsets), so a
    parameter vector flattened by either layout is the same tensor; only the *names* that
    selection, protocols and rules see are finer: chunk ``i`` of layer ``L`` is ``L#i``, with
    one virtual entry ``L#i.flat`` of the chunk's size.  Everything keyed by layer name (the
    per-layer aggregation over the clients that sent a layer, per-layer robust state, the
    server keeping the global value where nobody uploaded) then works per chunk without any
    change to the protocols.  ``flatten`` / ``unflatten`` go through ``base`` on the model's
    real parameter names (whole vectors only).

    Roles carry over chunk by chunk: chunk ``i`` of a layer the learner declared as belonging to
    another (Meta-SGD's rate ``alpha.layers.0`` is the ``LEARNED_RATE`` of ``layers.0``) belongs
    to chunk ``i`` of that layer (same size, since both layers have the same shape), so
    selection ties them and ``layers_with_role`` finds the rates' chunks (``docs/selection.md``).
    """

    def __init__(self, base: LayerLayout, max_chunk: int) -> None:
        if max_chunk <= 0:
            raise ConfigError(f"max_chunk must be a positive number of entries, got {max_chunk}")
        if isinstance(base, ChunkedLayout):
            raise ConfigError("the layout is already chunked")
        entries: list[tuple[str, tuple[int, ...]]] = []
        roles: dict[str, ParamRole] = {}
        for layer in base.layers:
            if CHUNK_SEPARATOR in layer.name:
                raise ConfigError(f"layer name {layer.name!r} contains the chunk separator {CHUNK_SEPARATOR!r}")
            n = layer.numel
            pieces = max(1, -(-n // max_chunk))
            bounds = [round(i * n / pieces) for i in range(pieces + 1)]  # near-equal sizes, all <= max_chunk
            for i in range(pieces):
                entry = _chunk_entry(layer.name, i)
                entries.append((entry, (bounds[i + 1] - bounds[i],)))
                if layer.of is not None:  # same numel as its layer, so the same chunk bounds
                    roles[entry] = ParamRole(layer.role, of=_chunk_entry(layer.of, i))
        super().__init__(entries, roles=roles)
        self.base = base
        self.max_chunk = int(max_chunk)

    @staticmethod
    def layer_of_chunk(name: str) -> str:
        """The model layer a chunk belongs to (``layers.0#2 -> layers.0``)."""
        return name.rsplit(CHUNK_SEPARATOR, 1)[0]

    def flatten(self, params: Mapping[str, torch.Tensor], layers: Iterable[str] | None = None) -> torch.Tensor:
        """The base layout's flat vector of the model parameters ``params`` (then the chosen chunks)."""
        if any(p.name in params for layer in self.layers for p in layer.params):
            return super().flatten(params, layers)  # a mapping of chunk entries
        full = self.base.flatten(params)
        return full if layers is None else self.gather(full, layers)

    def unflatten(self, vector: torch.Tensor, layers: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """The model's named parameters from a full-length vector (partial chunk sets are refused)."""
        if layers is not None and self.canonical(layers) != self.layer_names:
            raise ConfigError("a chunked layout unflattens whole vectors only (chunks are not model parameters)")
        return self.base.unflatten(vector)

    def fingerprint(self) -> bytes:
        return hashlib.sha256(b"chunked\x00" + self.base.fingerprint() + repr(self.max_chunk).encode()).digest()[:16]

    def __repr__(self) -> str:
        return f"ChunkedLayout({len(self.layers)} chunks of <= {self.max_chunk} entries over {self.base!r})"


def chunk_layout(base: LayerLayout, max_chunk: int) -> ChunkedLayout:
    """``base`` split into chunks of at most ``max_chunk`` entries (see ``ChunkedLayout``)."""
    return ChunkedLayout(base, max_chunk)


class ChunkRotation(LayerSelector):
    """Upload about a ``fraction`` of the *parameters* every round, as chunks, in rotation.

    Layer-granular budgets cannot use a budget smaller than a layer: on the bundled MLP a 50 %
    budget fits one 4,160-entry hidden layer per round, so rotation sent 34 % of the bytes and
    each layer got a third of the updates.  This selector works on a ``ChunkedLayout`` (layers
    split into chunks of at most ``chunk_size(d)`` entries; ``run_experiment`` installs it on
    the server for this selector) and cuts the model's chunks, in layout order, into
    ``G = ceil(1 / fraction)`` groups of near-equal size; plan ``t`` is group ``t mod G``.

    Parameters
    ----------
    fraction:
        Target share of the model's entries per upload; the rotation has ``G = ceil(1/fraction)``
        groups, so each upload is ``d / G`` entries up to one chunk (50 %: two halves).
    chunks_per_budget:
        Chunks per group (``chunk_size = ceil(d / (G * chunks_per_budget))``): more chunks make
        the groups more equal.
    staggered:
        ``False`` (server-dictated, the default): every client of a round uploads the same
        group, so robust rules and mask-based protocols see one layer set, and consecutive
        rounds take consecutive groups.  ``True``: consecutive *uploads* (clients in cohort
        order, continuing into the next round) take consecutive groups, so within one round the
        cohort covers every chunk, each from about ``1/G`` of the clients.  The server then
        aggregates each chunk over its senders (plain aggregation; a rule that needs one layer
        set refuses the round with a ``ConfigError``).
    error_feedback:
        Each honest client keeps what it withheld and adds it to its next update (Stich et al.
        2018; Karimireddy et al. 2019).  On by default: without it a dictated half budget lost
        about 15 more points on digits-fewshot FOMAML (3 seeds: 0.687 vs 0.836), although a client's
        residual is on average 9.5 rounds old there (10 of 100 clients per round); dropping or
        capping stale residuals made it worse (``docs/selection.md``).

    Notes
    -----
    **Guarantee.**  Every chunk (so every parameter) is uploaded in exactly one of every ``G``
    consecutive plans: dictated, every ``G = ceil(1/fraction)`` rounds (every 2 rounds at 50 %);
    staggered, by one client in every ``G`` consecutive uploads.  Each plan holds between
    ``d/G - s`` and ``d/G + s`` entries for chunks of at most ``s`` entries.  A layer smaller
    than a chunk is one chunk; a layer declared as belonging to another (Meta-SGD's rates) follows
    that layer's chunks.
    Property-tested over random layouts and fractions (``tests/unit/test_chunk_selection.py``).
    The first round of a run sends every layer (the server has no aggregate to plan from).
    """

    name = "chunks"
    server_dictated = True

    def __init__(
        self, fraction: float = 0.5, *, chunks_per_budget: int = 8, staggered: bool = False,
        error_feedback: bool = True,
    ) -> None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"chunks fraction must be in (0, 1], got {fraction}")
        if chunks_per_budget < 1:
            raise ConfigError(f"chunks_per_budget must be >= 1, got {chunks_per_budget}")
        self.fraction = float(fraction)
        self.chunks_per_budget = int(chunks_per_budget)
        self.staggered = bool(staggered)
        self.server_dictated = not self.staggered
        self.error_feedback = bool(error_feedback)
        self._plans = 0

    @property
    def groups(self) -> int:
        """``G``: the number of plans in one rotation."""
        return math.ceil(1 / self.fraction - 1e-9)

    def chunk_size(self, numel: int) -> int:
        """Largest chunk, in entries, for a model of ``numel`` entries."""
        return max(1, -(-int(numel) // (self.groups * self.chunks_per_budget)))

    def partition(self, layout: LayerLayout) -> tuple[tuple[str, ...], ...]:
        """The ``G`` groups of model chunks (layout order, each cut nearest ``k * d / G``)."""
        if not isinstance(layout, ChunkedLayout):
            raise ConfigError(
                "ChunkRotation needs a ChunkedLayout (run_experiment installs one; elsewhere build "
                "chunk_layout(layout, selector.chunk_size(layout.numel)))")
        g = self.groups
        names = _model_layers(layout)
        total = sum(layout.numel_of(_tie_extras(layout, [n])) for n in names)
        groups: list[list[str]] = [[] for _ in range(g)]
        done = 0
        for name in names:
            size = layout.numel_of(_tie_extras(layout, [name]))
            k = min(g - 1, int((done + size / 2) * g // total)) if total else 0
            groups[k].append(name)
            done += size
        return tuple(_tie_extras(layout, grp) for grp in groups)

    def plan(self, layout: LayerLayout) -> tuple[str, ...]:
        """The next group of the rotation (advances it); an empty group is skipped."""
        parts = [p for p in self.partition(layout) if p]
        plan = parts[self._plans % len(parts)]
        self._plans += 1
        return plan

    def select(self, layout, update, global_vector, *, probe=None):  # type: ignore[no-untyped-def]
        return self.plan(layout)

    def state_dict(self) -> dict[str, object]:
        return {"plans": self._plans}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        plans = state.get("plans", 0)
        if not isinstance(plans, int):
            raise ConfigError("ChunkRotation state needs an int 'plans'")
        self._plans = plans


def _rdm(features: torch.Tensor) -> torch.Tensor:
    """Condensed representational dissimilarity matrix: pairwise distances between stimuli."""
    f = features.reshape(features.shape[0], -1).to(torch.float64)
    d = torch.cdist(f, f)
    iu = torch.triu_indices(f.shape[0], f.shape[0], offset=1)
    return d[iu[0], iu[1]]


def rdm_change(local: torch.Tensor, received: torch.Tensor) -> float:
    """1 - r^2, with r the Pearson correlation of the local and received RDMs (Cedar's score)."""
    a, b = _rdm(local), _rdm(received)
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    if denom <= 1e-12:
        return 0.0 if torch.allclose(a, b) else 1.0
    r = float((a @ b) / denom)
    return 1.0 - r * r


class RepresentationalChange(LayerSelector):
    """Cedar: withhold the layers whose representation changed least on a stimulus batch.

    Each layer's features on a fixed stimulus batch are compared between the local model
    (global + update) and the received global model; ``withhold`` layers with the smallest
    change are not uploaded (Cedar: min(3, floor(L/4)); set ``withhold`` to override).
    """

    name = "cedar"

    def __init__(self, withhold: int | None = None) -> None:
        if withhold is not None and withhold < 0:
            raise ConfigError(f"withhold must be >= 0, got {withhold}")
        self.withhold = withhold

    def n_withheld(self, n_layers: int) -> int:
        k = min(3, n_layers // 4) if self.withhold is None else self.withhold
        return min(k, n_layers - 1)

    def select(self, layout, update, global_vector, *, probe=None):  # type: ignore[no-untyped-def]
        if probe is None:
            raise ConfigError("RepresentationalChange needs a probe that returns per-layer stimulus features")
        layers = _model_layers(layout)
        local = probe(global_vector + update)
        received = probe(global_vector)
        scores = {n: rdm_change(local[n], received[n]) for n in layers}
        withheld = set(sorted(layers, key=scores.__getitem__)[: self.n_withheld(len(layers))])
        return _tie_extras(layout, [n for n in layers if n not in withheld])


SELECTORS: Registry[LayerSelector] = Registry("selector")
SELECTORS.register("all")(AllLayers)
SELECTORS.register("named", positional="patterns")(NamedLayers)
SELECTORS.register("topk", positional="fraction")(TopKImportance)
SELECTORS.register("cedar", positional="withhold")(RepresentationalChange)
SELECTORS.register("chunks", positional="fraction")(ChunkRotation)


def make_selector(spec: str) -> LayerSelector:
    """``all``, ``named:layers.4``, ``topk:0.25`` (``topk:fraction=0.25,server_dictated=true``), ``cedar:1``.

    A ``named`` pattern is one regular expression, so ``named:fc1.*|head.*`` matches either.
    """
    return SELECTORS.build(spec)


def bytes_fraction(layout: LayerLayout, layers: Iterable[str]) -> float:
    return layout.numel_of(layers) / max(1, layout.numel)


