"""Data-poisoning attacks: a malicious client trains honestly on data it has corrupted.

These attacks only touch the client's local ``Task`` (``poison_task``); the update it then
computes is sent unchanged, so they work under every protocol and cannot be told apart from
an honest client by the wire.  ``attack_success_rate`` measures a backdoor on any model
through a plain predict function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from securefml.attacks.base import Attack
from securefml.attacks.registry import ATTACKS
from securefml.data.base import Task
from securefml.errors import ConfigError, DataError

__all__ = ["LabelFlip", "Backdoor", "Triggered", "attack_success_rate", "SPLITS"]

SPLITS = ("support", "query")


def _check_fraction(fraction: float) -> float:
    fraction = float(fraction)
    if not 0 < fraction <= 1:
        raise ConfigError(f"poisoned fraction must be in (0, 1], got {fraction}")
    return fraction


def _check_splits(splits: Sequence[str] | str) -> tuple[str, ...]:
    chosen = (splits,) if isinstance(splits, str) else tuple(splits)
    bad = [s for s in chosen if s not in SPLITS]
    if bad or not chosen:
        raise ConfigError(f"splits must be a non-empty subset of {SPLITS}, got {chosen}")
    return chosen


def _pick(n: int, fraction: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Boolean mask selecting ``round(fraction * n)`` rows (at least one) uniformly at random."""
    k = n if fraction >= 1 else max(1, round(fraction * n))
    perm = torch.randperm(n, generator=generator, device=generator.device if generator is not None else "cpu")
    mask = torch.zeros(n, dtype=torch.bool, device=perm.device)
    mask[perm[:k]] = True
    return mask.to(device)


@ATTACKS.register("labelflip", positional="fraction")
class LabelFlip(Attack):
    """Flip labels ``y -> C - 1 - y`` on a fraction of the malicious client's data.

    For regression tasks the targets are negated (``y -> -y``), the analogue that reverses
    the learned relation.

    Threat model: a malicious client controls its local data only (non-omniscient, no
    collusion needed).  Assumes labels in ``[0, C)`` with ``C = task.n_classes``.

    Parameters
    ----------
    fraction:
        Fraction of the examples of each chosen split to flip (1.0 = all).
    splits:
        Which splits to poison (``"support"``, ``"query"``, or both).

    References
    ----------
    Biggio et al., Poisoning Attacks against SVMs, ICML 2012; the label-flip attack of
    Karimireddy, He & Jaggi, ICLR 2022 (``y -> 9 - y`` on MNIST).
    """

    name = "labelflip"

    def __init__(self, fraction: float = 1.0, *, splits: Sequence[str] | str = SPLITS) -> None:
        self.fraction = _check_fraction(fraction)
        self.splits = _check_splits(splits)

    def flip(self, y: torch.Tensor, task: Task) -> torch.Tensor:
        """The flipped targets (all of them; ``poison_task`` chooses which rows to use)."""
        if task.kind == "regression":
            return -y
        if task.n_classes is None:
            raise DataError(f"client {task.client_id}: label flipping needs task.n_classes")
        return (task.n_classes - 1 - y).to(y.dtype)

    def poison_task(self, task: Task, *, generator: torch.Generator | None = None) -> Task:
        changes: dict[str, torch.Tensor] = {}
        for split in self.splits:
            y = getattr(task, f"{split}_y")
            mask = _pick(y.shape[0], self.fraction, generator, y.device)
            changes[f"{split}_y"] = torch.where(mask.view(-1, *([1] * (y.dim() - 1))), self.flip(y, task), y)
        return task.with_data(**changes)


