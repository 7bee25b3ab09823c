"""What ``run_experiment`` needs for ``--aggregation relevance[:...]`` and ``--architectures``.

Kept here so the generic experiment module only dispatches:

* ``parse_relevance_spec("relevance:temperature=0.2,method=projection,dim=64")`` splits the
  options into a ``RelevanceConfig`` and a ``TaskVectorConfig``;
* ``build_relevance_server`` makes the ``RelevanceServer`` for a run;
* ``relevance_metrics`` scores held-out clients from their relevance (per client, per group);
* ``heterogeneous_metrics`` runs the Co-LoRA federation over the requested architectures.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from securefml.data.base import FederatedDataset
from securefml.data.clusters import ClusteredDataset, make_digits_clusters, parse_architectures
from securefml.defenses.base import Defense
from securefml.errors import ConfigError
from securefml.meta.base import MetaLearner
from securefml.protocols.base import AggregationProtocol
from securefml.protocols.ckks import CKKS
from securefml.registry import parse_spec
from securefml.relevance.aggregation import RelevanceAggregation, RelevanceConfig
from securefml.relevance.hetero import HeteroConfig, architecture_name, run_heterogeneous
from securefml.relevance.policy import RelevancePolicy
from securefml.relevance.server import RelevanceServer
from securefml.relevance.task_vectors import TaskVectorConfig, TaskVectorizer

__all__ = [
    "AGGREGATIONS",
    "parse_relevance_spec",
    "build_relevance_server",
    "relevance_metrics",
    "heterogeneous_metrics",
]

AGGREGATIONS = ("mean", "relevance")

#: Held-out fine-tuning rate of ``--architectures`` runs.  At the training rate (0.01) five Adam
#: steps on 20 support images overwrite what the federation learned (development seeds 10-13:
#: all shapes 0.798 against 0.875 at 0.001 and 0.878 without fine-tuning; ``docs/relevance.md``).
HETERO_FINETUNE_LR = 0.001


def parse_relevance_spec(spec: str) -> tuple[RelevanceConfig, TaskVectorConfig]:
    """``relevance[:k=v,...]`` -> the two configs; unknown keys raise ``ConfigError`` listing the valid ones."""
    name, opts = parse_spec(spec)
    if name != "relevance":
        raise ConfigError(f"unknown aggregation {name!r}; choose one of: {', '.join(AGGREGATIONS)}")
    rel_keys = {f.name for f in fields(RelevanceConfig)}
    tv_keys = {f.name for f in fields(TaskVectorConfig)}
    unknown = set(opts) - rel_keys - tv_keys
    if unknown:
        raise ConfigError(f"unknown relevance options {sorted(unknown)}; valid: {sorted(rel_keys | tv_keys)}")
    try:
        rel = RelevanceConfig(**{k: v for k, v in opts.items() if k in rel_keys})  # type: ignore[arg-type]
        tv = TaskVectorConfig(**{k: v for k, v in opts.items() if k in tv_keys})  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError(f"bad relevance options in {spec!r}: {exc}") from None
    return rel, tv


def build_relevance_server(
    spec: str, learner: MetaLearner, protocol: AggregationProtocol, defense: Defense, *, device: torch.device | str
) -> RelevanceServer:
    """The ``RelevanceServer`` of a run: the frozen reference network is the initial model.

    Under CKKS the run's key holder is replaced by one whose policy is a ``RelevancePolicy``
    (``min_effective`` from the spec), so it refuses concentrated per-client combinations itself.
    """
    rel, tv = parse_relevance_spec(spec)
    if isinstance(protocol, CKKS) and not isinstance(protocol.policy, RelevancePolicy):
        # the key holder must refuse concentrated per-client combinations itself: a relevance run
        # under CKKS gets a key holder with a RelevancePolicy (same preset and contributor minimum)
        protocol = CKKS(preset=protocol.preset, policy=RelevancePolicy(
            min_contributors=protocol.min_contributors, min_effective=rel.min_effective))
    step = RelevanceAggregation(rel, protocol=protocol)
    init = learner.init_params(device)
    numel = sum(p.numel() for p in init.values())
    vectorizer = TaskVectorizer(learner.model, learner.model_params(init), tv, update_numel=numel, device=device)
    return RelevanceServer(learner, protocol, defense, relevance=step, vectorizer=vectorizer, device=device)


def _groups(data: FederatedDataset) -> dict[int, int] | None:
    if isinstance(data, ClusteredDataset) and data.heldout_groups:
        return {t.client_id: g for t, g in zip(data.heldout, data.heldout_groups)}
    return None


def relevance_metrics(server: RelevanceServer, data: FederatedDataset, *, steps: int) -> dict[str, Any]:
    """Held-out clients personalized from their relevance: mean, per client, per group."""
    if not data.heldout:
        return {}
    scores = server.personalize_new(data.heldout, steps=steps)
    out: dict[str, Any] = {
        "accuracy" if data.kind == "classification" else "mse": scores.mean,
        "per_client": {str(c): s for c, s in zip(scores.client_ids, scores.scores)},
        "steps": steps,
    }
    groups = _groups(data)
    if groups is not None:
        out["per_group"] = {str(g): v for g, v in scores.by_group(groups).items()}
    return out


def per_group(data: FederatedDataset, per_client: tuple[float, ...]) -> dict[str, float] | None:
    """Mean held-out score per true group (``digits-clusters``), else None."""
    groups = _groups(data)
    if groups is None:
        return None
    acc: dict[int, list[float]] = {}
    for t, s in zip(data.heldout, per_client):
        acc.setdefault(groups[t.client_id], []).append(s)
    return {str(g): sum(v) / len(v) for g, v in sorted(acc.items())}


def heterogeneous_metrics(
    data: FederatedDataset, architectures: str, *, rounds: int, clients_per_round: int, local_steps: int, lr: float,
    finetune_steps: int, seed: int, dataset_options: dict[str, Any], device: torch.device | str = "cpu",
    optimizer: str = "adam", adapter_lr: float | None = None,
) -> dict[str, Any]:
    """Co-LoRA federation over ``architectures`` (P, Q shared) and, for reference, each group alone.

    ``lr`` is the run's inner learning rate; the adapters use it only with ``optimizer="sgd"``.
    With the default Adam they train at ``adapter_lr`` (default ``HeteroConfig``'s 0.01): the
    run's SGD rate (0.3 for FedAvg) makes adapters diverge (``HeteroConfig``).  The rate and
    optimizer used are recorded in the result.
    """
    shapes = parse_architectures(architectures)
    if not isinstance(data, ClusteredDataset) or not data.architectures:
        if data.name != "digits-clusters":
            raise ConfigError("--architectures needs the digits-clusters dataset (its heterogeneous variant)")
        opts = {k: v for k, v in dataset_options.items() if k != "architectures"}
        data = make_digits_clusters(seed=seed, architectures=shapes, **opts)
    assert isinstance(data, ClusteredDataset)
    used_lr = lr if optimizer == "sgd" else (adapter_lr if adapter_lr is not None else HeteroConfig.lr)
    out: dict[str, Any] = {"architectures": [architecture_name(s) for s in shapes], "optimizer": optimizer,
                           "adapter_lr": used_lr, "finetune_lr": HETERO_FINETUNE_LR}
    for label, share in (("shared", True), ("alone", False)):
        cfg = HeteroConfig(rounds=rounds, clients_per_round=clients_per_round, local_steps=local_steps, lr=used_lr,
                           finetune_steps=finetune_steps, finetune_lr=HETERO_FINETUNE_LR, share=share,
                           seed=seed, optimizer=optimizer)
        res = run_heterogeneous(data, cfg, device=device)
        out[label] = {"accuracy": res.mean, "per_architecture": res.per_architecture,
                      "per_client": {str(c): v for c, v in res.per_client.items()}}
    out["clients_per_architecture"] = {
        architecture_name(s): sum(1 for a in data.architectures if a == s) for s in shapes
    }
    return out
