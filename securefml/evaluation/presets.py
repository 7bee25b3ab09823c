"""The built-in evaluation matrices, as ``evaluate`` keyword arguments.

Two presets: the default matrix (Karimireddy, He & Jaggi's setting on ``digits-skew``: 25
label-sorted clients all participating, 5 of them Byzantine, plus the sanity attacks and backdoor
defenses) and ``quick`` (a smoke matrix of a few seconds per cell).  They live apart from the
command line so the library (``securefml.evaluation.evaluate``) and the CLI both read them without
importing each other.
"""

from __future__ import annotations

from typing import Any

from securefml.errors import ConfigError
from securefml.registry import parse_spec

__all__ = ["PRESETS", "preset", "evaluate_kwargs", "dataset_options"]

_KHJ_DATA = {"n_clients": 25, "n_heldout": 5, "classes_per_client": 2}

#: The two built-in matrices.  Keys are the parser's destinations.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "dataset": "digits-skew",
        "algorithm": "fedavg",
        "rounds": 30,
        "clients_per_round": 25,
        "inner_steps": 5,
        "inner_lr": 0.1,
        "server_opt": "adam",
        "server_lr": 0.02,
        "dataset_option": [f"{k}={v}" for k, v in _KHJ_DATA.items()],
        "attacks": ["none", "signflip:scale=10", "scaling:scale=100", "ipm:epsilon=0.1", "alie", "backdoor",
                    "meta-backdoor"],
        "defenses": ["mean", "cclip:tau=1", "geomed", "median", "krum:f=5", "bucketing:size=2>>median",
                     "bucketing:size=2>>krum:f=5", "normbound", "flame"],
        "protocols": ["plaintext"],
        "malicious": [0.2],
        "seeds": [0],
        "last_k": 5,
    },
    "quick": {
        "dataset": "digits-skew",
        "algorithm": "fedavg",
        "rounds": 10,
        "clients_per_round": 15,
        "inner_steps": 5,
        "inner_lr": 0.1,
        "server_opt": "adam",
        "server_lr": 0.02,
        "dataset_option": ["n_clients=15", "n_heldout=5", "classes_per_client=2"],
        "attacks": ["none", "signflip:scale=10", "ipm:epsilon=0.1", "backdoor"],
        "defenses": ["mean", "cclip:tau=1", "median", "krum:f=3"],
        "protocols": ["plaintext"],
        "malicious": [0.2],
        "seeds": [0],
        "last_k": 5,
    },
}


def dataset_options(items: list[str]) -> dict[str, Any]:
    return parse_spec("options:" + ",".join(items))[1] if items else {}


def evaluate_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    """``evaluate`` keyword arguments from resolved preset/flag values."""
    kwargs: dict[str, Any] = {k: opts[k] for k in ("attacks", "defenses", "protocols", "malicious", "seeds")}
    for key in ("dataset", "algorithm", "rounds", "clients_per_round", "inner_steps", "inner_lr", "outer_lr",
                "server_opt", "server_lr", "finetune_steps", "select", "device", "last_k"):
        if opts.get(key) is not None:
            kwargs[key] = opts[key]
    kwargs["dataset_options"] = dataset_options(opts.get("dataset_option") or [])
    return kwargs


def preset(name: str = "default") -> dict[str, Any]:
    """The ``evaluate`` keyword arguments of a built-in matrix (``"default"`` or ``"quick"``).

    >>> sorted(preset("quick")["defenses"])
    ['cclip:tau=1', 'krum:f=3', 'mean', 'median']
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown evaluation preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return evaluate_kwargs(dict(PRESETS[name]))