@ATTACKS.register("backdoor", positional="target")
class Backdoor(Attack):
    """Insert a trigger into a fraction of the inputs and relabel them as ``target``.

    Image-like inputs (``[m, C, H, W]``, ``[m, H, W]``, or flat ``[m, H*W]`` with
    ``image_side`` given or ``H*W`` a perfect square of at least 16, e.g. 8x8 digits) get a
    square patch of side ``patch`` in the bottom-right corner; other tabular inputs get a
    feature trigger: the ``features`` columns set to ``value``.  ``value=None`` uses the
    largest input value of the task (a saturated pixel / feature).

    Threat model: a malicious client controls its own data; the attack succeeds if the
    global (or personalized) model maps triggered inputs to ``target`` while keeping its
    clean accuracy (stealth).  Boost it with ``Scaling`` to survive averaging.

    Parameters
    ----------
    target:
        The label the trigger should force.
    fraction:
        Fraction of the examples of each chosen split that get the trigger and the target.
    trigger:
        ``"auto"``, ``"patch"`` or ``"feature"``.
    patch:
        Side of the square patch (image inputs).
    features:
        Columns of the feature trigger (default: the last three).
    value:
        Trigger value, or None for the task's largest input value.
    image_side:
        Side of a flattened square image, if the inputs are flat images.
    splits:
        Which splits to poison.

    References
    ----------
    Gu, Dolan-Gavitt & Garg, BadNets, 2017 (patch triggers); Bagdasaryan et al., How To
    Backdoor Federated Learning, AISTATS 2020.
    """

    name = "backdoor"

    def __init__(
        self,
        target: int = 0,
        *,
        fraction: float = 0.5,
        trigger: str = "auto",
        patch: int = 2,
        features: Sequence[int] | None = None,
        value: float | None = None,
        image_side: int | None = None,
        splits: Sequence[str] | str = SPLITS,
    ) -> None:
        if int(target) < 0:
            raise ConfigError(f"backdoor target label must be non-negative, got {target}")
        if trigger not in ("auto", "patch", "feature"):
            raise ConfigError(f"unknown trigger {trigger!r}; choose one of: auto, feature, patch")
        if int(patch) < 1:
            raise ConfigError(f"patch side must be at least 1, got {patch}")
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"trigger value must be finite, got {value}")
        if image_side is not None and int(image_side) < 1:
            raise ConfigError(f"image_side must be positive, got {image_side}")
        self.target = int(target)
        self.fraction = _check_fraction(fraction)
        self.trigger = trigger
        self.patch = int(patch)
        self.features = None if features is None else tuple(int(f) for f in features)
        self.value = None if value is None else float(value)
        self.image_side = None if image_side is None else int(image_side)
        self.splits = _check_splits(splits)

    # -- the trigger ---------------------------------------------------------------------------
    def _flat_side(self, d: int) -> int | None:
        if self.image_side is not None:
            return self.image_side if self.image_side**2 == d else None
        side = math.isqrt(d)
        return side if side * side == d and side >= 4 else None

    def mask(self, shape: Sequence[int], *, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean mask over one input of ``shape`` (no batch dimension): True where the trigger sits."""
        shape = tuple(int(s) for s in shape)
        m = torch.zeros(shape, dtype=torch.bool, device=device)
        kind = self.trigger
        side = self._flat_side(shape[0]) if len(shape) == 1 else None
        if kind == "auto":
            kind = "patch" if (len(shape) >= 2 or side is not None) else "feature"
        if kind == "patch":
            if len(shape) >= 2:
                h, w = shape[-2], shape[-1]
                if self.patch > min(h, w):
                    raise ConfigError(f"patch of side {self.patch} does not fit a {h}x{w} input")
                m[..., h - self.patch :, w - self.patch :] = True
                return m
            if side is None:
                raise ConfigError(f"a patch trigger needs image-like inputs; got flat inputs of {shape[0]} features")
            if self.patch > side:
                raise ConfigError(f"patch of side {self.patch} does not fit a {side}x{side} input")
            m.view(side, side)[side - self.patch :, side - self.patch :] = True
            return m
        if len(shape) != 1:
            raise ConfigError("a feature trigger needs flat [m, d] inputs")
        cols = self.features if self.features is not None else tuple(range(max(0, shape[0] - 3), shape[0]))
        bad = [c for c in cols if not -shape[0] <= c < shape[0]]
        if bad:
            raise ConfigError(f"feature trigger columns {bad} out of range for {shape[0]} features")
        m[list(cols)] = True
        return m

    def trigger_value(self, x: torch.Tensor) -> float:
        return self.value if self.value is not None else float(x.max())

    def apply_trigger(self, x: torch.Tensor, *, value: float | None = None) -> torch.Tensor:
        """Stamp the trigger onto every row of ``x`` (a batch); returns a new tensor."""
        if x.dim() < 2 or x.shape[0] == 0:
            raise DataError(f"apply_trigger needs a non-empty batch, got shape {tuple(x.shape)}")
        v = self.trigger_value(x) if value is None else float(value)
        m = self.mask(x.shape[1:], device=x.device)
        return torch.where(m.unsqueeze(0), torch.as_tensor(v, dtype=x.dtype, device=x.device), x)

    # -- the attack ----------------------------------------------------------------------------
    def poison_task(self, task: Task, *, generator: torch.Generator | None = None) -> Task:
        if task.kind != "classification":
            raise DataError(f"client {task.client_id}: a backdoor needs a classification task, got {task.kind!r}")
        if task.n_classes is not None and self.target >= task.n_classes:
            raise ConfigError(f"backdoor target {self.target} is not a class of a {task.n_classes}-class task")
        value = self.trigger_value(torch.cat([task.support_x.reshape(-1), task.query_x.reshape(-1)]))
        changes: dict[str, torch.Tensor] = {}
        for split in self.splits:
            x, y = getattr(task, f"{split}_x"), getattr(task, f"{split}_y")
            rows = _pick(x.shape[0], self.fraction, generator, x.device)
            stamped = self.apply_trigger(x, value=value)
            changes[f"{split}_x"] = torch.where(rows.view(-1, *([1] * (x.dim() - 1))), stamped, x)
            changes[f"{split}_y"] = torch.where(rows, torch.full_like(y, self.target), y)
        return task.with_data(**changes)


class Triggered(Protocol):
    """Anything with a backdoor ``target`` label and an ``apply_trigger(x)`` (Backdoor, MetaBackdoor)."""

    @property
    def target(self) -> int: ...

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor: ...


def attack_success_rate(
    predict: Callable[[torch.Tensor], torch.Tensor],
    data: Task | tuple[torch.Tensor, torch.Tensor],
    backdoor: Triggered,
    *,
    split: str = "query",
) -> float:
    """Fraction of triggered inputs whose true label is not the target that ``predict`` maps to the target.

    Parameters
    ----------
    predict:
        Maps a batch of inputs to labels ``[m]`` or to scores ``[m, C]`` (argmax is taken).
    data:
        A ``Task`` (its ``split`` is used) or an ``(x, y)`` pair of clean inputs and labels.
    backdoor:
        The attack whose trigger and target are measured (``Backdoor`` or ``MetaBackdoor``).

    Returns
    -------
    float
        The attack success rate in ``[0, 1]``; ``nan`` if every example already has the
        target label (nothing to measure).
    """
    if isinstance(data, Task):
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
    else:
        x, y = data
    keep = y.reshape(-1) != backdoor.target
    if not bool(keep.any()):
        return float("nan")
    triggered = backdoor.apply_trigger(x[keep])
    with torch.no_grad():
        out: Any = predict(triggered)
    pred = out.argmax(-1) if out.dim() == 2 else out.reshape(-1)
    return float((pred == backdoor.target).to(torch.float64).mean())
