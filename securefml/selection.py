"""Which layers a client uploads: all, named, the most changed, or Cedar's representational change.

Non-uploaded layers cost zero bytes; the server aggregates each layer over the clients that
sent it and keeps the global value where nobody did.  A selector is either *client-chosen*
(each client decides from its own update) or *server-dictated* (every client uploads the same
layers, which mask-based protocols and robust rules need): a dictated selector decides from the
server's previous aggregate, which every client also knows.

References
----------
You et al., "A framework reforming personalized IoT by federated meta-learning" (Cedar),
Nat. Commun. 2025: layers are ranked by how much their representational dissimilarity
structure changed; the min(3, floor(L/4)) least-changed layers are withheld each round.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping

import torch

from securefml.errors import ConfigError
from securefml.registry import Registry
from securefml.updates import LayerLayout, Role

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
    "SHADOW_PREFIXES",
    "shadowed_layer",
]

#: maps a full flat parameter vector to {layer name: features of that layer on the stimulus}
Probe = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


#: the bundled learners' names for layers that shadow a model layer: Meta-SGD's rates
#: ``alpha.<layer>``, the Bayesian learners' log-variances ``logvar.<layer>`` (and their rates
#: ``alpha.logvar.<layer>``).  Transitional: selection reads the roles a learner declares on the
#: layout (``MetaLearner.layout()``); these names are used only for a layout that declares no
#: role at all (one built with ``LayerLayout.from_params(params)`` without the learner's roles).
SHADOW_PREFIXES = ("alpha.", "logvar.")


def shadowed_layer(name: str) -> str:
    """The model layer a layer shadows by the bundled learners' names (``alpha.logvar.layers.0 -> layers.0``).

    Transitional (see ``SHADOW_PREFIXES``): prefer ``layout.owner(name)`` on a layout with roles.
    """
    stripped = True
    while stripped:
        stripped = False
        for prefix in SHADOW_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def _owner(layout: LayerLayout, name: str) -> str:
    """The model layer ``name`` belongs to: by the roles on the layout (by name only on a role-less layout)."""
    return layout.owner(name) if layout.has_roles else shadowed_layer(name)


def _tie_extras(layout: LayerLayout, chosen: Iterable[str]) -> tuple[str, ...]:
    """Layers that belong to a model layer (their declared role's ``owner``) follow that layer's choice."""
    chosen = set(chosen)
    chosen |= {n for n in layout.layer_names if _owner(layout, n) != n and _owner(layout, n) in chosen}
    return layout.canonical(chosen)


def _model_layers(layout: LayerLayout) -> tuple[str, ...]:
    if layout.has_roles:
        return layout.layers_with_role(Role.WEIGHT)
    return tuple(n for n in layout.layer_names if shadowed_layer(n) == n)


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


def make_selector(spec: str) -> LayerSelector:
    """``all``, ``named:layers.4``, ``topk:0.25`` (``topk:fraction=0.25,server_dictated=true``), ``cedar:1``.

    A ``named`` pattern is one regular expression, so ``named:fc1.*|head.*`` matches either.
    """
    return SELECTORS.build(spec)


def bytes_fraction(layout: LayerLayout, layers: Iterable[str]) -> float:
    return layout.numel_of(layers) / max(1, layout.numel)


