"""Pre-trained frozen backbones for a family of ``CoLoRAMLP`` shapes (before federation starts).

FedMosaic (Seo et al., ICLR 2026) adapts *pre-trained* models of one family with Co-LoRA; the
bundled heterogeneous benchmark otherwise freezes a seeded random backbone per shape.  This
module pre-trains the base weights (never the adapters) of every shape on a pre-training set,
in one of two ways:

``"family"``
    One weight-sharing super-network (slimmable / once-for-all training: Yu et al., ICLR 2019;
    Cai et al., ICLR 2020).  Every block key (``first``, ``mid<k>``, ``last``) owns one weight
    matrix and bias as large as the largest shape needs; a shape's block is the leading rows
    and columns of its key's matrix, which is how ``CoLoRAMLP(family_seed=...)`` nests the
    shapes at initialisation.  Each step takes the mean cross-entropy of every shape on the
    same batch and updates the shared matrices, so after pre-training the 32-wide network is
    still the first 32 units of the 64-wide one, and the output block of every depth reads
    hidden features that one matrix was trained to classify.  Assumption this rests on: the
    adapters' ``A`` (drawn per key the same way) then project features that mean the same in
    every shape, so a shared ``P``, ``Q`` mixes compatible coordinates.
``"independent"``
    Each shape pre-trained on its own from its family initialisation (the nesting is lost):
    the control that separates "a pre-trained backbone" from "one family of them".

Data: the caller supplies the pre-training set.  ``run_heterogeneous`` uses the training
clients' pooled support and query images (all shapes pooled); held-out clients draw their
images from a disjoint pool (``make_digits_clusters``), so nothing a held-out client is
scored on is seen in pre-training.  Both the shared and the each-group-alone runs get the same
backbone, so their difference is still only what the shared ``P``, ``Q`` carry.

The adapters are left as initialised: with ``B = 0`` a block equals its base layer, so
pre-training the base is plain supervised training of the MLP.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from securefml.errors import ConfigError
from securefml.relevance.colora import CoLoRALinear, CoLoRAMLP, _family_key

__all__ = ["PRETRAIN_MODES", "PretrainConfig", "pretrain_backbones"]

log = logging.getLogger(__name__)

#: pre-training modes (``"none"``: keep the seeded backbones)
PRETRAIN_MODES = ("none", "family", "independent")


@dataclass(frozen=True)
class PretrainConfig:
    """How the frozen backbones are pre-trained.

    Attributes
    ----------
    mode:
        ``"none"``, ``"family"`` (one weight-sharing super-network) or ``"independent"``.
    steps, lr, batch_size:
        Adam steps on minibatches of ``batch_size`` (``0``: the whole set every step) at ``lr``.
    seed:
        Minibatch order.
    """

    mode: str = "none"
    steps: int = 300
    lr: float = 0.01
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in PRETRAIN_MODES:
            raise ConfigError(f"pretrain mode must be one of {PRETRAIN_MODES}, got {self.mode!r}")
        if self.steps < 0 or not self.lr > 0 or self.batch_size < 0:
            raise ConfigError(f"pretrain needs steps >= 0, lr > 0, batch_size >= 0; got "
                              f"{self.steps}, {self.lr}, {self.batch_size}")


def _blocks(model: CoLoRAMLP) -> list[tuple[str, CoLoRALinear]]:
    out = []
    for k in model.keys:
        blk = model.blocks[k]
        assert isinstance(blk, CoLoRALinear)
        out.append((k, blk))
    return out


def _batches(n: int, config: PretrainConfig, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(config.seed)
    size = n if config.batch_size == 0 else min(config.batch_size, n)
    out: list[torch.Tensor] = []
    perm = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(config.steps):
        if pos + size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        out.append(perm[pos:pos + size].to(device))
        pos += size
    return out


def pretrain_backbones(models: Mapping[str, CoLoRAMLP], x: torch.Tensor, y: torch.Tensor,
                       config: PretrainConfig) -> dict[str, float]:
    """Pre-train the base layers of ``models`` in place; returns each shape's final training loss.

    Parameters
    ----------
    models:
        Architecture name -> model.  ``"family"`` requires family-initialised models
        (``CoLoRAMLP(family_seed=...)``): their bases are slices of the same seeded matrices, up
        to the fan-in scale; the super-network starts from the largest shape's entries.
    x, y:
        The pre-training set (see the module docstring for which data is allowed here).
    config:
        Mode and optimizer.

    Raises
    ------
    ConfigError
        Empty or mismatched data, or ``"family"`` with models that are not family-initialised.
    """
    if config.mode == "none" or config.steps == 0:
        return {}
    if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise ConfigError(f"pre-training needs matching non-empty x and y, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not models:
        raise ConfigError("pre-training needs at least one model")
    dev = _blocks(next(iter(models.values())))[0][1].base.weight.device
    x, y = x.to(dev).flatten(1), y.to(dev)
    batches = _batches(x.shape[0], config, dev)
    if config.mode == "independent":
        return {a: _pretrain_one(m, x, y, batches, config.lr) for a, m in models.items()}
    return _pretrain_family(models, x, y, batches, config.lr)


def _pretrain_one(model: CoLoRAMLP, x: torch.Tensor, y: torch.Tensor, batches: list[torch.Tensor],
                  lr: float) -> float:
    layers = [blk.base for _, blk in _blocks(model)]
    params = [p.detach().clone().requires_grad_(True) for lin in layers for p in (lin.weight, lin.bias)]
    opt = torch.optim.Adam(params, lr=lr)
    loss = torch.tensor(float("nan"))
    for idx in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(_forward(params, x[idx]), y[idx])
        loss.backward()
        opt.step()
    with torch.no_grad():
        for i, lin in enumerate(layers):
            lin.weight.copy_(params[2 * i])
            lin.bias.copy_(params[2 * i + 1])
    return float(loss.detach())


def _forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = x
    n = len(params) // 2
    for i in range(n):
        h = h @ params[2 * i].T + params[2 * i + 1]
        if i < n - 1:
            h = torch.relu(h)
    return h


def _pretrain_family(models: Mapping[str, CoLoRAMLP], x: torch.Tensor, y: torch.Tensor,
                     batches: list[torch.Tensor], lr: float) -> dict[str, float]:
    if any(m.family_seed is None for m in models.values()):
        raise ConfigError("family pre-training needs family-initialised models (CoLoRAMLP(family_seed=...))")
    # the super-network: per family key the largest block any shape has
    size: dict[str, tuple[int, int]] = {}
    for m in models.values():
        for k, blk in _blocks(m):
            fk = _family_key(k)
            r, c = size.get(fk, (0, 0))
            size[fk] = (max(r, blk.base.out_features), max(c, blk.base.in_features))
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    written: dict[str, torch.Tensor] = {}
    bwritten: dict[str, torch.Tensor] = {}
    for m in sorted(models.values(), key=lambda m: -sum(b.base.weight.numel() for _, b in _blocks(m))):
        for k, blk in _blocks(m):
            fk = _family_key(k)
            if fk not in weights:
                weights[fk] = torch.zeros(size[fk], device=x.device)
                biases[fk] = torch.zeros(size[fk][0], device=x.device)
                written[fk] = torch.zeros(size[fk], dtype=torch.bool, device=x.device)
                bwritten[fk] = torch.zeros(size[fk][0], dtype=torch.bool, device=x.device)
            r, c = blk.base.weight.shape
            # the largest shape comes first and sets every entry it has; a smaller shape only
            # fills entries no larger shape has (its family slices agree up to the fan-in scale)
            unset = ~written[fk][:r, :c]
            weights[fk][:r, :c][unset] = blk.base.weight.detach()[unset]
            bunset = ~bwritten[fk][:r]
            biases[fk][:r][bunset] = blk.base.bias.detach()[bunset]
            written[fk][:r, :c] = True
            bwritten[fk][:r] = True
    for t in (*weights.values(), *biases.values()):
        t.requires_grad_(True)
    opt = torch.optim.Adam([*weights.values(), *biases.values()], lr=lr)
    losses: dict[str, float] = {}
    for idx in batches:
        opt.zero_grad()
        total = torch.zeros((), device=x.device)
        for a, m in models.items():
            params: list[torch.Tensor] = []
            for k, blk in _blocks(m):
                fk = _family_key(k)
                r, c = blk.base.weight.shape
                params += [weights[fk][:r, :c], biases[fk][:r]]
            loss = nn.functional.cross_entropy(_forward(params, x[idx]), y[idx])
            losses[a] = float(loss.detach())
            total = total + loss / len(models)
        total.backward()
        opt.step()
    with torch.no_grad():
        for m in models.values():
            for k, blk in _blocks(m):
                fk = _family_key(k)
                r, c = blk.base.weight.shape
                blk.base.weight.copy_(weights[fk][:r, :c])
                blk.base.bias.copy_(biases[fk][:r])
    log.info("family pre-training: %d steps, final losses %s", len(batches),
             {a: round(v, 4) for a, v in losses.items()})
    return losses
