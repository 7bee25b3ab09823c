"""Detection metrics: how well a defense's ``flagged`` ids match the known malicious clients.

The same functions score either set a round records: ``flagged`` (the clients the defense
excluded, its action) or ``suspected`` (the clients its detector flags, excluded or not;
``AggregationResult.suspected``); ``metrics.detection`` in ``result.json`` holds both.

In an attack evaluation the malicious ids are known, so every round's flags can be scored:
the true positive rate (malicious clients flagged / malicious clients in the cohort) and the
false positive rate (honest clients flagged / honest clients in the cohort), per round and
pooled over all rounds.  ``cumulative_detection`` scores the population instead: after each
round, every client seen so far counts as flagged if it was flagged the last time it took
part (what a reputation-based detector has concluded about it by then).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from securefml.errors import ConfigError

__all__ = ["DetectionRates", "detection_rates", "DetectionTracker", "cumulative_detection"]


@dataclass(frozen=True)
class DetectionRates:
    """Confusion counts and rates of one round (or pooled over rounds).

    ``tpr`` is None when the cohort held no malicious client, ``fpr`` None when it held no
    honest one (a rate over an empty set is undefined, and JSON has no NaN).
    """

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def tpr(self) -> float | None:
        pos = self.tp + self.fn
        return self.tp / pos if pos else None

    @property
    def fpr(self) -> float | None:
        neg = self.fp + self.tn
        return self.fp / neg if neg else None

    def to_dict(self) -> dict[str, float | int | None]:
        return {**asdict(self), "tpr": self.tpr, "fpr": self.fpr}

    def __add__(self, other: DetectionRates) -> DetectionRates:
        return DetectionRates(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)


def detection_rates(
    flagged: Iterable[int], malicious_ids: Iterable[int], cohort_ids: Iterable[int]
) -> DetectionRates:
    """Score one round's flags.

    Parameters
    ----------
    flagged:
        Ids the defense flagged (``AggregationResult.flagged`` or ``RoundOutput.flagged``);
        each must belong to the cohort.
    malicious_ids:
        Every malicious client id (ids outside this round's cohort are ignored).
    cohort_ids:
        The clients whose updates the defense saw this round.

    Examples
    --------
    >>> r = detection_rates([3, 5], malicious_ids=[3, 4, 9], cohort_ids=range(8))
    >>> (r.tp, r.fp, r.fn, r.tn), r.tpr, r.fpr
    ((1, 1, 1, 5), 0.5, 0.16666666666666666)
    """
    cohort = {int(c) for c in cohort_ids}
    flags = {int(c) for c in flagged}
    stray = flags - cohort
    if stray:
        raise ConfigError(f"flagged ids {sorted(stray)} are not in the cohort")
    bad = {int(c) for c in malicious_ids} & cohort
    tp = len(flags & bad)
    fp = len(flags - bad)
    return DetectionRates(tp=tp, fp=fp, fn=len(bad) - tp, tn=len(cohort) - len(bad) - fp)


@dataclass
class DetectionTracker:
    """Accumulates detection rates round by round; ``to_dict()`` is ``metrics.detection``.

    Examples
    --------
    >>> t = DetectionTracker(malicious_ids=(0, 1))
    >>> _ = t.update(0, flagged=[0], cohort_ids=[0, 1, 2, 3])
    >>> _ = t.update(1, flagged=[1, 2], cohort_ids=[1, 2, 3])
    >>> t.overall().tpr, t.overall().fpr
    (0.6666666666666666, 0.25)
    """

    malicious_ids: tuple[int, ...]
    rounds: list[tuple[int, DetectionRates]] = field(default_factory=list)

    def update(self, round_idx: int, *, flagged: Iterable[int], cohort_ids: Iterable[int]) -> DetectionRates:
        rates = detection_rates(flagged, self.malicious_ids, cohort_ids)
        self.rounds.append((int(round_idx), rates))
        return rates

    def overall(self) -> DetectionRates:
        total = DetectionRates(0, 0, 0, 0)
        for _, r in self.rounds:
            total = total + r
        return total

    def to_dict(self) -> dict[str, object]:
        return {
            "per_round": [{"round": i, **r.to_dict()} for i, r in self.rounds],
            "overall": self.overall().to_dict(),
        }


def cumulative_detection(
    rounds: Iterable[tuple[int, Iterable[int], Iterable[int]]], malicious_ids: Iterable[int]
) -> list[tuple[int, DetectionRates]]:
    """Population-level detection after each round.

    Parameters
    ----------
    rounds:
        ``(round, cohort_ids, flagged_ids)`` in round order.
    malicious_ids:
        Every malicious client id.

    Returns
    -------
    list of (round, DetectionRates)
        Counts over every client seen up to that round; a client's status is its flag in
        the last round it took part in.

    Examples
    --------
    >>> out = cumulative_detection([(0, [0, 1, 2], [2]), (1, [0, 3], [0])], malicious_ids=[0])
    >>> [(r, x.tp, x.fp, x.fn, x.tn) for r, x in out]
    [(0, 0, 1, 1, 1), (1, 1, 1, 0, 2)]
    """
    bad = {int(c) for c in malicious_ids}
    status: dict[int, bool] = {}
    out = []
    for rnd, cohort, flagged in rounds:
        flags = {int(c) for c in flagged}
        for c in cohort:
            status[int(c)] = int(c) in flags
        tp = sum(1 for c, f in status.items() if f and c in bad)
        fp = sum(1 for c, f in status.items() if f and c not in bad)
        pos = sum(1 for c in status if c in bad)
        out.append((int(rnd), DetectionRates(tp=tp, fp=fp, fn=pos - tp, tn=len(status) - pos - fp)))
    return out
