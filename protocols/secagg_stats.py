"""What one SecAgg+ round measured, as typed values that reach the round record.

Two sides, kept apart on purpose:

- ``SecAggRoundStats`` is the server half's: the public parameters of each secure sum, the
  bucket partition and which buckets aborted (and why), the error bound of the revealed sums
  and the server's own time.  All of it is public to the server.
- ``SecAggClientStats`` is one client half's own count (entries clipped to ``clip_range``,
  whether its weight exceeded the public bound, its own compute time, and the CPU time of its
  masked input: in total and on its longest thread, ``secagg_masking``).  A client never sends
  it: in a deployment it stays on the device (a log line there).  The in-process driver adds the
  clients' counts into the round's record (``SecAggPlus.round_stats``), so a simulation reports
  how much clipping the chosen ``clip_range`` causes; the server half never sees them.

``to_dict()`` gives plain ``int``/``float``/``str``/``list``/``dict`` values (no tuples), so every
field survives the round record's filter into ``result.json``.

``SumResult`` is the outcome of one secure sum driven by ``SecAggPlus.secure_sum`` (used by code
that needs the raw weighted sum rather than the aggregation step, e.g. relevance grouping).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from securefml.errors import InvalidUpdateError, ProtocolError
from securefml.protocols.secagg_graph import GraphParams

__all__ = ["SecAggClientStats", "SecAggRoundStats", "SumResult"]


@dataclass(frozen=True)
class SecAggClientStats:
    """One client's own counts for one round (never sent to the server)."""

    entries: int = 0
    clipped_entries: int = 0
    weight_clipped: bool = False
    seconds: float = 0.0
    mask_cpu_s: float = 0.0  # CPU time of the masked input, all its threads together
    mask_critical_cpu_s: float = 0.0  # CPU time of its busiest thread (the critical path on idle cores)
    mask_threads: int = 0


@dataclass(frozen=True)
class SecAggRoundStats:
    """The server half's record of one round (every secure sum of it), plus the clients' tallies.

    Attributes
    ----------
    params:
        ``(k, t)`` of each secure sum, in bucket order.
    buckets:
        Bucket index -> its cohort (bucketed mode only; empty for one secure sum).
    aborted_buckets:
        Bucket index -> why that bucket's sum aborted (bucketed mode only).
    bucket_index:
        The buckets whose sums were revealed, in the order of the revealed sums.
    error_bound:
        Largest per-entry error bound of the revealed sums (``inf`` if none was revealed).
    server_s:
        Time spent in the server half.
    clients_s, clipped_fraction, weights_clipped:
        Filled by ``SecAggPlus.round_stats`` from the client halves of an in-process round (None
        when only the server half is known, e.g. over a real transport).
    mask_cpu_s, mask_critical_cpu_s, mask_threads:
        The clients' masked inputs: CPU seconds in total, CPU seconds of the busiest thread of
        each (summed), and the largest thread count one used (in-process rounds only).  On a
        loaded machine ``process CPU - mask_cpu_s + mask_critical_cpu_s`` is what the round
        would take on idle cores.
    """

    params: tuple[tuple[int, int], ...] = ()
    buckets: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    aborted_buckets: Mapping[int, str] = field(default_factory=dict)
    bucket_index: tuple[int, ...] = ()
    error_bound: float = math.inf
    server_s: float = 0.0
    clients_s: float | None = None
    clipped_fraction: float | None = None
    weights_clipped: int | None = None
    mask_cpu_s: float | None = None
    mask_critical_cpu_s: float | None = None
    mask_threads: int | None = None

    def with_clients(self, clients: Sequence[SecAggClientStats]) -> SecAggRoundStats:
        """These stats with the clients' own tallies added (in-process rounds only)."""
        entries = sum(c.entries for c in clients)
        clipped = sum(c.clipped_entries for c in clients)
        return replace(
            self,
            clients_s=sum(c.seconds for c in clients),
            clipped_fraction=clipped / entries if entries else 0.0,
            weights_clipped=sum(1 for c in clients if c.weight_clipped),
            mask_cpu_s=sum(c.mask_cpu_s for c in clients),
            mask_critical_cpu_s=sum(c.mask_critical_cpu_s for c in clients),
            mask_threads=max((c.mask_threads for c in clients), default=0),
        )

    def to_dict(self) -> dict[str, object]:
        """Plain values for ``RoundOutput.extras`` / ``result.json`` (bucket fields only when bucketed)."""
        out: dict[str, object] = {
            "params": [[k, t] for k, t in self.params],
            "error_bound": self.error_bound,
            "timings": {"server_s": self.server_s,
                        **({"clients_s": self.clients_s} if self.clients_s is not None else {}),
                        **({"mask_cpu_s": self.mask_cpu_s, "mask_critical_cpu_s": self.mask_critical_cpu_s}
                           if self.mask_cpu_s is not None else {})},
        }
        if self.buckets:
            out["buckets"] = {i: list(members) for i, members in self.buckets.items()}
            out["aborted_buckets"] = dict(self.aborted_buckets)
            out["bucket_index"] = list(self.bucket_index)
        if self.clipped_fraction is not None:
            out["clipped_fraction"] = self.clipped_fraction
        if self.weights_clipped is not None:
            out["weights_clipped"] = self.weights_clipped
        if self.mask_threads is not None:
            out["mask_threads"] = self.mask_threads
        return out


@dataclass
class SumResult:
    """The outcome of one secure sum (``SecAggPlus.secure_sum``)."""

    cohort: tuple[int, ...]
    params: GraphParams
    weighted_sum: np.ndarray | None  # float64 [L]; None when aborted
    total_weight: float
    contributors: tuple[int, ...]
    rejected: dict[int, ProtocolError | InvalidUpdateError] = field(default_factory=dict)
    client_errors: dict[int, str] = field(default_factory=dict)
    bytes_uploaded: int = 0
    aborted: str | None = None
    error_bound: float = math.inf
    timings: dict[str, float] = field(default_factory=lambda: {"clients_s": 0.0, "server_s": 0.0})
