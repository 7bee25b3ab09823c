"""The recommended default defense per protocol (``recommended(...)``, spec ``"recommended"``).

Chosen from this project's measurements on heterogeneous meta-learning clients (the issue-18
benchmark, ``benchmarks/robustness.py``; figures in ``docs/robustness.md``), not from the
literature alone:

* Robust rules that select or trim (Krum, median, Multi-Krum with a fixed ``f``) are biased on
  non-IID few-shot clients before any attack (digits-skew: median 0.416, Krum 0.127 against
  the mean's 0.899), and on digits-fewshot FOMAML only the plain mean stayed within 5 points of
  clean under sign flip, ALIE and IPM.  So the default keeps the *mean* as the aggregator.
* What the mean lacks is bounded influence and memory: ARC (adaptive clipping of the
  ``~2f(n-f)/n`` largest norms, with ``f`` derived from the malicious fraction) caps scaled
  updates, and ``Reputation`` accumulates each client's disagreement with the consensus over
  the rounds it takes part in and excludes the clients it has evidence against.

Both parts need only geometry, so under CKKS the same rule runs on the decrypted Gram matrix.
Bucketed SecAgg reveals bucket sums only (no per-client geometry, so no reputation): there
the default is centered clipping with its data-driven radius on the bucket means (Karimireddy
et al.'s bucketing + CClip pairing).  Plain SecAgg (one sum) admits no robust rule: refused.
"""

from __future__ import annotations

from securefml.defenses.base import Defense
from securefml.defenses.geometric import CenteredClipping
from securefml.defenses.mean import Mean
from securefml.defenses.preaggregators import MedianClipping
from securefml.defenses.reputation import Reputation
from securefml.errors import ConfigError

__all__ = ["recommended", "PROTOCOL_KINDS"]

PROTOCOL_KINDS = ("plaintext", "ckks", "secagg-buckets", "secagg")


def recommended(protocol: str = "plaintext", *, threshold: float = 0.0) -> Defense:
    """The recommended defense for ``protocol`` (one of ``PROTOCOL_KINDS``).

    ``f=None`` lets ARC take the Byzantine budget the federation derives from its malicious
    fraction (``budget.byzantine_budget``).

    >>> recommended("ckks")  # doctest: +NORMALIZE_WHITESPACE
    Reputation(ARC(f=None, chunk=65536) >> Mean(), threshold=0.5, min_rounds=2, window=2000,
               consensus='unflagged', duplicate=0.99)
    >>> recommended("secagg-buckets")
    CenteredClipping(tau=None, iterations=1, chunk=65536)
    """
    if protocol in ("plaintext", "ckks"):
        return Reputation(MedianClipping() >> Mean(), threshold=threshold)
    if protocol == "secagg-buckets":
        return CenteredClipping()
    if protocol == "secagg":
        raise ConfigError("plain SecAgg reveals only the sum: no robust rule can run; use bucketed SecAgg "
                          "(--buckets) and recommended('secagg-buckets')")
    raise ConfigError(f"unknown protocol kind {protocol!r}; choose one of {', '.join(PROTOCOL_KINDS)}")
