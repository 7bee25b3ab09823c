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
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from securefml.errors import ConfigError, InvalidUpdateError

__all__ = ["ParamSpec", "LayerSpec", "LayerLayout", "layer_of"]


def layer_of(param_name: str) -> str:
    """The owning module of a parameter (``"net.0.weight" -> "net.0"``; top-level stays)."""
    head, dot, _ = param_name.rpartition(".")
    return head if dot else param_name


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
    name: str
    params: tuple[ParamSpec, ...]

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
    """

    def __init__(
        self,
        params: Iterable[tuple[str, Sequence[int]]],
        *,
        buffers: Iterable[str] = (),
        excluded_buffers: Iterable[str] = (),
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
        self.layers: tuple[LayerSpec, ...] = tuple(LayerSpec(k, tuple(v)) for k, v in grouped.items())
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
    def from_params(cls, params: Mapping[str, torch.Tensor]) -> LayerLayout:
        return cls((n, t.shape) for n, t in params.items())

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
