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

from securefml.errors import ConfigError, InvalidUpdateError

__all__ = [
    "CoLoRALinear",
    "CoLoRAMLP",
    "block_keys",
    "MATCH_RULES",
    "is_shared",
    "shared_state",
    "architecture_state",
    "load_shared",
    "HeteroUpload",
    "check_upload",
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


#: depth-matching rules of ``block_keys``
MATCH_RULES = ("ends", "depth")


def block_keys(depth: int, *, match: str = "ends") -> tuple[str, ...]:
    """Block keys of a network with ``depth`` adapted blocks (the depth-matching rule).

    ``match="ends"``: the output block is ``"last"`` in every network, so output blocks match
    whatever they read.  ``match="depth"``: the output block is ``"last<h>"`` with ``h =
    depth - 1`` hidden layers, so it matches only output blocks that read the same hidden depth
    (a 64x64 network's output block reads its second hidden layer, a 32- or 64-wide one's its
    first; their ``A`` project different features, so one shared ``P``, ``Q`` would have to
    serve two meanings).  Input and intermediate blocks are keyed the same way by both rules.
    """
    if depth < 1:
        raise ConfigError(f"depth must be >= 1, got {depth}")
    if match not in MATCH_RULES:
        raise ConfigError(f"match must be one of {MATCH_RULES}, got {match!r}")
    last = "last" if match == "ends" else f"last{depth - 1}"
    if depth == 1:
        return (last,)
    return ("first", *[f"mid{k}" for k in range(1, depth - 1)], last)


def _family_key(key: str) -> str:
    """The key a block's family matrices are drawn under (``last<h>`` draws as ``last``)."""
    return "last" if key.startswith("last") else key


#: largest layer width a family-initialised ``CoLoRAMLP`` may have (its seeded matrices are this big)
FAMILY_WIDTH = 1024


def _family_matrix(seed: int, key: str, kind: str, rows: int, cols: int) -> torch.Tensor:
    """Leading ``rows x cols`` block of one seeded ``FAMILY_WIDTH``-square uniform(-1, 1) matrix.

    The matrix depends only on ``(seed, key, kind)``, so two networks of one family that have a
    block ``key`` get the same entries wherever their shapes overlap (nested widths).
    """
    if rows > FAMILY_WIDTH or cols > FAMILY_WIDTH:
        raise ConfigError(f"family initialisation supports widths up to {FAMILY_WIDTH}, got {rows} x {cols}")
    tag = int.from_bytes(f"{key}/{kind}".encode(), "little") % (1 << 31)
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + tag) % (1 << 62))
    return (torch.rand(FAMILY_WIDTH, FAMILY_WIDTH, generator=gen) * 2 - 1)[:rows, :cols]


