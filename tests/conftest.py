import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")
torch.set_num_threads(1)

if TYPE_CHECKING:
    from securefml.protocols.ckks import CKKS


@pytest.fixture(scope="session")
def readme_tables() -> ModuleType:
    """``benchmarks/readme_tables.py`` loaded by path (benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "readme_tables.py"
    spec = importlib.util.spec_from_file_location("readme_tables", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def add_proto() -> "CKKS":
    """A CKKS protocol on the add-only preset (weighted means), one per test module.

    The import stays inside the fixture, so collecting the suite does not load TenSEAL.
    """
    from securefml.protocols.ckks import CKKS

    return CKKS(preset="add-only")


@pytest.fixture(scope="module")
def stats_proto() -> "CKKS":
    """A CKKS protocol on the stats preset (Gram and robust rules), one per test module."""
    from securefml.protocols.ckks import CKKS

    return CKKS(preset="stats")
