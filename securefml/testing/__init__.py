"""Hypothesis strategies and property checkers for users' own security tests.

Reads like ``hypothesis.extra.numpy``: strategy functions whose data-defining arguments are
positional and tuning options keyword-only, plus ``assert_*`` checkers.  hypothesis is
imported only inside this package, and it is an optional dependency: without it, importing
``securefml.testing`` raises an ``ImportError`` that says how to install it.
"""

try:
    import hypothesis  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by tests/test_packaging.py in a bare venv
    raise ImportError(
        "securefml.testing needs hypothesis, an optional dependency: pip install 'securefml[testing]'"
    ) from exc

from securefml.testing.adversarial_secagg import (
    ServerMoves,
    ServerView,
    assert_server_learns_only_large_sums,
    exposed_sets,
    finding1_moves,
    run_malicious_round,
    server_moves,
    unmask_group,
)
from securefml.testing.defense_checks import (
    BYZANTINE_KINDS,
    GramWeightedMean,
    UpdateBatch,
    assert_gram_matches_plaintext,
    assert_permutation_invariant,
    assert_selects_honest,
    assert_translation_equivariant,
    assert_weighted_mean,
    assert_within_honest_range,
    client_updates,
)
from securefml.testing.layered import layer_layouts, layer_subsets, layered_updates
from securefml.testing.secagg_strategies import (
    DROP_STAGES,
    DropAt,
    Replay,
    SecAggScenario,
    Tamper,
    client_weights,
    cohorts,
    dropout_patterns,
    neighbour_graphs,
    recoverable,
    secagg_scenarios,
    update_vectors,
)

__all__ = [
    "BYZANTINE_KINDS",
    "DROP_STAGES",
    "DropAt",
    "GramWeightedMean",
    "Replay",
    "SecAggScenario",
    "ServerMoves",
    "ServerView",
    "Tamper",
    "UpdateBatch",
    "assert_gram_matches_plaintext",
    "assert_permutation_invariant",
    "assert_selects_honest",
    "assert_server_learns_only_large_sums",
    "assert_translation_equivariant",
    "assert_weighted_mean",
    "assert_within_honest_range",
    "client_updates",
    "client_weights",
    "cohorts",
    "dropout_patterns",
    "exposed_sets",
    "finding1_moves",
    "layer_layouts",
    "layer_subsets",
    "layered_updates",
    "neighbour_graphs",
    "recoverable",
    "run_malicious_round",
    "secagg_scenarios",
    "server_moves",
    "unmask_group",
    "update_vectors",
]
