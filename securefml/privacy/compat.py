"""Which protocol and defense a DP mechanism's accounting holds for (``check_mechanism``).

User-level DP sizes its noise for the sensitivity of the *weighted mean with equal weights* of
clipped updates: one client moves the sum by at most S.  A robust rule (median, Krum, trimmed
mean...) selects or reweights updates from the data, so one client's influence on its output is
not bounded by S and the stated epsilon would not be a guarantee: refused.

Distributed DP adds each client's noise share before the protocol; the guarantee holds only if
the server sees nothing but the noised total.  Refused, with the reason:

- plaintext: the server sees every client's update, each carrying 1/m of the noise variance;
- SecAgg bucketed mode: each bucket sum of s clients carries only s/m of the noise variance;
- CKKS: the key holder decrypts norms and inner products of single updates for robust rules,
  and the continuous noise is not a mechanism of CKKS' approximate arithmetic; the discrete
  mechanism lives in SecAgg's integer ring.

User-level DP also needs a server-dictated layer selection (every client uploads the same
layers), so that each layer's mean is over all the clients the noise is sized for.

Record-level DP is local to each client (its released update is already private), so any
protocol and defense post-process it.
"""

from __future__ import annotations

from typing import Any

from securefml.errors import ConfigError
from securefml.privacy.config import PrivacyConfig

__all__ = ["check_mechanism"]


def check_mechanism(config: PrivacyConfig, protocol: Any, defense: Any, *, selector: Any = None) -> None:
    """Raise ``ConfigError`` (saying why) unless ``config``'s accounting holds under ``protocol`` and ``defense``.

    ``selector`` (optional): user-level DP needs every client to upload the same layers (a
    server-dictated selection), or a layer sent by fewer clients is averaged over fewer updates
    than the noise is sized for.
    """
    if config.mode != "user":
        return
    if selector is not None and not getattr(selector, "server_dictated", False):
        raise ConfigError(f"user-level DP with a client-chosen layer selection ({type(selector).__name__}): a layer "
                          "uploaded by fewer clients is averaged over fewer updates than the noise is sized for; use "
                          "--select all, named:REGEX, or a server-dictated selector")
    if config.placement == "distributed":
        from securefml.protocols.base import Reveals  # privacy must not import protocols at import time
        from securefml.protocols.secagg import SecAggPlus

        name = getattr(protocol, "name", type(protocol).__name__)
        reveals = getattr(protocol, "reveals", None)
        if reveals == Reveals.UPDATES:
            raise ConfigError(f"distributed DP with the {name} protocol: plaintext shows the server every client's "
                              "update, each carrying only 1/m of the noise variance; use --protocol secagg (or "
                              "central placement)")
        if reveals == Reveals.BUCKETS:
            raise ConfigError("distributed DP with bucketed SecAgg: the server learns the bucket sums, each carrying "
                              "only s/m of the noise variance; use secagg without buckets and the mean")
        if not isinstance(protocol, SecAggPlus) or reveals != Reveals.SUM:
            raise ConfigError(f"distributed DP needs SecAgg without buckets (the sum alone, in an integer ring for "
                              f"the discrete Skellam mechanism); {name} reveals {reveals!r} (for CKKS: Gram "
                              "statistics, norms and inner products, for robust rules) and has no integer ring")
    if not getattr(defense, "is_weighted_mean", False):
        raise ConfigError(f"user-level DP sizes its noise for the weighted mean of clipped updates (one client moves "
                          f"the sum by at most S); {type(defense).__name__} selects or reweights updates from the "
                          "data, so the stated epsilon would not hold; use --defense mean")
