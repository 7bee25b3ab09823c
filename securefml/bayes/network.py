"""A functional, stochastic forward pass of the bundled MLP with mean-field Gaussian layers.

The model must keep its layers in an ``nn.Sequential`` called ``layers`` (``securefml.models.MLP``):
``Linear`` modules and parameter-free activations.  Chosen ``Linear`` layers are Gaussian
(mean and log-variance per weight and bias); the others are deterministic (their means only).

A Gaussian layer samples its *pre-activations*, not its weights: with input ``h``, weight
means ``M``, variances ``V`` (bias ``b``, ``v``), the pre-activation of a mean-field layer is
Gaussian with mean ``h M^T + b`` and variance ``h^2 V^T + v``, so one draw ``eps ~ N(0, 1)``
per example and unit gives an exact sample at the cost of two matrix products (the local
reparameterization trick, Kingma, Salimans & Welling, NeurIPS 2015).  It has lower gradient
variance than sampling one weight matrix per batch, and each example gets independent noise.

Shapes: inputs ``[n, d]`` are expanded to ``[n, S, d]`` for ``S`` Monte Carlo samples, so a
forward hook on a module sees ``[n, S, features]`` (one row per stimulus, as Cedar's
representational-similarity probe expects).  Each ``Linear`` is called through
``torch.func.functional_call`` on its own module with the mean weights, so hooks fire.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from securefml.bayes.gaussian import clamp_logvar, logvar_name
from securefml.errors import ConfigError
from securefml.meta.base import Params

__all__ = ["StochasticMLP"]


class StochasticMLP:
    """The functional network over ``model.layers`` (never modifies ``model``).

    Parameters
    ----------
    model:
        A module with an ``nn.Sequential`` ``layers`` of ``Linear`` and parameter-free modules.
    bayesian:
        Names of the Gaussian ``Linear`` layers (``"layers.0"``...); ``None`` = every ``Linear``.
    """

    def __init__(self, model: nn.Module, bayesian: Sequence[str] | None = None) -> None:
        seq = getattr(model, "layers", None)
        if not isinstance(seq, nn.Sequential):
            raise ConfigError(f"Bayesian learners need a model with an nn.Sequential 'layers' (securefml.models.MLP), "
                              f"got {type(model).__name__}")
        self.steps: list[tuple[str, nn.Module]] = []
        linears = []
        for child, module in seq.named_children():
            name = f"layers.{child}"
            if isinstance(module, nn.Linear):
                if module.bias is None:
                    raise ConfigError(f"layer {name!r} has no bias; the Bayesian MLP expects Linear layers with bias")
                linears.append(name)
            elif any(True for _ in module.parameters()):
                raise ConfigError(f"layer {name!r} ({type(module).__name__}) has parameters but is not Linear")
            self.steps.append((name, module))
        if not linears:
            raise ConfigError("the model has no Linear layer")
        chosen = list(linears) if bayesian is None else list(bayesian)
        unknown = [n for n in chosen if n not in linears]
        if unknown or not chosen:
            raise ConfigError(f"Bayesian layers {unknown or chosen} are not Linear layers of the model; "
                              f"choose from {linears}")
        self.linear_layers: tuple[str, ...] = tuple(linears)
        self.bayesian_layers: tuple[str, ...] = tuple(n for n in linears if n in chosen)
        self.out_features = {n: int(m.out_features) for n, m in self.steps if isinstance(m, nn.Linear)}

    # -- parameter names ---------------------------------------------------------------------
    @property
    def mean_names(self) -> tuple[str, ...]:
        """Every weight and bias (means of the Gaussian layers, values of the others)."""
        return tuple(f"{n}.{p}" for n in self.linear_layers for p in ("weight", "bias"))

    @property
    def gaussian_names(self) -> tuple[str, ...]:
        """The weights and biases that carry a log-variance."""
        return tuple(f"{n}.{p}" for n in self.bayesian_layers for p in ("weight", "bias"))

    def posterior_names(self) -> tuple[str, ...]:
        return self.mean_names + tuple(logvar_name(n) for n in self.gaussian_names)

    # -- noise -----------------------------------------------------------------------------
    def draw_noise(self, n: int, samples: int, *, generator: torch.Generator, device: torch.device | str,
                   dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Standard normal pre-activation noise ``[n, samples, out]`` per Gaussian layer, in layer order.

        Drawn on the CPU from ``generator`` and moved to ``device``, so the same seed gives the
        same noise on every device.
        """
        if samples < 1:
            raise ConfigError(f"need at least one Monte Carlo sample, got {samples}")
        return [torch.randn(n, samples, self.out_features[name], generator=generator, dtype=dtype).to(device)
                for name in self.bayesian_layers]

    # -- forward ---------------------------------------------------------------------------
    @property
    def head(self) -> str:
        """The output layer (the last ``Linear``; ``ConfigError`` if a module follows it)."""
        if self.steps[-1][0] != self.linear_layers[-1]:
            raise ConfigError(f"the model's last layer {self.steps[-1][0]!r} is not Linear: no softmax head")
        return self.linear_layers[-1]

    def head_inputs(self, params: Params, x: torch.Tensor, noise: Sequence[torch.Tensor] | None) -> torch.Tensor:
        """The sampled inputs of the output layer ``[n, S, d]`` (``head_inputs_and_logits``'s first part)."""
        return self.head_inputs_and_logits(params, x, noise)[0]

    def logits(self, params: Params, x: torch.Tensor, noise: Sequence[torch.Tensor] | None) -> torch.Tensor:
        """Sampled logits ``[n, S, C]`` (``S`` from the noise; ``noise=None``: the mean network, ``S = 1``)."""
        return self.head_inputs_and_logits(params, x, noise)[1]

    def head_inputs_and_logits(self, params: Params, x: torch.Tensor,
                               noise: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One sampled forward pass: the output layer's inputs ``[n, S, d]`` and the logits ``[n, S, C]``.

        Both from the same samples, so the closed-form variance step (``BayesianLearner``) reads the
        features and the head's logits of one pass instead of re-deriving the head's local
        reparameterization.
        """
        head = self.linear_layers[-1]
        h = x.flatten(1)
        samples = 1 if noise is None else int(noise[0].shape[1])
        if noise is not None and len(noise) != len(self.bayesian_layers):
            raise ConfigError(f"noise for {len(noise)} layers, the network has {len(self.bayesian_layers)} Gaussian")
        h = h.unsqueeze(1).expand(h.shape[0], samples, h.shape[1])
        head_input = h
        k = 0
        for name, module in self.steps:
            if not isinstance(module, nn.Linear):
                h = module(h)
                continue
            if name == head:
                head_input = h
            w, b = params[f"{name}.weight"], params[f"{name}.bias"]
            mean = functional_call(module, {"weight": w, "bias": b}, (h,))
            if noise is not None and name in self.bayesian_layers:
                var_w = torch.exp(clamp_logvar(params[logvar_name(f"{name}.weight")]))
                var_b = torch.exp(clamp_logvar(params[logvar_name(f"{name}.bias")]))
                var = nn.functional.linear(h * h, var_w, var_b)  # > 0: the bias variance is
                h = mean + torch.sqrt(var) * noise[k]
                k += 1
            else:
                h = mean
        return head_input, h

    def log_predictive(self, params: Params, x: torch.Tensor, noise: Sequence[torch.Tensor] | None) -> torch.Tensor:
        """``log (1/S) sum_s softmax(logits_s)``: the Monte Carlo predictive's log-probabilities ``[n, C]``."""
        logp = torch.log_softmax(self.logits(params, x, noise), dim=-1)
        return torch.logsumexp(logp, dim=1) - torch.log(torch.tensor(float(logp.shape[1]), device=logp.device))
