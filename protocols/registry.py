"""The protocol registry: the names ``--protocol`` accepts.

Imports nothing of the package at run time (see ``securefml.registry.import_submodules``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from securefml.registry import Registry

if TYPE_CHECKING:
    from securefml.protocols.base import AggregationProtocol

__all__ = ["PROTOCOLS"]

PROTOCOLS: Registry[AggregationProtocol] = Registry("protocol")
