"""Relevance-aware personalized aggregation and Co-LoRA adapters (``securefml.relevance``).

FedMosaic (Seo et al., ICLR 2026): clients summarise their task in a small *task vector*;
each client receives its own aggregate, weighted by the relevance (cosine similarity) of the
other clients' task vectors, so unrelated tasks stop interfering; Co-LoRA adapters share a
dimension-invariant part (P, Q) across different architectures.  See ``docs/relevance.md``.
"""

from __future__ import annotations

from securefml.relevance.aggregation import PersonalizedAggregate, RelevanceAggregation, RelevanceConfig
from securefml.relevance.colora import (
    CoLoRALinear,
    CoLoRAMLP,
    HeteroUpload,
    aggregate_heterogeneous,
    architecture_state,
    block_keys,
    check_upload,
    is_shared,
    load_shared,
    shared_state,
)
from securefml.relevance.encrypted import EncryptedRelevance, EncryptedRows
from securefml.relevance.experiment import parse_relevance_spec
from securefml.relevance.grouping import relevance_groups
from securefml.relevance.hetero import (
    HeteroConfig,
    HeteroResult,
    architecture_name,
    run_heterogeneous,
    run_heterogeneous_budgets,
)
from securefml.relevance.hetero_grouped import (
    GROUPED_MODES,
    GroupedHeteroRelevance,
    GroupedRound,
    GroupSum,
    summed_sets,
)
from securefml.relevance.hetero_relevance import cross_share, relevance_aggregate_heterogeneous, restricted_rows
from securefml.relevance.hetero_secure import (
    SECURE_MODES,
    CombinationFamily,
    SecureHeteroRelevance,
    SecureRound,
    combination_families,
    combine_plain,
)
from securefml.relevance.policy import RelevancePolicy
from securefml.relevance.pretrain import PRETRAIN_MODES, PretrainConfig, pretrain_backbones
from securefml.relevance.server import ClientScores, RelevanceServer, RoundOptions
from securefml.relevance.support_choice import (
    check_grid,
    choose_shared,
    mix_shared,
    pick,
    shot_folds,
    support_split_loss,
)
from securefml.relevance.task_vectors import TaskVectorConfig, TaskVectorizer, TaskVectorSmoother
from securefml.relevance.weights import (
    check_effective,
    cosine_similarity,
    cross_cosine,
    cross_weights,
    effective_contributors,
    relevance_weights,
    temper,
    temper_row,
    worst_case_effective,
)

__all__ = [
    "ClientScores",
    "EncryptedRelevance",
    "EncryptedRows",
    "RelevancePolicy",
    "CoLoRALinear",
    "CoLoRAMLP",
    "HeteroConfig",
    "HeteroResult",
    "HeteroUpload",
    "PRETRAIN_MODES",
    "relevance_aggregate_heterogeneous",
    "GroupedHeteroRelevance",
    "GroupedRound",
    "GroupSum",
    "summed_sets",
    "GROUPED_MODES",
    "cross_share",
    "check_grid",
    "choose_shared",
    "mix_shared",
    "pick",
    "shot_folds",
    "support_split_loss",
    "SECURE_MODES",
    "CombinationFamily",
    "SecureHeteroRelevance",
    "SecureRound",
    "combination_families",
    "combine_plain",
    "restricted_rows",
    "PretrainConfig",
    "pretrain_backbones",
    "architecture_name",
    "run_heterogeneous",
    "run_heterogeneous_budgets",
    "aggregate_heterogeneous",
    "architecture_state",
    "check_upload",
    "block_keys",
    "load_shared",
    "shared_state",
    "PersonalizedAggregate",
    "RelevanceAggregation",
    "RelevanceConfig",
    "RelevanceServer",
    "RoundOptions",
    "TaskVectorConfig",
    "TaskVectorSmoother",
    "TaskVectorizer",
    "check_effective",
    "cosine_similarity",
    "cross_cosine",
    "cross_weights",
    "effective_contributors",
    "parse_relevance_spec",
    "relevance_groups",
    "is_shared",
    "relevance_weights",
    "temper",
    "temper_row",
    "worst_case_effective",
]
