"""The attack registries: the names ``--attack`` (model and data attacks) and ``--protocol-attack`` accept.

Imports nothing of the package at run time (see ``securefml.registry.import_submodules``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from securefml.registry import Registry

if TYPE_CHECKING:
    from securefml.attacks.base import Attack
    from securefml.attacks.protocol_attacks import TamperingTransport

__all__ = ["ATTACKS", "PROTOCOL_ATTACKS"]

ATTACKS: Registry[Attack] = Registry("attack")
PROTOCOL_ATTACKS: Registry[TamperingTransport] = Registry("protocol attack")
