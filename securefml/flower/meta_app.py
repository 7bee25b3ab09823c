"""A ready meta-learning ClientApp: securefml's learners on Flower, personalization in evaluate.

Each SuperNode is one client of a securefml dataset (its ``partition-id`` picks the task: the
training clients first, then the held-out ones).  On ``train`` it runs the learner's client
step (FedAvg, MAML, FOMAML, Meta-SGD, Reptile, or any registered learner) from the global model
it received and returns the update to ``securefml_mod``, which runs the protocol's client half
on it.  On ``evaluate`` a held-out node fine-tunes the global model on its support set
(``securefml.personalize``) and reports query accuracy (or MSE) personalized and without
fine-tuning, and its calibration metrics.  Out-of-task AUROC needs other clients' inputs, which
one node does not have: it is reported as ``None`` on Flower.

Malicious nodes (``MetaAppConfig.malicious``) poison their own task once (data attacks) and
their own update every round (model attacks), each on its own: on Flower a colluding attack
sees a group of one (its ``AttackContext`` has ``n_malicious=1`` and no honest updates).

The dataset is generated from the run's seed on every node (the bundled datasets load offline);
a real deployment would read each node's own data instead (``docs/flower.md``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from securefml.attacks import Attack, make_attack
from securefml.attacks.base import AttackContext
from securefml.data import load_dataset
from securefml.data.base import FederatedDataset, Task
from securefml.errors import ConfigError, MalformedMessageError
from securefml.flower.client import ClientHalves, ServiceHost, UploadPolicy, add_hello, securefml_mod
from securefml.flower.records import GLOBAL_KEY, METRICS_KEY, ROUND_KEY, UPDATE_KEY, read_vector, write_vector
from securefml.meta import MetaConfig
from securefml.meta.base import MetaLearner
from securefml.models import make_model
from securefml.personalize import CALIBRATION_METRICS, personalize
from securefml.rounds import check_finite
from securefml.updates import Role

__all__ = ["MetaAppConfig", "MetaNode", "meta_client_app"]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class MetaAppConfig:
    """What every node of a meta-learning run shares (all public).

    Attributes
    ----------
    dataset, dataset_options, seed:
        The securefml dataset the nodes' tasks come from.
    algorithm:
        Learner name (``securefml.bayes.LEARNERS``).
    inner_steps, inner_lr, outer_lr, outer_steps:
        The learner's ``MetaConfig``.
    finetune_steps:
        Personalization steps in the evaluate round.
    hidden:
        MLP hidden widths (None: the dataset's default).
    attack, malicious:
        Attack spec and the client ids it controls.
    device:
        Torch device of the node's training.
    """

    dataset: str = "digits-fewshot"
    dataset_options: tuple[tuple[str, Any], ...] = ()
    seed: int = 0
    algorithm: str = "fomaml"
    inner_steps: int = 5
    inner_lr: float = 0.1
    outer_lr: float = 1.0
    outer_steps: int = 1
    finetune_steps: int = 5
    hidden: tuple[int, ...] | None = None
    attack: str = "none"
    malicious: tuple[int, ...] = field(default_factory=tuple)
    device: str = "cpu"


class MetaNode:
    """One node's learner and task, built once per process from ``MetaAppConfig``."""

    def __init__(self, config: MetaAppConfig, attack: Attack | None = None) -> None:
        from securefml.bayes import LEARNERS  # the learner registry, with the Bayesian learners added

        self.config = config
        self.device = torch.device(config.device)
        self.data: FederatedDataset = load_dataset(config.dataset, seed=config.seed, **dict(config.dataset_options))
        net = make_model(self.data, hidden=config.hidden, seed=config.seed, device=self.device)
        meta = MetaConfig(config.inner_steps, config.inner_lr, config.outer_lr, config.outer_steps)
        self.learner: MetaLearner = LEARNERS.create(config.algorithm, model=net, config=meta)
        self.layout = self.learner.layout(self.device)  # with the learner's declared roles
        self.attack = attack if attack is not None else (
            make_attack(config.attack) if config.attack != "none" and config.malicious else None)
        self._poisoned: dict[int, Task] = {}

    def task(self, partition: int) -> Task:
        """The task of partition ``partition``: training clients first, then held-out ones."""
        n = len(self.data.train)
        if 0 <= partition < n:
            task = self.data.train[partition]
        elif n <= partition < n + len(self.data.heldout):
            return self.data.heldout[partition - n]
        else:
            raise ConfigError(f"partition-id {partition} is outside the dataset's "
                              f"{n + len(self.data.heldout)} clients")
        if self.attack is not None and task.client_id in self.config.malicious:
            if task.client_id not in self._poisoned:
                gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + task.client_id)
                self._poisoned[task.client_id] = self.attack.poison_task(task, generator=gen)
            return self._poisoned[task.client_id]
        return task

    def client_id(self, partition: int) -> int:
        return self.task(partition).client_id

    def train(self, partition: int, global_vector: torch.Tensor, round_idx: int, cohort_size: int) -> tuple[
            torch.Tensor, float, dict[str, float]]:
        """This node's flat update from ``global_vector`` (poisoned when the node is malicious)."""
        task = self.task(partition).to(self.device)
        params = self.layout.unflatten(global_vector.to(self.device))
        update, metrics = self.learner.update(params, task)
        flat = self.layout.flatten(update).detach()
        check_finite(flat, task.client_id)
        if self.attack is not None and task.client_id in self.config.malicious:
            gen = torch.Generator().manual_seed((self.config.seed * 1_000_003 + task.client_id) * 7919 + round_idx)
            ctx = AttackContext(round=round_idx, n_clients=cohort_size, n_malicious=1, generator=gen,
                                layout=self.layout, global_vector=global_vector,
                                lr_mask=self.layout.mask(self.layout.layers_with_role(Role.LEARNED_RATE)))
            flat = self.attack.poison_updates(flat[None], ctx)[0].to(flat.dtype)
        return flat.cpu(), float(task.support_x.shape[0]), {k: float(v) for k, v in metrics.items()}

    def evaluate(self, partition: int, global_vector: torch.Tensor) -> dict[str, float]:
        """Personalized and global scores of this (held-out) node's task."""
        task = self.task(partition)
        params = self.layout.unflatten(global_vector.to(self.device))
        pers = personalize(self.learner, params, [task], steps=self.config.finetune_steps, device=self.device)
        glob = personalize(self.learner, params, [task], steps=0, device=self.device)
        out = {"num_examples": 1.0, "personalized": pers.mean, "global": glob.mean}
        for prefix, rep in (("personalized", pers), ("global", glob)):
            if rep.calibration is not None:
                for name in CALIBRATION_METRICS:
                    value = rep.calibration.mean(name)
                    if value is not None and math.isfinite(value):
                        out[f"{prefix}.{name}"] = float(value)
        return out


