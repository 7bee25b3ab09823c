"""The attack registries: the names ``--attack`` (model and data attacks) and ``--protocol-attack`` accept.

Each definition registers itself with a decorator beside it (``@ATTACKS.register("name")``); the package
``__init__`` imports the modules, so importing the package fills the registry.  This module imports
nothing from the package at run time, so any module of it can import the registry without a cycle.
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
