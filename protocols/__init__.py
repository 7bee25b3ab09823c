"""Secure aggregation protocols, client half + server half (``securefml.protocols``)."""

from securefml.protocols.base import (
    AggregationProtocol,
    ClientUpdate,
    Reveals,
    RoundOutput,
    Transport,
    weighted_layer_mean,
)
from securefml.protocols.ckks import CKKS, CKKSClient, CKKSServer
from securefml.protocols.ckks_keys import CKKSKeyHolder, CKKSPreset
from securefml.protocols.plaintext import Plaintext
from securefml.protocols.secagg import SecAggPlus
from securefml.registry import Registry

__all__ = [
    "AggregationProtocol",
    "CKKS",
    "CKKSClient",
    "CKKSKeyHolder",
    "CKKSPreset",
    "CKKSServer",
    "ClientUpdate",
    "PROTOCOLS",
    "Plaintext",
    "Reveals",
    "RoundOutput",
    "SecAggPlus",
    "Transport",
    "weighted_layer_mean",
]

PROTOCOLS: Registry[AggregationProtocol] = Registry("protocol")
PROTOCOLS.register("plaintext")(Plaintext)
PROTOCOLS.register("ckks")(CKKS)
PROTOCOLS.register("secagg")(SecAggPlus)
