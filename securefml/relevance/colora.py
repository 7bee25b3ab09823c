"""Co-LoRA: a dimension-invariant adapter whose shared part travels across architectures.

``CoLoRALinear`` wraps an ``nn.Linear`` (Seo et al., FedMosaic, ICLR 2026)::

    h = W x + b + s * B ((A x) P + Q)          A: r x in,  B: out x r,  P: r x r,  Q: 1 x r

``A`` and ``B`` depend on the layer's dimensions (the *architecture part*); ``P`` and ``Q``
depend only on the rank ``r`` (the *shared part*), so clients whose networks have different
widths can still average ``P`` and ``Q``.  Initialisation: ``P = I``, ``Q = 0``, ``B = 0``
and ``A`` random, which makes the adapter exactly plain LoRA (Hu et al., ICLR 2022) at
initialisation (``h = W x + b + s * B A x``), and the wrapped layer exactly the base layer.

Heterogeneous federation
------------------------
Clients run MLPs of different widths and depths (``CoLoRAMLP``).  Each adapted block gets a
*block key* by the depth-matching rule: the first block is ``"first"``, the last block is
``"last"``, and the k-th intermediate block (k = 1, 2, ...) is ``"mid<k>"``.  So the input and
output blocks of every architecture match each other (they see the same input space and
produce the same classes), intermediate blocks match by position from the input, and an
intermediate block that a shallower network lacks is shared only among the networks that have
it.  A client's upload splits into ``shared_state`` (``<key>.P``, ``<key>.Q`` for each block:
same shapes for every architecture of a given rank) and ``architecture_state`` (base weights,
``A``, ``B``), and ``aggregate_heterogeneous`` averages the shared part over every client that
has the key and the architecture part within each architecture group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from securefml.errors import ConfigError

__all__ = [
    "CoLoRALinear",
    "CoLoRAMLP",
    "block_keys",
    "shared_state",
    "architecture_state",
    "load_shared",
    "HeteroUpload",
    "aggregate_heterogeneous",
]


class CoLoRALinear(nn.Module):
    """``nn.Linear`` plus a Co-LoRA adapter ``s * B((A x) P + Q)``.

    Parameters
    ----------
    base:
        The wrapped linear layer (kept as ``self.base``).
    rank:
        Adapter rank ``r``.
    alpha:
        LoRA scaling numerator: ``s = alpha / r`` (default ``alpha = r``, so ``s = 1``).
    freeze_base:
        Stop gradients to the base weights (LoRA fine-tuning of a pre-trained layer).
    generator:
        Randomness for ``A``'s initialisation (Kaiming-uniform, as LoRA does).
    """

    def __init__(self, base: nn.Linear, rank: int, *, alpha: float | None = None, freeze_base: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"CoLoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if rank < 1:
            raise ConfigError(f"rank must be >= 1, got {rank}")
        self.base = base
        self.rank = int(rank)
        self.scaling = float(alpha if alpha is not None else rank) / rank
        if freeze_base:
            for p in self.base.parameters():
                p.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        bound = 1.0 / math.sqrt(base.in_features)
        a = (torch.rand(rank, base.in_features, generator=generator) * 2 - 1) * bound
        self.lora_A = nn.Parameter(a.to(dev, dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))
        self.P = nn.Parameter(torch.eye(rank, device=dev, dtype=dt))
        self.Q = nn.Parameter(torch.zeros(1, rank, device=dev, dtype=dt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x @ self.lora_A.T) @ self.P + self.Q
        return self.base(x) + self.scaling * (z @ self.lora_B.T)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling}"


def block_keys(depth: int) -> tuple[str, ...]:
    """Block keys of a network with ``depth`` adapted blocks (the depth-matching rule)."""
    if depth < 1:
        raise ConfigError(f"depth must be >= 1, got {depth}")
    if depth == 1:
        return ("last",)
    return ("first", *[f"mid{k}" for k in range(1, depth - 1)], "last")


class CoLoRAMLP(nn.Module):
    """A ReLU MLP whose every linear layer is a ``CoLoRALinear`` (one block per layer).

    ``hidden`` are the widths (``(64,)``, ``(64, 64)``...); blocks are named by their
    depth-matching key (``blocks.first``, ``blocks.mid1``, ``blocks.last``).
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, *, rank: int = 4,
                 alpha: float | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        dims = [in_features, *hidden, out_features]
        if min(dims) < 1:
            raise ConfigError(f"layer sizes must be positive, got {dims}")
        keys = block_keys(len(dims) - 1)
        self.keys = keys
        self.blocks = nn.ModuleDict({
            k: CoLoRALinear(nn.Linear(dims[i], dims[i + 1]), rank, alpha=alpha, generator=generator)
            for i, k in enumerate(keys)
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for i, k in enumerate(self.keys):
            h = self.blocks[k](h)
            if i < len(self.keys) - 1:
                h = torch.relu(h)
        return h


def _is_shared(name: str) -> bool:
    return name.endswith(".P") or name.endswith(".Q")


def shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<block key>.P": r x r, "<block key>.Q": 1 x r}`` of a ``CoLoRAMLP`` (detached copies)."""
    out = {}
    for name, p in model.named_parameters():
        if _is_shared(name):
            key = name.removeprefix("blocks.")
            out[key] = p.detach().clone()
    return out


def architecture_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that is not a shared P or Q (base weights, A, B), detached copies."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not _is_shared(n)}


def load_shared(model: nn.Module, shared: Mapping[str, torch.Tensor]) -> None:
    """Write shared P, Q into ``model`` for the block keys it has (others are ignored)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in shared.items():
            name = f"blocks.{key}"
            if name in params:
                if params[name].shape != value.shape:
                    raise ConfigError(f"shared {key} has shape {tuple(value.shape)}, model has "
                                      f"{tuple(params[name].shape)} (different ranks?)")
                params[name].copy_(value)


@dataclass(frozen=True)
class HeteroUpload:
    """One client's Co-LoRA upload: its architecture id, the two parts, its sample weight."""

    architecture: str
    shared: Mapping[str, torch.Tensor]
    arch: Mapping[str, torch.Tensor]
    weight: float = 1.0


def aggregate_heterogeneous(
    uploads: Sequence[HeteroUpload], *, share: bool = True
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]]:
    """Weighted means: architecture part within each architecture; shared part across all.

    With ``share=False`` the shared part is also averaged within each architecture only (the
    "each architecture group alone" baseline).  Returns ``(shared per architecture, architecture
    part per architecture)``: with sharing every architecture gets the same value for a key.
    """
    if not uploads:
        raise ConfigError("no uploads to aggregate")
    archs = sorted({u.architecture for u in uploads})
    arch_out: dict[str, dict[str, torch.Tensor]] = {}
    for a in archs:
        group = [u for u in uploads if u.architecture == a]
        arch_out[a] = _mean([u.arch for u in group], [u.weight for u in group])
    shared_out: dict[str, dict[str, torch.Tensor]] = {}
    for a in archs:
        pool = uploads if share else [u for u in uploads if u.architecture == a]
        keys = set().union(*(u.shared.keys() for u in uploads if u.architecture == a))
        shared_out[a] = {}
        for key in sorted(keys):
            having = [u for u in pool if key in u.shared]
            shapes = {tuple(u.shared[key].shape) for u in having}
            if len(shapes) != 1:
                raise ConfigError(f"shared {key} has shapes {sorted(shapes)} across clients: ranks differ")
            shared_out[a][key] = _mean([{key: u.shared[key]} for u in having], [u.weight for u in having])[key]
    return shared_out, arch_out


def _mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    w = torch.tensor(list(weights), dtype=torch.float64)
    if (w <= 0).any():
        raise ConfigError("upload weights must be positive")
    w = w / w.sum()
    names = states[0].keys()
    for s in states:
        if s.keys() != names:
            raise ConfigError("uploads of one architecture must hold the same parameters")
    return {n: sum((wi * s[n].to(torch.float64) for wi, s in zip(w, states)),
                   torch.zeros_like(states[0][n], dtype=torch.float64)).to(states[0][n].dtype) for n in names}
