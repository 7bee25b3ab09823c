"""The recommended default defense per protocol (``recommended(...)``, spec ``"recommended"``).

Chosen from this project's measurements on heterogeneous meta-learning clients (the issue-18
benchmark, ``benchmarks/robustness.py``; figures in ``docs/robustness.md``), not from the
literature alone:

* Robust rules that select or trim (Krum, median, Multi-Krum with a fixed ``f``) are biased on
  non-IID few-shot clients before any attack (digits-skew: median 0.416, Krum 0.127 against
  the mean's 0.899), and on digits-fewshot FOMAML only the plain mean stayed within 5 points of
  clean under sign flip, ALIE and IPM.  So the default keeps the *mean* as the aggregator.
* What the mean lacks is bounded influence and memory.  ``MedianClipping(history=10)`` first
  shortens every update of the *whole cohort* to the round's median norm (capped at ``growth``
  times the median of the last 10 rounds' bounds, so a round the attackers dominate cannot raise
  it), so whatever an attacker's scale it moves the mean by at most an honest client's norm.
  ``Reputation`` then accumulates each client's disagreement with the consensus over the rounds it
  takes part in, re-scoring the stored rounds as evidence builds up, and excludes the clients
  whose mean agreement is negative; the mean of the rest is the aggregate.
* The order matters.  The previous default, ``Reputation(MedianClipping() >> Mean())`` (spec
  ``reputation>>medclip>>mean``), clipped to the median of the clients the reputation *kept*.
  Clipping the whole cohort first measured better in every worst-case cell (3 seeds, 20 / 25 %
  malicious; FOMAML 0.615 / 0.600 against 0.601 / 0.557, MAML 0.807 / 0.778 against 0.802 /
  0.729, FedAvg on digits-skew 0.905 / 0.856 against 0.898 / 0.817), at the same clean
  accuracy, with better plaintext detection, and it removed most of the previous default's
  clean cost in the ``make run`` setting (-2.3 against -9.1 points); ``docs/robustness.md``.
  (ARC, the choice before that, clipped the ``~2f(n-f)/n`` largest norms with ``f`` derived to
  cover 95 % of random cohorts; in the rounds whose cohort held more than ``f`` attackers one of
  them passed unclipped, and a single 10x aggregate inflated the server's Adam state for the rest
  of the run: 10-17 points lost against 10x sign flips.)

Both parts need only geometry, so under CKKS the same rule runs on the decrypted Gram matrix.
Bucketed SecAgg reveals bucket sums and the (public) bucket membership only: there the default
is ``BucketReputation`` (per-client evidence attributed from the buckets a client lands in,
re-drawn every round; buckets whose norm exceeds 3x the history-capped median bucket norm are
gated; buckets holding flagged clients are left out) before median clipping with a 10-round
history cap on the bucket means.  It replaced centered clipping on bucket means, which lost
8.6 points to the plaintext default (digits-fewshot FOMAML, 20 % 10x sign flippers, 20
rounds, 3 seeds); the figures of the replacement are in ``docs/robustness.md``.
Plain SecAgg (one sum) admits no robust rule: refused.
"""

from __future__ import annotations

from securefml.defenses.base import Defense
from securefml.defenses.bucket_reputation import BucketReputation
from securefml.defenses.mean import Mean
from securefml.defenses.preaggregators import MedianClipping
from securefml.defenses.reputation import Reputation
from securefml.errors import ConfigError

__all__ = ["recommended", "PROTOCOL_KINDS", "RECOMMENDED_SPEC", "PREVIOUS_RECOMMENDED_SPEC"]

#: The spec that builds ``recommended("plaintext")`` / ``recommended("ckks")``.
RECOMMENDED_SPEC = "medclip:history=10>>reputation>>mean"
#: The spec of the plaintext/CKKS default before issue 18's switch (measurements labelled with it).
PREVIOUS_RECOMMENDED_SPEC = "reputation>>medclip>>mean"

PROTOCOL_KINDS = ("plaintext", "ckks", "secagg-buckets", "secagg")


def recommended(protocol: str = "plaintext", *, threshold: float = 0.0) -> Defense:
    """The recommended defense for ``protocol`` (one of ``PROTOCOL_KINDS``).

    No ``f`` is needed: the clipping bound is the round's median norm and the reputation's
    threshold is on each client's own evidence.  ``threshold`` is ``Reputation``'s.

    The plaintext and CKKS defaults are one composition (spec
    ``medclip:history=10>>reputation>>mean``); the previous one is spec ``reputation>>medclip>>mean``.

    >>> recommended("ckks")  # doctest: +NORMALIZE_WHITESPACE
    MedianClipping(history=10, growth=2.0, chunk=65536) >> Reputation(Mean(), threshold=0.0, min_rounds=3,
               window=2000, consensus='unflagged', duplicate=0.99, rescore=6, history=250)
    >>> recommended("secagg-buckets")  # doctest: +NORMALIZE_WHITESPACE
    BucketReputation(MedianClipping(history=10, growth=2.0, chunk=65536) >> Mean(), threshold=0.0, min_rounds=3,
                     gate=3.0, gate_history=10, growth=2.0, rescore=6, history=250, window=2000)
    """
    if protocol in ("plaintext", "ckks"):
        return MedianClipping(history=10) >> Reputation(Mean(), threshold=threshold)
    if protocol == "secagg-buckets":
        return BucketReputation(MedianClipping(history=10) >> Mean(), threshold=threshold)
    if protocol == "secagg":
        raise ConfigError("plain SecAgg reveals only the sum: no robust rule can run; use bucketed SecAgg "
                          "(--buckets) and recommended('secagg-buckets')")
    raise ConfigError(f"unknown protocol kind {protocol!r}; choose one of {', '.join(PROTOCOL_KINDS)}")