_NODES: dict[MetaAppConfig, MetaNode] = {}


def _node(config: MetaAppConfig, attack: Attack | None) -> MetaNode:
    if config not in _NODES:
        _NODES[config] = MetaNode(config, attack)
    return _NODES[config]


def meta_client_app(
    config: MetaAppConfig,
    protocol: ClientHalves,
    *,
    attack: Attack | None = None,
    policy: UploadPolicy | None = None,
    partition: Callable[[Context], int] | None = None,
    services: ServiceHost | None = None,
) -> ClientApp:
    """The meta-learning ClientApp, wrapped in ``securefml_mod`` for ``protocol``.

    Parameters
    ----------
    config:
        The run's public settings (``MetaAppConfig``).
    protocol:
        The protocol the strategy drives (the same object or an equal one).
    attack:
        An attack instance for the malicious nodes (instead of ``config.attack``).
    policy:
        Layer selection, update hook and shared metrics (default: share ``train_loss``).
    partition:
        The node's partition id from its context (default: ``node_config["partition-id"]``).
    services:
        The protocol's service parties a node may host (``CKKSDeployment``: the key-holder node
        answers as the key holder and never trains).
    """
    part = partition or (lambda ctx: int(ctx.node_config["partition-id"]))
    def client_id(ctx: Context) -> int:
        return _node(config, attack).client_id(part(ctx))

    layout = _node(config, attack).layout
    pol = policy or UploadPolicy(share_metrics=("train_loss", "loss"))
    app = ClientApp(mods=[securefml_mod(protocol, layout, client_id=client_id, policy=pol, services=services)])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        node = _node(config, attack)
        vec = read_vector(msg.content, GLOBAL_KEY, length=node.layout.numel)
        facts = msg.content.config_records.get(ROUND_KEY)
        cohort = facts.get("cohort_size", 1) if facts is not None else 1
        round_idx = facts.get("round", 0) if facts is not None else 0
        if not (isinstance(cohort, int) and isinstance(round_idx, int)):
            raise MalformedMessageError("the round facts must be integers", sender=None)
        flat, weight, metrics = node.train(part(ctx), vec, round_idx, cohort)  # non-finite: an error reply
        content = write_vector(RecordDict(), UPDATE_KEY, flat)
        loss = next((v for k, v in metrics.items() if k.endswith("loss")), float("nan"))
        content[METRICS_KEY] = MetricRecord({"num_examples": weight, "train_loss": loss})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, ctx: Context) -> Message:
        node = _node(config, attack)
        vec = read_vector(msg.content, GLOBAL_KEY, length=node.layout.numel)
        scores: dict[str, int | float | list[int] | list[float]] = dict(node.evaluate(part(ctx), vec))
        return Message(RecordDict({METRICS_KEY: MetricRecord(scores)}), reply_to=msg)

    return add_hello(app, client_id=client_id, services=services)
