"""Flower tests skip, with the reason, when the ``[flower]`` extra is not installed."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="Flower is the optional extra: pip install 'securefml[flower]'")
