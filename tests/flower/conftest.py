"""Fixtures of the Flower tests (imports of the extra stay inside them: without Flower they skip)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

#: parties enrolled in the shared CKKS key set (client ids 0..CKKS_PARTIES-1)
CKKS_PARTIES = 6


@pytest.fixture(scope="session")
def ckks_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One add-only CKKS key set, provisioned in a separate process, for the whole session."""
    from securefml.flower.provision import provision_in_subprocess

    where = tmp_path_factory.mktemp("ckks-keys")
    provision_in_subprocess(where, range(CKKS_PARTIES), preset="add-only", min_contributors=2)
    return where


@pytest.fixture
def forget_flower_memory() -> Iterator[None]:
    """Start and end a test with no client half or key holder held by this process."""
    from securefml.flower import forget_halves, forget_parties

    forget_halves()
    forget_parties()
    yield
    forget_halves()
    forget_parties()
