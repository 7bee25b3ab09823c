"""Task vectors: a small per-client summary of *what* its task is, used to weigh relevance.

Two sources (both available; ``"gradient"`` is the default):

* ``"gradient"`` (FedMosaic, Seo et al., ICLR 2026): the gradient of the task loss on the
  client's support data with respect to one chosen layer (by default the last) of a **frozen
  reference network** every client receives once, flattened and truncated to ``dim`` entries.
  It depends only on the client's data, not on the model being trained, so task vectors stay
  comparable across rounds, a held-out client computes one from its support set alone, and
  a change of task (a shift) shows at once.
* ``"projection"``: a public random Gaussian projection ``R u / sqrt(dim)`` of the client's
  update ``u`` (Johnson-Lindenstrauss: inner products are preserved in expectation).  Needs
  no reference network, but an update depends on the starting model, so vectors of clients
  that started from different personalized models are less comparable, and a held-out client
  must first compute an update on its support set.

Why ``"gradient"`` is the default: held-out personalization and shift detection need a vector
that is a function of the data alone.

Privacy options: Gaussian noise of standard deviation ``noise_std`` added to the vector after
L2 clipping to ``clip`` (declared, not accounted: the library does not compose it with the
privacy accountant), and round-to-round smoothing (exponential moving average with factor
``smoothing``: ``v_t = smoothing * v_{t-1} + (1 - smoothing) * fresh``), which averages the
noise out over rounds at the cost of reacting more slowly to a shift.  Defaults: no noise
(noise without accounting gives no guarantee to state) and smoothing 0.5 (FedMosaic smooths;
0.5 halves the weight of stale information each round the client participates).

A task vector travels through the protocol like an update (plaintext, or CKKS-encrypted so the
server only obtains the decrypted Gram): it is tens to a few thousand floats.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad

from securefml.data.base import Task
from securefml.errors import ConfigError, DataError
from securefml.meta.base import Params, task_loss

__all__ = ["TaskVectorConfig", "TaskVectorizer", "TaskVectorSmoother"]

log = logging.getLogger(__name__)

METHODS = ("gradient", "projection")


@dataclass(frozen=True)
class TaskVectorConfig:
    """How task vectors are computed.

    Attributes
    ----------
    method:
        ``"gradient"`` (default) or ``"projection"`` (see the module docstring).
    layer:
        Layer (module name) of the reference network whose gradient is taken; None = the last
        layer that owns parameters.
    dim:
        Length of the vector: the gradient is truncated to its first ``dim`` entries (0 = keep
        all), the projection has exactly ``dim`` rows.
    noise_std, clip:
        Gaussian noise added after clipping the vector to L2 norm ``clip`` (noise 0 = none).
    smoothing:
        EMA factor in [0, 1) across rounds (0 = use the fresh vector).
    seed:
        Public seed of the projection matrix (every party derives the same one).
    """

    method: str = "gradient"
    layer: str | None = None
    dim: int = 0
    noise_std: float = 0.0
    clip: float = 1.0
    smoothing: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"task vector method must be one of {METHODS}, got {self.method!r}")
        if self.dim < 0 or (self.method == "projection" and self.dim == 0):
            raise ConfigError(f"dim must be >= 0 (and > 0 for projection), got {self.dim}")
        if self.noise_std < 0 or not self.clip > 0:
            raise ConfigError(f"need noise_std >= 0 and clip > 0, got {self.noise_std}, {self.clip}")
        if not 0 <= self.smoothing < 1:
            raise ConfigError(f"smoothing must be in [0, 1), got {self.smoothing}")


class TaskVectorizer:
    """Computes a client's (fresh, unsmoothed) task vector.

    Parameters
    ----------
    model:
        The architecture of the reference network (its parameters are never modified).
    reference:
        The frozen reference parameters every client received (e.g. the initial global model).
    config:
        Method, layer, dimension, noise.
    update_numel:
        Length of flat updates (the projection's input size); needed for ``"projection"``.
    device:
        Where the reference network runs.
    """

    def __init__(
        self,
        model: nn.Module,
        reference: Params,
        config: TaskVectorConfig | None = None,
        *,
        update_numel: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config or TaskVectorConfig()
        self.model = model
        self.device = torch.device(device)
        self.reference = {n: p.detach().to(self.device) for n, p in reference.items()}
        layers = [n.rpartition(".")[0] for n in self.reference]
        self.layer = self.config.layer if self.config.layer is not None else layers[-1]
        self.names = tuple(n for n in self.reference if n.rpartition(".")[0] == self.layer)
        if not self.names:
            raise ConfigError(f"reference network has no layer {self.layer!r}; layers: {sorted(set(layers))}")
        self._projection: torch.Tensor | None = None
        if self.config.method == "projection":
            if update_numel is None or update_numel <= 0:
                raise ConfigError("the projection method needs update_numel (the flat update length)")
            gen = torch.Generator().manual_seed(int(self.config.seed))
            self._projection = torch.randn(self.config.dim, update_numel, generator=gen, dtype=torch.float32)
            self._projection = (self._projection / self.config.dim**0.5).to(self.device)

    @property
    def dim(self) -> int:
        if self.config.method == "projection":
            return self.config.dim
        full = sum(self.reference[n].numel() for n in self.names)
        return min(full, self.config.dim) if self.config.dim else full

    def __call__(
        self,
        task: Task,
        *,
        update: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The client's task vector (float32, ``dim`` entries) from its support data or update."""
        if self.config.method == "gradient":
            vec = self.gradient_vector(task)
        else:
            if update is None:
                raise ConfigError("the projection method needs the client's update")
            assert self._projection is not None
            if update.numel() != self._projection.shape[1]:
                raise ConfigError(
                    f"update has {update.numel()} entries, the projection expects {self._projection.shape[1]}"
                )
            vec = self._projection @ update.to(self.device, torch.float32).reshape(-1)
        return self.privatize(vec, generator=generator)

    def gradient_vector(self, task: Task) -> torch.Tensor:
        x, y = task.support_x.to(self.device), task.support_y.to(self.device)
        if x.shape[0] == 0:
            raise DataError(f"client {task.client_id} has no support data for a task vector")
        chosen = {n: self.reference[n] for n in self.names}
        rest = {n: p for n, p in self.reference.items() if n not in chosen}
        loss = task_loss(task.kind)

        def f(p: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return loss(functional_call(self.model, {**rest, **p}, (x,)), y)

        g = grad(f)(chosen)
        vec = torch.cat([g[n].reshape(-1) for n in self.names]).detach().to(torch.float32)
        return vec[: self.config.dim] if self.config.dim else vec

    def privatize(self, vec: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Clip to ``clip`` and add ``N(0, noise_std^2)`` per entry (when ``noise_std > 0``)."""
        if self.config.noise_std == 0:
            return vec
        norm = float(vec.norm())
        if norm > self.config.clip:
            vec = vec * (self.config.clip / norm)
        noise = torch.randn(vec.shape, generator=generator, dtype=torch.float32).to(vec.device)
        return vec + self.config.noise_std * noise


class TaskVectorSmoother:
    """Round-to-round EMA of each client's task vector (state kept per client id).

    ``smoothing = 0`` returns the fresh vector.  A client's first vector seeds its average.
    """

    def __init__(self, smoothing: float) -> None:
        if not 0 <= smoothing < 1:
            raise ConfigError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = float(smoothing)
        self._state: dict[int, torch.Tensor] = {}

    def __call__(self, client_id: int, fresh: torch.Tensor) -> torch.Tensor:
        prev = self._state.get(client_id)
        if prev is None or self.smoothing == 0 or prev.shape != fresh.shape:
            out = fresh.detach().clone()
        else:
            out = self.smoothing * prev + (1 - self.smoothing) * fresh.detach()
        self._state[client_id] = out
        return out

    def get(self, client_id: int) -> torch.Tensor | None:
        return self._state.get(client_id)

    def state_dict(self) -> dict[str, object]:
        return {"smoothing": self.smoothing, "vectors": {str(k): v.tolist() for k, v in self._state.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        vectors = state.get("vectors", {})
        assert isinstance(vectors, Mapping)
        self._state = {int(k): torch.tensor(v, dtype=torch.float32) for k, v in vectors.items()}
