"""The reference protocol: no secrecy, the same interface and wire checks as the secure ones.

A client half answers the server's round plan with its update in the plaintext wire format
(``securefml.protocols.plaintext_codec``); the server half decodes each reply with every check
and reveals all accepted updates (``Reveals.UPDATES``).  The rule runs in the one aggregation
step, which for the plain weighted mean accumulates the clients' vectors in place instead of
stacking an ``[n, d]`` matrix (``securefml.aggregation.streaming_weighted_mean``).
"""

from __future__ import annotations

from collections.abc import Sequence

from securefml.aggregation import streaming_weighted_mean
from securefml.protocols.base import AggregationProtocol, ClientUpdate, HalvesSetup, Reveals
from securefml.protocols.plaintext_codec import PlaintextCodec, decode_manifest, encode_manifest
from securefml.protocols.plaintext_halves import PlaintextClientHalf, PlaintextServerHalf
from securefml.protocols.registry import PROTOCOLS
from securefml.updates import LayerLayout

__all__ = ["Plaintext", "encode_manifest", "decode_manifest", "streaming_weighted_mean"]


@PROTOCOLS.register("plaintext")
class Plaintext(PlaintextCodec, AggregationProtocol):
    """Clients send float32 updates in the clear; the server sees every coordinate.

    Threat model: none for privacy (declared leakage: every update).  Kept as the reference
    the secure protocols are measured against, and for defenses that need coordinates.
    ``encode``/``decode`` are the wire format (``PlaintextCodec``) for users who carry the
    bytes themselves.
    """

    name = "plaintext"
    reveals = Reveals.UPDATES

    def server_half(
        self, round_idx: int, layout: LayerLayout, cohort: Sequence[int], *, setup: HalvesSetup
    ) -> PlaintextServerHalf:
        return PlaintextServerHalf(round_idx, layout, cohort)

    def client_half(self, round_idx: int, layout: LayerLayout, update: ClientUpdate) -> PlaintextClientHalf:
        return PlaintextClientHalf(update, layout, round_idx=round_idx)
