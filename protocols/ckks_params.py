"""CKKS round parameters derived from public inputs: the packing frame, party ids, wire constants.

Why a module of its own: every CKKS half (client, reference party, server, key holder) derives
the same public values the same way, and none of them may import another half to get them.

* ``packing_frame``: the round's frame is the layers announced by at least ``min_contributors``
  clients (a layer fewer clients sent would be withheld anyway, so nobody encrypts it).
* Party ids: clients are non-negative; the service parties have reserved negative ids
  (``KEY_HOLDER_PARTY``, and ``ckks_policy.REFERENCE_PARTY`` for the reference party).  The
  ``wire`` envelope carries a u32 sender, so ``wire_id`` maps a negative id ``p`` to
  ``0xFFFFFFFF + p`` (``0xFFFFFFFF`` itself is the server's id, ``SERVER``).
* ``MAX_ABS``: the largest entry an honest client encrypts (modulus headroom, see below).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence

from securefml.errors import ConfigError
from securefml.protocols.ckks_stats import PackingFrame
from securefml.updates import LayerLayout

__all__ = [
    "KIND",
    "MAX_ABS",
    "SERVER",
    "KEY_HOLDER_PARTY",
    "ENVELOPE_OVERHEAD",
    "HEADER_FIELDS",
    "ct_field",
    "ct_fields",
    "wire_id",
    "packing_frame",
]

#: wire kind of a client's signed ciphertext upload
KIND = "ckks-update"
#: Largest |entry| a client encrypts.  With scale 2^40 the add-only preset holds sums below
#: 2^19 and the statistics preset inner products below 2^59; 2^16 leaves room for any number of
#: (weight-normalised) clients and for inner products of up to 2^27 entries.
MAX_ABS = float(2**16)
#: the server's sender id in the envelopes it sends (as the plaintext protocol and frames)
SERVER = 0xFFFFFFFF
#: the key holder's reserved party id (never a client id)
KEY_HOLDER_PARTY = -2
#: bytes an upload may carry beyond its ciphertexts (header fields, manifest, signature)
ENVELOPE_OVERHEAD = 65536
#: every field of an upload other than its ciphertexts
HEADER_FIELDS = frozenset({"ctx", "layout", "frame", "layers", "weight", "scale", "chunks", "sig"})
_U32 = 1 << 32


def ct_field(k: int) -> str:
    """The envelope field holding chunk ``k``'s ciphertext."""
    return f"ct.{k}"


@functools.lru_cache(maxsize=8)
def ct_fields(n: int) -> frozenset[str]:
    """The ciphertext fields of a frame of ``n`` chunks (decoded as views, not copies)."""
    return frozenset(ct_field(k) for k in range(n))


def wire_id(party: int) -> int:
    """The u32 sender id party ``party`` has in a ``wire`` envelope (see the module docstring).

    Raises
    ------
    ConfigError
        For ids outside ``(-2**31, 2**31)`` (they would collide with another party's).
    """
    p = int(party)
    if not -(1 << 31) < p < (1 << 31):
        raise ConfigError(f"party id {p} is outside the range the CKKS wire format can carry")
    return p if p >= 0 else _U32 - 1 + p


def packing_frame(
    layout: LayerLayout, layer_sets: Sequence[Sequence[str]], slots: int, min_contributors: int
) -> PackingFrame:
    """The round's packing frame: the layers announced by at least ``min_contributors`` clients."""
    counts = Counter(name for layers in layer_sets for name in set(layout.canonical(layers)))
    chosen = tuple(n for n in layout.layer_names if counts[n] >= min_contributors)
    return PackingFrame(layout, chosen, slots)
