"""A heterogeneous-architecture federation with Co-LoRA adapters (``--architectures 32,64,64x64``).

Each client runs a ``CoLoRAMLP`` of its own shape on a frozen backbone (the base linear
layers; FedMosaic adapts frozen pre-trained models, here a seeded random one per shape) and
trains the adapters (``A``, ``B``, ``P``, ``Q``).  Each round the cohort uploads its adapters;
``aggregate_heterogeneous`` averages ``A``/``B`` within each architecture group and ``P``/``Q``
across every client that has the matched block (``share=True``), or within the group only
(``share=False``: each architecture group trained alone).  Held-out clients of each
architecture fine-tune the result on their support set and are scored on their query set.

Held-out evaluation: each held-out client starts from its architecture's aggregate, fine-tunes
``finetune_steps`` on its support set (at ``finetune_lr``, default the training rates) and is
scored on its query set.  ``run_heterogeneous_budgets`` scores several such budgets after one
training.  On the bundled benchmark every client has the same task, so the aggregate already is
the right model for a held-out client; fine-tuning it on 2 images per class at the training
rate overwrites part of it (``docs/relevance.md``, "The held-out fine-tuning was the limit").

Options for the smallest group (``docs/relevance.md``, "Two methods tried"): ``pretrain``
pre-trains the frozen backbones on the training clients' pooled images before the federation
(``securefml.relevance.pretrain``); ``relevance`` gives every client its own relevance-weighted
aggregate (P, Q across architectures, A, B within), for data whose tasks conflict
(``securefml.relevance.hetero_relevance``); with it, ``support_choice`` lets every client pick
its mix of the cross- and own-architecture shared part on a split of its own support set
(``securefml.relevance.support_choice``; on the development seeds it met neither target and is
not the default).

The plain (``relevance=False``) aggregation here is plaintext: the shared and the architecture
parts are two weighted means, so under a secure protocol each is one secure sum (over all
clients, and per group).  The relevance-weighted one runs under CKKS with
``protocol="ckks"`` (``securefml.relevance.hetero_secure``: the task vectors' Gram and every
per-client combination decrypted by a key holder that enforces ``RelevancePolicy``), or as its
plaintext twin with ``protocol="policy"``; under SecAgg+ grouping with ``protocol="secagg"``
(``securefml.relevance.hetero_grouped``: relevance groups, each part securely summed over the
group's members that hold it), or as its plaintext twin with ``protocol="groups"``.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from securefml.data.base import Task
from securefml.data.clusters import ClusteredDataset
from securefml.errors import ConfigError, InvalidUpdateError
from securefml.relevance.colora import (
    MATCH_RULES,
    CoLoRAMLP,
    HeteroUpload,
    aggregate_heterogeneous,
    architecture_state,
    check_upload,
    is_shared,
    load_shared,
    shared_state,
)
from securefml.relevance.hetero_grouped import DEFAULT_CLIP, DEFAULT_MIN_LINK, GROUPED_MODES, GroupedHeteroRelevance
from securefml.relevance.hetero_relevance import relevance_aggregate_heterogeneous
from securefml.relevance.hetero_secure import SECURE_MODES, SecureHeteroRelevance
from securefml.relevance.policy import RelevancePolicy
from securefml.relevance.pretrain import PretrainConfig, pretrain_backbones
from securefml.relevance.support_choice import check_grid, choose_shared, support_split_loss
from securefml.relevance.task_vectors import TaskVectorizer
from securefml.relevance.weights import cosine_similarity, cross_cosine, cross_weights, relevance_weights

__all__ = ["HeteroConfig", "HeteroResult", "run_heterogeneous", "run_heterogeneous_budgets", "architecture_name"]

log = logging.getLogger(__name__)


def architecture_name(hidden: Sequence[int]) -> str:
    """``(64, 64) -> "64x64"`` (the CLI spelling)."""
    return "x".join(str(int(h)) for h in hidden)


@dataclass(frozen=True)
class HeteroConfig:
    """Knobs of a heterogeneous Co-LoRA run (see the module docstring).

    Attributes
    ----------
    rounds, clients_per_round, local_steps, finetune_steps:
        Federation budget; held-out clients fine-tune ``finetune_steps`` on their support set.
    lr, optimizer:
        Local optimizer of the adapters: ``"adam"`` (default, a fresh state every round) at
        ``lr`` = 0.01, or ``"sgd"``.  Plain SGD at 0.3 (the earlier default) diverged: a
        client's adapter reached NaN around round 20 and, averaged into the shared P and Q,
        turned every architecture to NaN (accuracy 0.10, the collapse in ``docs/relevance.md``).
    shared_lr:
        Rate of the shared part (P, Q) when it should differ from ``lr`` (None: ``lr``).
    a_lr:
        Rate of every adapter's ``A`` when it should differ from ``lr`` (None: ``lr``).  Adam's
        steps do not scale with a parameter: at 0.01 an entry of ``A`` (initial scale
        ``1/sqrt(fan_in)``, 0.125 for 64 inputs) moves by up to 8 % of its scale per step, an
        entry of ``P`` (scale 1) by 1 %, so ``A``'s directions, and with them what the shared
        ``P``, ``Q`` mean, drift apart group by group much faster than ``P``, ``Q`` learn.
    finetune_lr:
        Rate of every adapter parameter while a held-out client fine-tunes on its support set
        (None: the training rates).  A held-out client has 2 images per class, a training client
        uses 5; Adam's first steps move every entry by about the rate whatever the gradient, so
        at the training rate 0.01 five steps move each entry of ``A`` (scale 0.125) by up to 40 %
        of its scale on 20 images, and the model the federation built is partly overwritten.
    rank, alpha:
        Adapter rank r and LoRA scaling numerator (``s = alpha / r``; default ``alpha = r``).
    share:
        Average P, Q across architectures (True) or within each architecture group (False).
    family:
        Initialise every shape as one member of a family (``CoLoRAMLP(family_seed=seed)``): nested
        seeded backbones and ``A``, so the r-dimensional adapter spaces agree across shapes.
    freeze_backbone:
        Train only the adapters (FedMosaic adapts frozen models).
    freeze_A:
        Keep every adapter's ``A`` at its (family) initialisation: the r input directions
        then stay identical across architectures where their shapes overlap, so a shared
        ``P``, ``Q`` keeps meaning the same map in every architecture (a trained ``A`` drifts
        apart group by group).  ``B``, ``P``, ``Q`` still train.
    shared_per_architecture:
        Average the shared part with every architecture counting the same
        (``aggregate_heterogeneous(per_architecture=True)``) instead of every client.
    match:
        Depth-matching rule of the blocks (``block_keys``): ``"ends"`` (output blocks of every
        depth share one ``P``, ``Q``) or ``"depth"`` (output blocks share only with networks of
        the same depth).
    pretrain, pretrain_steps, pretrain_lr:
        Pre-train the frozen backbones before the federation starts (``securefml.relevance.pretrain``):
        ``"none"`` (default: the seeded family backbones), ``"family"`` (one weight-sharing
        super-network, the shapes stay nested) or ``"independent"`` (each shape on its own).
        The pre-training set is the training clients' pooled support and query images (held-out
        clients' images come from a disjoint pool); the shared and the alone runs get the same
        backbones.  Adam at ``pretrain_lr`` for ``pretrain_steps`` minibatches of 256.
    relevance, temperature:
        Personalized aggregation by task relevance (FedMosaic's RELA with Co-LoRA,
        ``securefml.relevance.hetero_relevance``): every client keeps its own adapters; each
        round a cohort client's shared part is the relevance-weighted mean over the cohort
        (every architecture with ``share``, its own otherwise) and its architecture part the
        relevance-weighted mean within its architecture.  Weights: ``softmax(sim / temperature)``
        of the cosine similarities of task vectors (self included), the task vector being the
        gradient of a frozen seeded reference MLP's last layer on the client's support set.  A
        held-out client is given the same mix of the training clients' personalized adapters,
        weighted by its own task vector.  For data whose tasks conflict (``groups > 1``).
    own_evidence:
        Evidence-gated sharing with ``relevance`` and ``share`` (``hetero_relevance``): a client
        whose relevance row has ``own_evidence`` or more effective contributors in its own
        architecture keeps that architecture's shared part, one with a single one (itself) takes
        the cross-architecture part, linearly in between.  None (default): every client takes
        the cross-architecture part.  Held-out clients follow the same rule on their row.
    support_choice, choice_steps, choice_lr:
        Support-split choice with ``relevance`` and ``share`` (``securefml.relevance.support_choice``):
        a grid of mixing weights ``lam`` (e.g. ``(0.0, 0.5, 1.0)``); after every aggregation each
        cohort client, and each held-out client before it fine-tunes, takes
        ``lam * cross + (1 - lam) * own`` (the relevance-weighted shared part over every
        architecture, and over its own) for the ``lam`` whose leave-one-shot-out score on its own
        support set is lowest (adapted ``choice_steps`` Adam steps at ``choice_lr``, scored by
        cross-entropy on the held-out shot).  None (default): every client takes the cross part.
        ``share=False`` ignores it (both candidates are the own-architecture part).
    protocol, min_effective:
        How the relevance-weighted combinations are computed (``relevance`` only):
        ``"plaintext"`` (default, no policy), ``"ckks"`` (``hetero_secure``: the task vectors'
        Gram and every per-client combination decrypted by a CKKS key holder whose
        ``RelevancePolicy(min_effective)`` refuses concentrated rows; a refused training row
        keeps the client's own tensors, a held-out one is tempered or starts from the public
        initialisation) or ``"policy"`` (the same rows and policy in plaintext: the reference
        CKKS is compared with); ``"secagg"`` (``hetero_grouped``: the cohort grouped by
        task-vector cosines, every part securely summed with SecAgg+ over the group's members
        that hold it, each member given its group's mean; a set below ``group_size`` is not
        summed and its members keep their own tensors) or ``"groups"`` (the same groups and
        sets, plain sums: the reference SecAgg+ is compared with).
    min_group_size, group_min_link, secagg_clip:
        ``"secagg"`` / ``"groups"``: the smallest summed set (None: ``ceil(min_effective) + 1``,
        3 by default, as ``RelevanceConfig.group_size``), the grouping's average-cosine threshold
        (default 0.45, ``hetero_grouped``: chosen on development seeds for these task vectors;
        the homogeneous SecAgg+ path's 0.25 merged two tasks on one seed) and SecAgg+'s clip
        range of an entry.
    heldout_pool:
        ``"secagg"`` / ``"groups"``: a held-out client whose joined group has fewer than
        ``group_size`` clients of its shape (or of a ``mid<k>`` block) takes the mean over the
        pooled small sets of every group (``hetero_grouped``) instead of the public seeded
        initialisation (default False).
    seed:
        Cohort sampling and initialisation.
    """

    rounds: int = 30
    clients_per_round: int = 16
    local_steps: int = 10
    lr: float = 0.01
    finetune_steps: int = 5
    rank: int = 8
    share: bool = True
    seed: int = 0
    family: bool = True
    freeze_backbone: bool = True
    optimizer: str = "adam"
    alpha: float | None = None
    shared_lr: float | None = None
    a_lr: float | None = None
    finetune_lr: float | None = None
    freeze_A: bool = False
    shared_per_architecture: bool = False
    match: str = "ends"
    pretrain: str = "none"
    pretrain_steps: int = 300
    pretrain_lr: float = 0.01
    relevance: bool = False
    temperature: float = 0.2
    own_evidence: float | None = None
    protocol: str = "plaintext"
    min_effective: float = 2.0
    min_group_size: int | None = None
    group_min_link: float | None = DEFAULT_MIN_LINK
    secagg_clip: float = DEFAULT_CLIP
    heldout_pool: bool = False
    support_choice: tuple[float, ...] | None = None
    choice_steps: int = 5
    choice_lr: float = 0.001

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.clients_per_round < 1 or self.local_steps < 0 or self.finetune_steps < 0:
            raise ConfigError("rounds and clients_per_round must be >= 1, step counts >= 0")
        if not self.lr > 0 or self.rank < 1:
            raise ConfigError(f"need lr > 0 and rank >= 1, got {self.lr}, {self.rank}")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.shared_lr is not None and not self.shared_lr > 0:
            raise ConfigError(f"shared_lr must be positive, got {self.shared_lr}")
        if self.finetune_lr is not None and not self.finetune_lr > 0:
            raise ConfigError(f"finetune_lr must be positive, got {self.finetune_lr}")
        if self.a_lr is not None and not self.a_lr > 0:
            raise ConfigError(f"a_lr must be positive, got {self.a_lr}")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"alpha must be positive, got {self.alpha}")
        if self.match not in MATCH_RULES:
            raise ConfigError(f"match must be one of {MATCH_RULES}, got {self.match!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if self.own_evidence is not None and not self.own_evidence > 1:
            raise ConfigError(f"own_evidence must be > 1 (effective same-architecture contributors), "
                              f"got {self.own_evidence}")
        if self.protocol not in ("plaintext", *SECURE_MODES, *GROUPED_MODES):
            raise ConfigError(f"protocol must be one of {('plaintext', *SECURE_MODES, *GROUPED_MODES)}, "
                              f"got {self.protocol!r}")
        if self.protocol != "plaintext" and not self.relevance:
            raise ConfigError(f"protocol {self.protocol!r} applies to the relevance-weighted aggregation "
                              "(relevance=True)")
        if self.min_group_size is not None and self.min_group_size < 2:
            raise ConfigError(f"min_group_size must be >= 2 (a secure sum needs 2 clients), got {self.min_group_size}")
        if self.group_min_link is not None and not -1.0 <= self.group_min_link <= 1.0:
            raise ConfigError(f"group_min_link is a cosine in [-1, 1], got {self.group_min_link}")
        if self.heldout_pool and self.protocol not in GROUPED_MODES:
            raise ConfigError(f"heldout_pool applies to the grouped protocols {GROUPED_MODES}, not {self.protocol!r}")
        if not (math.isfinite(self.secagg_clip) and self.secagg_clip > 0):
            raise ConfigError(f"secagg_clip must be positive and finite, got {self.secagg_clip}")
        if not self.min_effective >= 1:
            raise ConfigError(f"min_effective must be >= 1, got {self.min_effective}")
        if self.support_choice is not None:
            check_grid(self.support_choice)
            if not self.relevance or self.protocol != "plaintext" or self.own_evidence is not None:
                raise ConfigError("support_choice applies to the plaintext relevance-weighted aggregation "
                                  "(relevance=True, protocol='plaintext', own_evidence None)")
        if self.choice_steps < 0 or not self.choice_lr > 0:
            raise ConfigError(f"choice_steps must be >= 0 and choice_lr positive, got {self.choice_steps}, "
                              f"{self.choice_lr}")
        self.pretrain_config()  # validates pretrain, pretrain_steps, pretrain_lr

    @property
    def group_size(self) -> int:
        """Smallest summed set under ``"secagg"`` / ``"groups"``."""
        return self.min_group_size if self.min_group_size is not None else int(math.ceil(self.min_effective)) + 1

    def pretrain_config(self) -> PretrainConfig:
        """The backbone pre-training this config asks for (``mode="none"``: none)."""
        return PretrainConfig(mode=self.pretrain, steps=self.pretrain_steps, lr=self.pretrain_lr, seed=self.seed)


@dataclass(frozen=True)
class HeteroResult:
    """Held-out accuracy per client and per architecture.

    ``refused_rows``: (client, family) combinations not applied over the run (CKKS / policy:
    rows refused; secagg / groups: sets below the minimum size, whose members kept their own
    tensors).  ``error_bound``: secagg, the largest per-entry decoding bound of a summed mean.
    """

    per_client: dict[int, float]
    per_architecture: dict[str, float]
    architecture_of: dict[int, str]
    refused_rows: int = 0
    bytes_uploaded: int = 0
    chosen_lambda: dict[int, float] = field(default_factory=dict)
    training_choices: dict[float, int] = field(default_factory=dict)
    error_bound: float = 0.0

    @property
    def mean(self) -> float:
        return statistics.fmean(self.per_client.values()) if self.per_client else float("nan")


def run_heterogeneous(data: ClusteredDataset, config: HeteroConfig, *, device: torch.device | str = "cpu"
                      ) -> HeteroResult:
    """Train the Co-LoRA federation of ``data.architectures`` and score the held-out clients."""
    res = run_heterogeneous_budgets(data, config, (config.finetune_steps,), device=device)
    return next(iter(res.values()))


#: a held-out fine-tuning budget: steps, or (steps, rate)
Budget = int | tuple[int, float]


def run_heterogeneous_budgets(data: ClusteredDataset, config: HeteroConfig, budgets: Sequence[Budget], *,
                              device: torch.device | str = "cpu") -> dict[tuple[int, float], HeteroResult]:
    """Train once, then score the held-out clients after each fine-tuning budget.

    A budget is ``steps`` (at the config's fine-tuning rate) or ``(steps, rate)``; the result
    is keyed by ``(steps, rate)``.  Every budget starts from the same trained federation (each
    held-out client reloads its architecture's aggregate and a fresh optimizer), so
    ``result[(k, r)]`` equals what ``run_heterogeneous`` returns with ``finetune_steps=k,
    finetune_lr=r``; comparing budgets costs one training instead of one per budget.
    """
    default_lr = config.finetune_lr if config.finetune_lr is not None else config.lr
    keys = sorted({(int(b), default_lr) if isinstance(b, int) else (int(b[0]), float(b[1])) for b in budgets})
    if not keys or any(k < 0 or not r > 0 for k, r in keys):
        raise ConfigError(f"finetune_steps must be non-negative step counts and rates positive, got {list(budgets)}")
    if not data.architectures or len(data.heldout_architectures) != len(data.heldout):
        raise ConfigError("the dataset has no per-client architectures (use its heterogeneous variant)")
    dev = torch.device(device)
    shapes = sorted(set(data.architectures) | set(data.heldout_architectures))
    in_features = int(torch.tensor(data.input_shape).prod())
    classes = int(data.n_classes or 0)
    models: dict[str, CoLoRAMLP] = {}
    for s in shapes:
        torch.manual_seed(config.seed)
        m = CoLoRAMLP(in_features, s, classes, rank=config.rank, alpha=config.alpha,
                      generator=torch.Generator().manual_seed(config.seed),
                      family_seed=config.seed if config.family else None, match=config.match).to(dev)
        for name, p in m.named_parameters():
            if ".base." in name and config.freeze_backbone:  # the frozen backbone
                p.requires_grad_(False)
            if name.endswith(".lora_A") and config.freeze_A:
                p.requires_grad_(False)
        models[architecture_name(s)] = m
    if config.pretrain != "none":
        if config.pretrain == "family" and not config.family:
            raise ConfigError("pretrain='family' needs family=True (nested initialisation)")
        px = torch.cat([torch.cat([t.support_x, t.query_x]) for t in data.train])
        py = torch.cat([torch.cat([t.support_y, t.query_y]) for t in data.train])
        losses = pretrain_backbones(models, px, py, config.pretrain_config())
        log.info("hetero: %s pre-training on %d pooled training images, losses %s", config.pretrain, len(py), losses)
    state = {a: (shared_state(m), architecture_state(m)) for a, m in models.items()}
    arch_of = {t.client_id: architecture_name(s) for t, s in zip(data.train, data.architectures)}

    own: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}  # relevance: per client
    vectors: dict[int, torch.Tensor] = {}
    if config.relevance:
        vectors = _task_vectors(data, in_features, classes, config.seed, dev)
    secure: SecureHeteroRelevance | None = None
    grouped: GroupedHeteroRelevance | None = None
    refused_rows = bytes_uploaded = 0
    error_bound = 0.0
    learned = {n for m in models.values() for n, p in m.named_parameters() if p.requires_grad}
    if config.protocol in GROUPED_MODES:
        grouped = GroupedHeteroRelevance(mode=config.protocol, min_size=config.group_size,
                                         min_link=config.group_min_link, trainable=learned.__contains__,
                                         clip=config.secagg_clip, heldout_pool=config.heldout_pool)
    elif config.protocol != "plaintext":
        secure = SecureHeteroRelevance(RelevancePolicy(min_effective=config.min_effective), mode=config.protocol,
                                       temperature=config.temperature, share=config.share,
                                       own_evidence=config.own_evidence, trainable=learned.__contains__)
        parties = [t.client_id for t in (*data.train, *data.heldout)]
        secure.register(0, parties, torch.stack([vectors[c] for c in parties]))  # task vectors are fixed

    def start(a: str, cid: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return own.get(cid, state[a]) if config.relevance else state[a]

    def local(a: str, task: Task, steps: int, *, all_data: bool, rate: float | None = None,
              begin: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
              examples: tuple[torch.Tensor, torch.Tensor] | None = None) -> CoLoRAMLP:
        m = models[a]
        st = begin if begin is not None else start(a, task.client_id)
        with torch.no_grad():
            params = dict(m.named_parameters())
            for n, v in st[1].items():
                params[n].copy_(v)
        load_shared(m, st[0])
        t = task.to(dev)
        x = torch.cat([t.support_x, t.query_x]) if all_data else t.support_x
        y = torch.cat([t.support_y, t.query_y]) if all_data else t.support_y
        if examples is not None:  # a support split (``support_choice``)
            x, y = examples[0].to(dev), examples[1].to(dev)
        trained = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
        split_a = config.a_lr is not None
        own = [p for n, p in trained if not is_shared(n) and not (split_a and n.endswith(".lora_A"))]
        common = [p for n, p in trained if is_shared(n)]
        groups = [{"params": own, "lr": config.lr},
                  {"params": common, "lr": config.shared_lr if config.shared_lr is not None else config.lr}]
        if split_a:
            groups.append({"params": [p for n, p in trained if n.endswith(".lora_A")], "lr": config.a_lr})
        if rate is not None:  # held-out fine-tuning: one rate for every adapter parameter
            groups = [{"params": [p for _, p in trained], "lr": rate}]
        opt: torch.optim.Optimizer = (torch.optim.SGD(groups, lr=config.lr) if config.optimizer == "sgd"
                                      else torch.optim.Adam(groups, lr=config.lr))
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        return m

    task_of = {t.client_id: t for t in data.train}
    chosen_lambda: dict[int, float] = {}
    training_choices: dict[float, int] = {}

    def choose(a: str, task: Task, cross: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
               mine: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]) -> tuple[float, dict[str, torch.Tensor]]:
        """The client's support-split choice between the cross- and own-architecture shared part."""
        def score(shared: dict[str, torch.Tensor]) -> float:
            def fit(x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.nn.Module:
                return local(a, task, steps, all_data=False, rate=config.choice_lr, begin=(shared, cross[1]),
                             examples=(x, y))
            return support_split_loss(fit, task.support_x.to(dev), task.support_y.to(dev), config.choice_steps,
                                      client=task.client_id)
        assert config.support_choice is not None
        lam, chosen, _ = choose_shared(cross[0], mine[0], config.support_choice, score)
        return lam, chosen

    gen = torch.Generator().manual_seed(config.seed)
    per_round = min(config.clients_per_round, len(data.train))
    for rnd in range(config.rounds):
        idx = sorted(torch.randperm(len(data.train), generator=gen)[:per_round].tolist())
        ups = []
        for i in idx:
            t = data.train[i]
            a = arch_of[t.client_id]
            m = local(a, t, config.local_steps, all_data=True)
            up = HeteroUpload(a, shared_state(m), architecture_state(m), float(t.n_samples), client_id=t.client_id)
            try:
                check_upload(up)
            except InvalidUpdateError as exc:
                log.warning("hetero round %d: %s; the round goes on without it", rnd, exc)
                continue
            ups.append(up)
        if not ups:
            log.warning("hetero round %d: no usable upload", rnd)
            continue
        if grouped is not None:
            vec = torch.stack([vectors[int(u.client_id or 0)] for u in ups])
            step = grouped.aggregate(rnd, ups, vec)
            refused_rows += len(step.kept)
            bytes_uploaded += step.bytes_uploaded
            error_bound = max(error_bound, step.error_bound)
            for j, u in enumerate(ups):
                own[int(u.client_id or 0)] = step.states[j]
        elif secure is not None:
            vec = torch.stack([vectors[int(u.client_id or 0)] for u in ups])
            got = secure.aggregate(rnd, ups, vec)
            refused_rows += len(got.refused)
            bytes_uploaded += got.bytes_uploaded
            for j, u in enumerate(ups):
                own[int(u.client_id or 0)] = got.states[j]
        elif config.relevance:
            vec = torch.stack([vectors[int(u.client_id or 0)] for u in ups])
            w = relevance_weights(cosine_similarity(vec), temperature=config.temperature, include_self=True)
            cross = relevance_aggregate_heterogeneous(ups, w, share=config.share, own_evidence=config.own_evidence)
            if config.support_choice is not None and config.share:
                mine = relevance_aggregate_heterogeneous(ups, w, share=False)
                for j, u in enumerate(ups):
                    lam, chosen = choose(u.architecture, task_of[int(u.client_id or 0)], cross[j], mine[j])
                    cross[j] = (chosen, cross[j][1])
                    training_choices[lam] = training_choices.get(lam, 0) + 1
            for u, pers in zip(ups, cross):
                own[int(u.client_id or 0)] = pers
        else:
            shared, arch = aggregate_heterogeneous(ups, share=config.share,
                                                  per_architecture=config.shared_per_architecture)
            for a in arch:
                state[a] = (shared[a], arch[a])
        log.info("hetero round %d: %d uploads over %d architectures", rnd, len(ups),
                 len({u.architecture for u in ups}))
    held_start: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
    if grouped is not None and own:
        trained = sorted(own)
        held_start, held_step = grouped.heldout(
            config.rounds, [HeteroUpload(arch_of[c], own[c][0], own[c][1], client_id=c) for c in trained],
            torch.stack([vectors[c] for c in trained]),
            [(t.client_id, architecture_name(s)) for t, s in zip(data.heldout, data.heldout_architectures)],
            torch.stack([vectors[t.client_id] for t in data.heldout]), state)
        bytes_uploaded += held_step.bytes_uploaded
        error_bound = max(error_bound, held_step.error_bound)
    elif secure is not None and own:
        trained = sorted(own)
        held_start = secure.heldout(
            config.rounds, [HeteroUpload(arch_of[c], own[c][0], own[c][1], client_id=c) for c in trained],
            torch.stack([vectors[c] for c in trained]),
            [(t.client_id, architecture_name(s)) for t, s in zip(data.heldout, data.heldout_architectures)],
            torch.stack([vectors[t.client_id] for t in data.heldout]), state)
    elif config.relevance:
        held_start = _heldout_mix(data, own, vectors, arch_of, config)
        if config.support_choice is not None and config.share:
            held_own = _heldout_mix(data, own, vectors, arch_of, replace(config, share=False))
            for t, s in zip(data.heldout, data.heldout_architectures):
                if t.client_id in held_start:
                    lam, chosen = choose(architecture_name(s), t, held_start[t.client_id], held_own[t.client_id])
                    held_start[t.client_id] = (chosen, held_start[t.client_id][1])
                    chosen_lambda[t.client_id] = lam
    results: dict[tuple[int, float], HeteroResult] = {}
    for steps, rate in keys:
        per_client: dict[int, float] = {}
        held_arch: dict[int, str] = {}
        for t, s in zip(data.heldout, data.heldout_architectures):
            a = architecture_name(s)
            m = local(a, t, steps, all_data=False, rate=None if config.finetune_lr is None and rate == config.lr
                      else rate, begin=held_start.get(t.client_id))
            with torch.no_grad():
                per_client[t.client_id] = float((m(t.query_x.to(dev)).argmax(1) == t.query_y.to(dev)).float().mean())
            held_arch[t.client_id] = a
        by_arch: dict[str, list[float]] = {}
        for cid, acc in per_client.items():
            by_arch.setdefault(held_arch[cid], []).append(acc)
        results[(steps, rate)] = HeteroResult(per_client, {a: statistics.fmean(v) for a, v in sorted(by_arch.items())},
                                              held_arch, refused_rows, bytes_uploaded, dict(chosen_lambda),
                                              dict(sorted(training_choices.items())), error_bound)
    return results


def _task_vectors(data: ClusteredDataset, in_features: int, classes: int, seed: int,
                  device: torch.device) -> dict[int, torch.Tensor]:
    """Every client's task vector: the last-layer gradient of a frozen seeded reference MLP on its support set.

    The reference network is the same for every architecture (task vectors must be comparable
    across shapes) and depends only on ``seed``, so every party can rebuild it.
    """
    torch.manual_seed(seed)
    ref = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, classes)).to(device)
    vz = TaskVectorizer(ref, dict(ref.named_parameters()), device=device)
    return {t.client_id: vz(t) for t in (*data.train, *data.heldout)}


def _heldout_mix(data: ClusteredDataset, own: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]],
                 vectors: dict[int, torch.Tensor], arch_of: dict[int, str], config: HeteroConfig
                 ) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """A held-out client's start: the training clients' personalized adapters mixed by its relevance to them."""
    trained = sorted(own)
    if not trained:
        return {}
    v_train = torch.stack([vectors[c] for c in trained])
    ups = [HeteroUpload(arch_of[c], own[c][0], own[c][1], client_id=c) for c in trained]
    out: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
    for t, s in zip(data.heldout, data.heldout_architectures):
        a = architecture_name(s)
        mine = [j for j, c in enumerate(trained) if arch_of[c] == a]
        if not mine:
            continue
        row = cross_weights(cross_cosine(vectors[t.client_id][None, :], v_train), temperature=config.temperature)[0]
        # the held-out client as a (zero-weight) first member, so the training rule yields its mix
        first = ups[mine[0]]
        w = torch.zeros(len(ups) + 1, len(ups) + 1, dtype=torch.float64)
        w[0, 1:] = row
        w[1:, 1:] = torch.eye(len(ups), dtype=torch.float64)
        probe = HeteroUpload(a, first.shared, first.arch, client_id=t.client_id)
        out[t.client_id] = relevance_aggregate_heterogeneous([probe, *ups], w, share=config.share,
                                                            own_evidence=config.own_evidence)[0]
    return out
