"""What a protocol's server half can show a defense: the one vocabulary both sides import.

It lives in neither ``securefml.protocols`` nor ``securefml.defenses`` so that neither package
imports the other for it (DESIGN.md, "Robust aggregation under secrecy"): a protocol declares the
one value it reveals, a defense declares the set it can run on, and the aggregation step matches
them.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Reveals"]


class Reveals(str, Enum):
    """What the server half can show a defense.

    A ``str`` enum, so a member compares equal to its value (``Reveals.SUM == "sum"``) and
    serializes as that string in ``result.json``.

    >>> Reveals.GRAM == "gram", str(Reveals.GRAM)
    (True, 'gram')
    """

    UPDATES = "updates"
    """Every client's coordinates (plaintext)."""
    GRAM = "gram"
    """Norms and pairwise inner products only (CKKS statistics)."""
    BUCKETS = "buckets"
    """Sums of random buckets of clients (SecAgg+ bucketed mode)."""
    SUM = "sum"
    """Only the total (SecAgg+)."""

    def __str__(self) -> str:
        return self.value
