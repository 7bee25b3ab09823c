"""Secure aggregation protocols, client half + server half (``securefml.protocols``)."""

from securefml.protocols.base import (
    AggregationProtocol,
    ClientUpdate,
    Reveals,
    RoundOutput,
    Transport,
    weighted_layer_mean,
)
from securefml.protocols.ckks import CKKS, MAX_ABS, CKKSClient, CKKSServer
from securefml.protocols.ckks_auth import SignedUpload, UploadSigner, VerifyKeyRegistry
from securefml.protocols.ckks_keys import PRESETS, CKKSKeyHolder, CKKSPreset
from securefml.protocols.ckks_policy import REFERENCE_PARTY, AggregateRequest, DecryptionPolicy, GramRequest
from securefml.protocols.ckks_stats import PackingFrame, inner_product_error_bound, sum_error_bound
from securefml.protocols.plaintext import Plaintext
from securefml.protocols.quantize import FixedPoint
from securefml.protocols.registry import PROTOCOLS
from securefml.protocols.secagg import SecAggPlus
from securefml.protocols.secagg_client import SecAggClient
from securefml.protocols.secagg_graph import derive_parameters
from securefml.protocols.secagg_plan import RoundPlan
from securefml.protocols.secagg_server import SecAggServer
from securefml.registry import import_submodules

__all__ = [
    "AggregateRequest",
    "AggregationProtocol",
    "CKKS",
    "CKKSClient",
    "CKKSKeyHolder",
    "CKKSPreset",
    "CKKSServer",
    "DecryptionPolicy",
    "GramRequest",
    "REFERENCE_PARTY",
    "SignedUpload",
    "UploadSigner",
    "VerifyKeyRegistry",
    "FixedPoint",
    "MAX_ABS",
    "PRESETS",
    "PackingFrame",
    "RoundPlan",
    "SecAggClient",
    "SecAggServer",
    "derive_parameters",
    "inner_product_error_bound",
    "sum_error_bound",
    "ClientUpdate",
    "PROTOCOLS",
    "Plaintext",
    "Reveals",
    "RoundOutput",
    "SecAggPlus",
    "Transport",
    "weighted_layer_mean",
]

# Every module registers its own definitions (decorators beside them); import them all.
import_submodules(__name__, __path__)

