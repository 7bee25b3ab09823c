"""Named-layer updates <-> flat vectors: the one place in securefml that flattens.

A *layer* is a module that owns parameters (``features.0`` owns ``features.0.weight`` and
``features.0.bias``).  Layers are what selection chooses and what the wire carries, so a
``LayerLayout`` groups parameters by owning module and fixes one stable order: the order of
``named_parameters()`` (or of the mapping given).  Every protocol, defense and selector works
on flat vectors laid out by the same ``LayerLayout``, so a vector's meaning never depends on
who built it.

Buffers.  ``LayerLayout.from_module`` also knows a module's buffers: floating-point buffers
(BatchNorm's ``running_mean``/``running_var``) are entries of their owning layer, flagged
``buffer=True``, so ``layout.flatten(model.state_dict())`` carries them and a user's own loop
federates them like weights (FedAvg averages the whole state); integer buffers
(``num_batches_tracked``) cannot be averaged and are listed in ``excluded_buffers`` instead of
vanishing.  The bundled learners never produce buffer entries: they run BatchNorm on batch
statistics (see ``securefml.models.batchnorm_on_batch_statistics``).

Roles.  Besides model weights, a learner's meta-parameters may hold tensors that *belong to* a
weight: Meta-SGD's learned inner rates, the Bayesian learners' log-variances (and their rates).
The learner declares them (``MetaLearner.layer_roles()``: ``{name: ParamRole(role, of=weight)}``)
and the layout carries them per layer, so selection (a rate follows its weight's layer), attacks
(Meta-SGD rate poisoning) and the server query ``layers_with_role`` / ``owner`` instead of
matching name prefixes.  A layout built without roles has every layer ``Role.WEIGHT``; the
fingerprint covers roles only where one is declared, so the fingerprint of a layout of plain
weights is unchanged.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from securefml.errors import ConfigError, InvalidUpdateError

__all__ = ["LayerLayout", "LayerSpec", "ParamRole", "ParamSpec", "Role", "layer_of"]


def layer_of(param_name: str) -> str:
    """The owning module of a parameter (``"net.0.weight" -> "net.0"``; top-level stays)."""
    head, dot, _ = param_name.rpartition(".")
    return head if dot else param_name


class Role(Enum):
    """What a layer of the meta-parameters is."""

    #: a model weight (or buffer): what the model computes with
    WEIGHT = "weight"
    #: a learned inner learning rate of a weight (Meta-SGD), same shape as that weight
    LEARNED_RATE = "learned_rate"
    #: the log-variance of a Gaussian weight whose mean is the weight (Bayesian learners)
    LOG_VARIANCE = "log_variance"


@dataclass(frozen=True)
class ParamRole:
    """A learner's declaration for one parameter: its role and the parameter it belongs to.

    ``of`` names the parameter this one shadows (same shape): ``alpha.layers.0.weight`` is the
    ``LEARNED_RATE`` of ``layers.0.weight``; ``alpha.logvar.layers.0.weight`` is the rate of the
    log-variance ``logvar.layers.0.weight``, itself the ``LOG_VARIANCE`` of ``layers.0.weight``.
    """

    role: Role
    of: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.role, Role):
            raise ConfigError(f"a parameter role must be a Role, got {self.role!r}")
        if (self.role is Role.WEIGHT) != (self.of is None):
            raise ConfigError(f"{self.role.name} {'takes no' if self.role is Role.WEIGHT else 'needs an'} `of` "
                              f"parameter, got of={self.of!r}")


@dataclass(frozen=True)
class ParamSpec:
    """One named tensor of a layer: a parameter, or (``buffer=True``) a floating-point buffer."""

    name: str
    shape: tuple[int, ...]
    buffer: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LayerSpec:
    """One layer: its parameters, its role, and (extras only) the layer it belongs to."""

    name: str
    params: tuple[ParamSpec, ...]
    role: Role = Role.WEIGHT
    of: str | None = None

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)


class LayerLayout:
    """Stable order of layers and parameters, and the flat-vector layout derived from it.

    Parameters
    ----------
    params:
        Ordered ``(name, shape)`` pairs, e.g. from ``model.named_parameters()``.
    buffers:
        Which of those names are buffers rather than parameters (``from_module`` fills it).
    excluded_buffers:
        Buffers of the module that are *not* in the layout (integer ones), for the record.
    roles:
        The learner's declarations for parameters that are not plain weights
        (``{name: ParamRole}``; unlisted names are ``Role.WEIGHT``).  All parameters of a layer
        must share a role and belong to parameters of one layer; each ``of`` must be a parameter
        of the layout with the same shape; chains end at a weight.

    Examples
    --------
    >>> layout = LayerLayout([("fc.weight", (2, 3)), ("alpha.fc.weight", (2, 3))],
    ...                      roles={"alpha.fc.weight": ParamRole(Role.LEARNED_RATE, of="fc.weight")})
    >>> layout.layers_with_role(Role.LEARNED_RATE), layout.owner("alpha.fc")
    (('alpha.fc',), 'fc')
    """

    def __init__(
        self,
        params: Iterable[tuple[str, Sequence[int]]],
        *,
        buffers: Iterable[str] = (),
        excluded_buffers: Iterable[str] = (),
        roles: Mapping[str, ParamRole] | None = None,
    ) -> None:
        flagged = set(buffers)
        grouped: dict[str, list[ParamSpec]] = {}
        seen: set[str] = set()
        for name, shape in params:
            if name in seen:
                raise ConfigError(f"parameter {name!r} appears twice in the layout")
            seen.add(name)
            spec = ParamSpec(name, tuple(int(s) for s in shape), buffer=name in flagged)
            grouped.setdefault(layer_of(name), []).append(spec)
        if flagged - seen:
            raise ConfigError(f"buffers {sorted(flagged - seen)} are not entries of the layout")
        if not grouped:
            raise ConfigError("a layout needs at least one parameter")
        self.excluded_buffers: tuple[str, ...] = tuple(excluded_buffers)
        layer_roles = _layer_roles(grouped, dict(roles or {}))
        self.layers: tuple[LayerSpec, ...] = tuple(LayerSpec(k, tuple(v), *layer_roles.get(k, (Role.WEIGHT, None)))
                                                   for k, v in grouped.items())
        self._index = {layer.name: i for i, layer in enumerate(self.layers)}
        offsets = [0]
        for layer in self.layers:
            offsets.append(offsets[-1] + layer.numel)
        self._offsets = offsets

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: torch.nn.Module, *, buffers: bool = True) -> LayerLayout:
        """The layout of ``module``'s parameters and (``buffers=True``) floating-point buffers.

        Entries follow ``state_dict()`` order, so each buffer sits in its owning layer next to
        that layer's parameters.  Integer buffers (BatchNorm's ``num_batches_tracked``), and with
        ``buffers=False`` every buffer, are listed in ``excluded_buffers``.

        >>> bn = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        >>> layout = LayerLayout.from_module(bn)
        >>> layout.param_names
        ('0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var')
        >>> layout.buffer_names, layout.excluded_buffers
        (('1.running_mean', '1.running_var'), ('1.num_batches_tracked',))
        """
        named_params = dict(module.named_parameters())
        named_buffers = dict(module.named_buffers())
        entries: list[tuple[str, Sequence[int]]] = []
        flagged: list[str] = []
        excluded: list[str] = []
        for name in module.state_dict(keep_vars=True):
            if name in named_params:
                entries.append((name, named_params[name].shape))
            elif name in named_buffers:
                buf = named_buffers[name]
                if buffers and buf.is_floating_point():
                    entries.append((name, buf.shape))
                    flagged.append(name)
                else:
                    excluded.append(name)
        return cls(entries, buffers=flagged, excluded_buffers=excluded)

    @classmethod
    def from_params(cls, params: Mapping[str, torch.Tensor], *,
                    roles: Mapping[str, ParamRole] | None = None) -> LayerLayout:
        """The layout of a parameter mapping (its order), with the learner's ``roles`` if given."""
        return cls(((n, t.shape) for n, t in params.items()), roles=roles)

    # -- queries --------------------------------------------------------------------------
    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for layer in self.layers for p in layer.params)

    @property
    def buffer_names(self) -> tuple[str, ...]:
        """The entries that are buffers (running statistics), not trainable parameters."""
        return tuple(p.name for layer in self.layers for p in layer.params if p.buffer)

    @property
    def numel(self) -> int:
        return self._offsets[-1]

    def role_of(self, layer: str) -> Role:
        """The role of a layer."""
        return self.layer(layer).role

    def layers_with_role(self, role: Role) -> tuple[str, ...]:
        """The layers of one role, in layout order (``Role.WEIGHT``: the model's own layers)."""
        return tuple(layer.name for layer in self.layers if layer.role is role)

    def owner(self, layer: str) -> str:
        """The weight layer a layer belongs to, following ``of`` (itself for a weight layer)."""
        spec = self.layer(layer)
        while spec.of is not None:
            spec = self.layer(spec.of)
        return spec.name

    @property
    def has_roles(self) -> bool:
        """Whether any layer has a role other than ``Role.WEIGHT`` (a learner declared roles)."""
        return any(layer.role is not Role.WEIGHT for layer in self.layers)

    def layer(self, name: str) -> LayerSpec:
        return self.layers[self._index_of(name)]

    def _index_of(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise ConfigError(f"unknown layer {name!r}; layers are {list(self._index)}") from None

    def canonical(self, layers: Iterable[str] | None) -> tuple[str, ...]:
        """Layer names in layout order, validated and de-duplicated (None -> all layers)."""
        if layers is None:
            return self.layer_names
        idx = sorted({self._index_of(n) for n in layers})
        return tuple(self.layers[i].name for i in idx)

    def numel_of(self, layers: Iterable[str] | None) -> int:
        return sum(self.layer(n).numel for n in self.canonical(layers))

    def slices(self, layers: Iterable[str] | None = None) -> dict[str, slice]:
        """Where each chosen layer sits in the *full* flat vector."""
        out = {}
        for n in self.canonical(layers):
            i = self._index[n]
            out[n] = slice(self._offsets[i], self._offsets[i + 1])
        return out

    def mask(self, layers: Iterable[str] | None, *, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean mask over the full flat vector, True on the chosen layers."""
        m = torch.zeros(self.numel, dtype=torch.bool, device=device)
        for s in self.slices(layers).values():
            m[s] = True
        return m

    def fingerprint(self) -> bytes:
        """16 bytes that change whenever a name, shape or the order changes."""
        h = hashlib.sha256()
        for layer in self.layers:
            for p in layer.params:
                h.update(p.name.encode() + b"\x00" + repr(p.shape).encode() + (b"\x02" if p.buffer else b"\x01"))
            if layer.role is not Role.WEIGHT:  # only declared roles: a plain layout's bytes are unchanged
                h.update(b"\x03" + layer.role.value.encode() + b"\x00" + str(layer.of).encode() + b"\x00")
        return h.digest()[:16]

    # -- flatten / unflatten -----------------------------------------------------------------
    def flatten(
        self, params: Mapping[str, torch.Tensor], layers: Iterable[str] | None = None
    ) -> torch.Tensor:
        """Concatenate the chosen layers' parameters (layout order) into one 1-D tensor."""
        parts = []
        for n in self.canonical(layers):
            for p in self.layer(n).params:
                try:
                    t = params[p.name]
                except KeyError:
                    raise ConfigError(f"parameter {p.name!r} missing from the update") from None
                if tuple(t.shape) != p.shape:
                    raise ConfigError(f"parameter {p.name!r} has shape {tuple(t.shape)}, expected {p.shape}")
                parts.append(t.reshape(-1))
        if not parts:
            return torch.zeros(0)
        return torch.cat(parts)

    def unflatten(self, vector: torch.Tensor, layers: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Inverse of ``flatten`` for the same ``layers``; returns views into ``vector``."""
        chosen = self.canonical(layers)
        expected = self.numel_of(chosen)
        if vector.dim() != 1 or vector.numel() != expected:
            raise InvalidUpdateError(
                f"vector of shape {tuple(vector.shape)} does not match {expected} entries for layers {chosen}"
            )
        out: dict[str, torch.Tensor] = {}
        pos = 0
        for n in chosen:
            for p in self.layer(n).params:
                out[p.name] = vector[pos : pos + p.numel].view(p.shape)
                pos += p.numel
        return out

    def scatter(self, vector: torch.Tensor, layers: Iterable[str] | None, *, fill: float = 0.0) -> torch.Tensor:
        """Place a partial vector (the chosen layers) into a full-length vector."""
        chosen = self.canonical(layers)
        if vector.numel() != self.numel_of(chosen):
            raise InvalidUpdateError(f"partial vector has {vector.numel()} entries, layers {chosen} need more/less")
        full = torch.full((self.numel,), fill, dtype=vector.dtype, device=vector.device)
        pos = 0
        for s in self.slices(chosen).values():
            size = s.stop - s.start
            full[s] = vector[pos : pos + size]
            pos += size
        return full

    def gather(self, full: torch.Tensor, layers: Iterable[str] | None) -> torch.Tensor:
        """Extract the chosen layers from a full-length vector."""
        chosen = self.canonical(layers)
        return torch.cat([full[s] for s in self.slices(chosen).values()]) if chosen else full[:0]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerLayout) and self.layers == other.layers

    def __hash__(self) -> int:
        return hash(self.layers)

    def __repr__(self) -> str:
        return f"LayerLayout({len(self.layers)} layers, {self.numel} entries)"


def _layer_roles(grouped: Mapping[str, list[ParamSpec]],
                 roles: dict[str, ParamRole]) -> dict[str, tuple[Role, str | None]]:
    """Per-layer ``(role, of-layer)`` from per-parameter declarations, validated."""
    shapes = {p.name: p.shape for specs in grouped.values() for p in specs}
    unknown = sorted(set(roles) - set(shapes))
    if unknown:
        raise ConfigError(f"roles declared for {unknown}, which are not parameters of the layout")
    out: dict[str, tuple[Role, str | None]] = {}
    for layer, specs in grouped.items():
        decl = {(roles.get(p.name, ParamRole(Role.WEIGHT)).role,
                 None if p.name not in roles or roles[p.name].of is None else layer_of(str(roles[p.name].of)))
                for p in specs}
        if len(decl) != 1:
            raise ConfigError(f"the parameters of layer {layer!r} declare different roles: {sorted(map(str, decl))}")
        for p in specs:
            target = roles[p.name].of if p.name in roles else None
            if target is None:
                continue
            if target not in shapes:
                raise ConfigError(f"{p.name!r} belongs to {target!r}, which is not a parameter of the layout")
            if shapes[target] != p.shape:
                raise ConfigError(f"{p.name!r} has shape {p.shape} but belongs to {target!r} of shape {shapes[target]}")
        ((role, of),) = decl
        if role is not Role.WEIGHT:
            out[layer] = (role, of)
    for layer in out:  # every chain ends at a weight layer
        seen = {layer}
        cur = out[layer][1]
        while cur in out:
            if cur in seen:
                raise ConfigError(f"layer roles form a cycle through {sorted(seen)}")
            seen.add(cur)
            cur = out[cur][1]
    return out
