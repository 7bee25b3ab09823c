"""Secure aggregation protocols, client half + server half (``securefml.protocols``)."""

from securefml.protocols.base import (
    AggregationProtocol,
    ClientUpdate,
    Reveals,
    RoundOutput,
    Transport,
    weighted_layer_mean,
)
from securefml.protocols.plaintext import Plaintext
from securefml.registry import Registry

__all__ = [
    "AggregationProtocol",
    "ClientUpdate",
    "Reveals",
    "RoundOutput",
    "Transport",
    "weighted_layer_mean",
    "Plaintext",
    "PROTOCOLS",
]

PROTOCOLS: Registry[AggregationProtocol] = Registry("protocol")
PROTOCOLS.register("plaintext")(Plaintext)