class CoLoRAMLP(nn.Module):
    """A ReLU MLP whose every linear layer is a ``CoLoRALinear`` (one block per layer).

    ``hidden`` are the widths (``(64,)``, ``(64, 64)``...); blocks are named by their
    depth-matching key (``blocks.first``, ``blocks.mid1``, ``blocks.last``; ``match`` picks the
    rule, see ``block_keys``).

    ``family_seed``: initialise as one member of a *family* of architectures.  Every block's
    base weight, base bias and ``A`` are the leading rows and columns of seeded matrices that
    depend only on ``(family_seed, block key)`` (scaled like PyTorch's and LoRA's defaults,
    uniform with bound ``1/sqrt(fan_in)``), so a 32-wide network is the first 32 units of the
    64-wide one.  That is what makes ``P`` and ``Q`` of a matched block mean the same thing
    in every architecture: ``A``'s rows (the adapter's r input directions) agree on the
    common coordinates, and the hidden units the adapter writes to are the same units.
    FedMosaic gets this alignment from pre-trained models of one family; without it, the
    r-dimensional spaces of two architectures are unrelated random bases and averaging
    ``P``, ``Q`` across them mixes incompatible coordinates (the collapse measured before
    this option existed, ``docs/relevance.md``).
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, *, rank: int = 4,
                 alpha: float | None = None, generator: torch.Generator | None = None,
                 family_seed: int | None = None, match: str = "ends") -> None:
        super().__init__()
        dims = [in_features, *hidden, out_features]
        if min(dims) < 1:
            raise ConfigError(f"layer sizes must be positive, got {dims}")
        keys = block_keys(len(dims) - 1, match=match)
        self.keys = keys
        self.family_seed = family_seed
        self.blocks = nn.ModuleDict({
            k: CoLoRALinear(nn.Linear(dims[i], dims[i + 1]), rank, alpha=alpha, generator=generator)
            for i, k in enumerate(keys)
        })
        if family_seed is not None:
            with torch.no_grad():
                for k in keys:
                    blk = self.blocks[k]
                    assert isinstance(blk, CoLoRALinear)
                    fan_in = blk.base.in_features
                    bound = 1.0 / math.sqrt(fan_in)
                    fk = _family_key(k)
                    blk.base.weight.copy_(_family_matrix(family_seed, fk, "W", blk.base.out_features, fan_in) * bound)
                    blk.base.bias.copy_(_family_matrix(family_seed, fk, "b", 1, blk.base.out_features)[0] * bound)
                    blk.lora_A.copy_(_family_matrix(family_seed, fk, "A", rank, fan_in) * bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for i, k in enumerate(self.keys):
            h = self.blocks[k](h)
            if i < len(self.keys) - 1:
                h = torch.relu(h)
        return h


def is_shared(name: str) -> bool:
    """Whether parameter ``name`` belongs to the shared part (a block's ``P`` or ``Q``)."""
    return name.endswith(".P") or name.endswith(".Q")


def shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<block key>.P": r x r, "<block key>.Q": 1 x r}`` of a ``CoLoRAMLP`` (detached copies)."""
    out = {}
    for name, p in model.named_parameters():
        if is_shared(name):
            key = name.removeprefix("blocks.")
            out[key] = p.detach().clone()
    return out


def architecture_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that is not a shared P or Q (base weights, A, B), detached copies."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not is_shared(n)}


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
    """One client's Co-LoRA upload: its architecture id, the two parts, its sample weight.

    ``client_id`` names the sender in errors (None when the caller does not track it).
    """

    architecture: str
    shared: Mapping[str, torch.Tensor]
    arch: Mapping[str, torch.Tensor]
    weight: float = 1.0
    client_id: int | None = None


def check_upload(upload: HeteroUpload) -> None:
    """Refuse an upload with a non-finite tensor or weight (``InvalidUpdateError`` naming the client).

    One diverged client's NaN, averaged into the shared P and Q, would reach every
    architecture: the round must go on without it (``run_heterogeneous`` does that).
    """
    if not math.isfinite(upload.weight) or upload.weight <= 0:
        raise InvalidUpdateError(f"upload weight must be positive and finite, got {upload.weight}",
                                 sender=upload.client_id)
    for part, state in (("shared", upload.shared), ("architecture", upload.arch)):
        for name, value in state.items():
            if not bool(torch.isfinite(value).all()):
                raise InvalidUpdateError(f"{part} tensor {name!r} contains NaN or Inf", sender=upload.client_id)


def aggregate_heterogeneous(
    uploads: Sequence[HeteroUpload], *, share: bool = True, per_architecture: bool = False
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]]:
    """Weighted means: architecture part within each architecture; shared part across all.

    With ``share=False`` the shared part is also averaged within each architecture only (the
    "each architecture group alone" baseline).  ``per_architecture``: the shared part is the
    plain mean over architectures of each architecture's weighted mean, so every shape counts
    the same however many clients it has (default: every client counts by its weight, and a
    small group's P, Q are mostly the other groups').  Returns ``(shared per architecture,
    architecture part per architecture)``: with sharing every architecture gets the same value
    for a key.
    """
    if not uploads:
        raise ConfigError("no uploads to aggregate")
    for u in uploads:
        check_upload(u)
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
            if per_architecture and share:
                means = [_mean([{key: u.shared[key]} for u in having if u.architecture == b],
                               [u.weight for u in having if u.architecture == b])
                         for b in sorted({u.architecture for u in having})]
                shared_out[a][key] = _mean(means, [1.0] * len(means))[key]
            else:
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
