"""The defense registry: the names ``--defense`` and ``make_defense`` accept.

Imports nothing of the package at run time (see ``securefml.registry.import_submodules``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from securefml.registry import Registry

if TYPE_CHECKING:
    from securefml.defenses.base import Defense

__all__ = ["DEFENSES"]

DEFENSES: Registry[Defense] = Registry("defense")
