"""Relevance-weighted Co-LoRA under SecAgg+: relevance groups, one secure sum per part and group.

SecAgg+ reveals sums only, so the per-client rows of ``hetero_relevance`` (each client its own
weighted combination) cannot be computed under it.  As for homogeneous models
(``RelevanceAggregation`` with ``SecAggPlus``), the cohort is partitioned into relevance groups
and every member receives its group's mean; with heterogeneous architectures the mean is taken
part by part, over the members that hold the part:

* the shared part (``P``, ``Q`` of the ``first`` and ``last`` blocks, which every architecture
  has) is summed over the whole group;
* the ``P``, ``Q`` of a ``mid<k>`` block are summed over the group's members whose networks have
  that block (e.g. only the 64x64 clients have ``mid1``);
* an architecture part (``A``, ``B``) is summed over the group's members of that shape.

A set below ``min_size`` is never summed: its members keep their own tensors of that part for
the round (nothing about them is revealed; they learn nothing), as a *fragment* (a relevance
group below ``min_size``) keeps everything.  So a 32-wide client alone with its task and shape
in the cohort still takes its group's ``first``/``last`` P, Q, which is where cross-architecture
sharing helps the smallest shape.

Data flow of one round (``GroupedHeteroRelevance.aggregate``)
-------------------------------------------------------------
1. Cosines of the cohort's task vectors (the server needs them to group: declared leakage).
2. ``relevance_groups(cos, min_size, min_link=min_link)``: the threshold grouping the
   homogeneous SecAgg+ path uses (``min_size = ceil(min_effective) + 1 = 3`` as there), with
   its own default threshold ``min_link = 0.45``.  The task vectors here are a different
   reference network's (a 32-wide MLP's last layer, 330 floats, against 650 on the homogeneous
   benchmark), and the homogeneous 0.25 merged two tasks on one seed of the conflicting-task
   benchmark (report seed 1: 29 of 91 groups mixed two tasks).  Average linkage merges on the
   mean cosine between two clusters; over development seeds 10-19 (training clients) the
   smallest same-task mean is 0.60 and the largest other-task one 0.30, so 0.45 is midway.
3. ``combination_families`` (``hetero_secure``) names the families of tensors (one per
   architecture, one per set of shared block keys) and leaves out frozen tensors (the seeded
   backbone every party can rebuild: never summed, each recipient keeps its own copy, which
   ``combination_families`` checks is equal across an architecture's uploads).  Each family's
   contributors within a group form one *summed set* (``GroupSum``).
4. Every summed set of at least ``min_size`` members is one secure sum of the members'
   flattened tensors (``mode="secagg"``: ``SecAggPlus.secure_sum``, the real protocol with
   X25519 key agreement, AES-CTR masks and Shamir shares; ``mode="groups"``: the plain float64
   sum, the twin that isolates the protocol's quantization); every member receives
   ``sum / |set|``.  Every client counts the same (weight 1), as in the relevance rows.

Held-out clients (``GroupedHeteroRelevance.heldout``): the training clients are grouped by the
same rule over their task vectors; each held-out client joins the group of at least
``min_size`` training clients with the highest average cosine to it (as the homogeneous path
does) and takes that group's means of the training clients' current states: the shared part,
and the architecture part of its own shape if the group has at least ``min_size`` clients of it.
A part the group cannot provide (no or too few holders) is the architecture's public seeded
initialisation, as under CKKS when a held-out row is refused; with ``heldout_pool`` it is the
mean over the small sets of every group pooled into one, when that pool reaches ``min_size``.

A secure sum that aborts or loses a member raises ``ProtocolError`` naming the set (the
in-process simulation has no dropouts; a deployment would let the set's members keep their
own tensors instead, as for a set below ``min_size``).

Threat model and declared leakage
---------------------------------
Server honest-but-curious, clients honest (SecAgg+'s own model, ``securefml.protocols.secagg``,
covers dropouts and a server that tampers with messages).  The server learns the cosines of the
task vectors (held-out clients' included), group membership, and the sum of every summed set
(per part and group); it never sees an individual upload.  Each member learns its group's mean
of every part it holds, i.e. the sum of at least ``min_size - 1`` others.  Not covered:
differencing across steps.  The server knows the means it handed out, so a later sum over a
set in which every member but one holds a known mean reveals that one's state; this can happen
in the held-out step, which sums the training clients' final states (a client whose last round
left it its own tensors, next to clients holding a known group mean).  The homogeneous SecAgg+
path has the same exposure; colluding clients pooling their means are not covered either.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from securefml.errors import ConfigError, ProtocolError
from securefml.gram import Gram
from securefml.protocols.secagg import SecAggPlus
from securefml.relevance.colora import HeteroUpload
from securefml.relevance.grouping import relevance_groups
from securefml.relevance.hetero_secure import _start, _state, _unflat, combination_families

__all__ = ["GROUPED_MODES", "GroupSum", "GroupedRound", "GroupedHeteroRelevance", "summed_sets", "DEFAULT_MIN_LINK",
           "DEFAULT_CLIP"]

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]

#: how ``GroupedHeteroRelevance`` sums: under SecAgg+, or the same sets in plaintext
GROUPED_MODES = ("secagg", "groups")
#: the grouping's average-cosine threshold (module docstring, step 2: chosen on development seeds)
DEFAULT_MIN_LINK = 0.45
#: SecAgg+ clip range of an entry.  Adapter entries on this benchmark stay well inside it
#: (``P`` starts at the identity); a larger range costs precision only (``FixedPoint.scale``).
DEFAULT_CLIP = 8.0


@dataclass(frozen=True)
class GroupSum:
    """One set of tensors summed over one set of clients; every recipient gets ``sum / len(members)``.

    Attributes
    ----------
    label:
        The family's label (``"arch <name>"`` or ``"shared <keys>"``).
    part:
        ``"arch"`` or ``"shared"``.
    keys:
        The tensor names, in the order they are flattened.
    members:
        Positions (in the step's uploads) whose tensors are summed, sorted.
    recipients:
        Positions that receive the mean (training: the members themselves; held out: the new
        clients that joined the group).
    """

    label: str
    part: str
    keys: tuple[str, ...]
    members: tuple[int, ...]
    recipients: tuple[int, ...]


def summed_sets(uploads: Sequence[HeteroUpload], group_of: Mapping[int, tuple[int, ...]], min_size: int, *,
                trainable: Callable[[str], bool] | None = None, recipients: Sequence[int] | None = None,
                pool: Sequence[tuple[int, ...]] | None = None,
                ) -> tuple[list[GroupSum], dict[tuple[int, str], str]]:
    """Which sets are summed, and which recipients keep their own tensors of which family.

    ``group_of[i]`` is the positions whose tensors recipient ``i`` may receive the mean of (its
    relevance group; for a held-out placeholder, the group it joined).  For every family of
    ``combination_families`` and every recipient, the summed set is the family's contributors
    that are in its group; recipients with the same set share one ``GroupSum``.  A set below
    ``min_size`` is not summed: ``kept[(i, label)]`` says why.

    ``pool`` (held-out step, optional): disjoint groups whose small sets are pooled.  Per family,
    the holders of every pooled group that has fewer than ``min_size`` of them form one *rest*
    set; a recipient whose own set is too small receives the rest set's mean instead (when the
    rest set reaches ``min_size``).  The sets summed for a family then still partition its
    holders in cells of at least ``min_size``, so no sum can be subtracted from another to
    isolate fewer clients.
    """
    if min_size < 2:
        raise ConfigError(f"min_size must be >= 2 (a secure sum needs 2 clients), got {min_size}")
    n = len(uploads)
    who = list(range(n)) if recipients is None else [int(i) for i in recipients]
    if any(i not in group_of for i in who):
        raise ConfigError("every recipient needs a group")
    # only which tensors form a family and who holds them are used here, not the families' rows
    fams = combination_families(uploads, torch.eye(n, dtype=torch.float64), trainable=trainable, recipients=who)
    sums: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    info: dict[str, tuple[str, tuple[str, ...]]] = {}
    kept: dict[tuple[int, str], str] = {}
    for fam in fams:
        info[fam.label] = (fam.part, fam.keys)
        holders = set(fam.contributors)
        rest: tuple[int, ...] = ()
        if pool is not None:
            cells = [tuple(j for j in g if j in holders) for g in pool]
            rest = tuple(sorted(j for c in cells if len(c) < min_size for j in c))
        for i in fam.recipients:
            members = tuple(sorted(j for j in group_of[i] if j in holders))
            if len(members) < min_size and len(rest) >= min_size and set(members) <= set(rest):
                members = rest
            if len(members) < min_size:
                kept[(i, fam.label)] = f"{len(members)} holder(s) in the group, below the minimum of {min_size}"
                continue
            sums.setdefault((fam.label, members), []).append(i)
    out = [GroupSum(label, info[label][0], info[label][1], members, tuple(sorted(rec)))
           for (label, members), rec in sorted(sums.items())]
    return out, kept


@dataclass
class GroupedRound:
    """What one grouped step produced.

    Attributes
    ----------
    states:
        Recipient position -> its ``(shared part, architecture part)``.
    groups:
        The relevance groups (positions), fragments included.
    sums:
        Every summed set (what the server learns the sum of).
    kept:
        ``(recipient position, family label)`` -> why that family was not summed for it (it kept
        its own tensors or, held out, took the public initialisation).
    error_bound:
        Largest per-entry bound on the protocol's decoding error of a summed set's mean
        (``FixedPoint.error_bound`` over the set's size; 0 for ``mode="groups"``).
    bytes_uploaded:
        Bytes the clients sent to the server over every secure sum (SecAgg+ mode).
    """

    states: dict[int, tuple[State, State]]
    groups: tuple[tuple[int, ...], ...] = ()
    sums: list[GroupSum] = field(default_factory=list)
    kept: dict[tuple[int, str], str] = field(default_factory=dict)
    error_bound: float = 0.0
    bytes_uploaded: int = 0


def _flat(u: HeteroUpload, s: GroupSum) -> torch.Tensor:
    """A set's tensors of one upload as one float64 vector (the order ``_unflat`` reads back)."""
    st = _state(u, s.part)
    return torch.cat([st[k].detach().to("cpu", torch.float64).reshape(-1) for k in s.keys])


class GroupedHeteroRelevance:
    """Relevance groups for Co-LoRA uploads, each part securely summed over its holders (module docstring).

    Parameters
    ----------
    mode:
        ``"secagg"`` (real SecAgg+ secure sums) or ``"groups"`` (the same sets, plain sums).
    min_size:
        Smallest set that is summed (a member learns the sum of >= ``min_size - 1`` others).
    min_link:
        ``relevance_groups``' average-cosine threshold (None: the size rule, which forces every
        client into a group and mixes tasks; see ``grouping``).
    trainable:
        Architecture tensors that are summed (the others must be frozen).
    protocol:
        The ``SecAggPlus`` instance (``mode="secagg"``; None builds one with ``clip_range=clip``).
    clip:
        Clip range of a new ``SecAggPlus``.
    heldout_pool:
        Held-out step: a part the joined group cannot provide is the mean over the pooled
        small sets of every group (``summed_sets(pool=...)``) instead of the public
        initialisation (module docstring).
    """

    def __init__(self, *, mode: str = "secagg", min_size: int = 3, min_link: float | None = DEFAULT_MIN_LINK,
                 trainable: Callable[[str], bool] | None = None, protocol: SecAggPlus | None = None,
                 clip: float = DEFAULT_CLIP, heldout_pool: bool = False) -> None:
        if mode not in GROUPED_MODES:
            raise ConfigError(f"mode must be one of {GROUPED_MODES}, got {mode!r}")
        if min_size < 2:
            raise ConfigError(f"min_size must be >= 2 (a secure sum needs 2 clients), got {min_size}")
        if min_link is not None and not -1.0 <= min_link <= 1.0:
            raise ConfigError(f"min_link is a cosine in [-1, 1], got {min_link}")
        if protocol is not None and mode != "secagg":
            raise ConfigError("a SecAggPlus protocol is for mode='secagg'")
        self.mode = mode
        self.min_size = int(min_size)
        self.min_link = min_link
        self.trainable = trainable
        self.heldout_pool = bool(heldout_pool)
        self.protocol: SecAggPlus | None = None
        if mode == "secagg":
            self.protocol = protocol if protocol is not None else SecAggPlus(clip_range=clip)

    def __repr__(self) -> str:
        return (f"GroupedHeteroRelevance(mode={self.mode!r}, min_size={self.min_size}, min_link={self.min_link}, "
                f"heldout_pool={self.heldout_pool})")

    def groups(self, task_vectors: torch.Tensor) -> list[tuple[int, ...]]:
        """The relevance groups (positions) of these task vectors, fragments included."""
        cos = Gram.from_updates(task_vectors.to(torch.float64), list(range(task_vectors.shape[0]))).cosine()
        return relevance_groups(cos, self.min_size, min_link=self.min_link)

    def _sum(self, round_idx: int, uploads: Sequence[HeteroUpload], s: GroupSum) -> tuple[torch.Tensor, float, int]:
        """The mean of one summed set, its decoding error bound and the bytes uploaded."""
        vectors = torch.stack([_flat(uploads[j], s) for j in s.members])
        if self.protocol is None:
            return vectors.sum(0) / len(s.members), 0.0, 0
        ids = [self._id(uploads, j) for j in s.members]
        plan = self.protocol.plan(round_idx, ids, vectors.shape[1], max_weight=1.0)
        res = self.protocol.secure_sum(plan, {c: (vectors[k], 1.0) for k, c in enumerate(ids)})
        if res.aborted is not None or res.weighted_sum is None or res.total_weight <= 0:
            raise ProtocolError(f"round {round_idx}: secure sum of {s.label} over clients {ids} aborted: {res.aborted}")
        if len(res.contributors) != len(ids):
            raise ProtocolError(f"round {round_idx}: secure sum of {s.label} lost clients "
                                f"{sorted(set(ids) - set(res.contributors))}")
        mean = torch.from_numpy(np.asarray(res.weighted_sum, dtype=np.float64) / res.total_weight)
        bound = float(res.error_bound) if res.error_bound is not None else math.inf  # already on the mean
        return mean, bound, int(res.bytes_uploaded)

    @staticmethod
    def _id(uploads: Sequence[HeteroUpload], j: int) -> int:
        cid = uploads[j].client_id
        if cid is None:
            raise ConfigError(f"upload {j} has no client id (a secure sum names its members)")
        return int(cid)

    def _apply(self, round_idx: int, uploads: Sequence[HeteroUpload], sums: Sequence[GroupSum],
               out: GroupedRound) -> None:
        for s in sums:
            mean, bound, nbytes = self._sum(round_idx, uploads, s)
            out.error_bound = max(out.error_bound, bound)
            out.bytes_uploaded += nbytes
            for i in s.recipients:
                out.states[i][0 if s.part == "shared" else 1].update(_unflat(mean, _state(uploads[i], s.part), s.keys))

    def aggregate(self, round_idx: int, uploads: Sequence[HeteroUpload], task_vectors: torch.Tensor) -> GroupedRound:
        """One round: every upload's ``(shared, arch)`` after its group's secure sums (module docstring)."""
        if task_vectors.shape[0] != len(uploads):
            raise ConfigError(f"{task_vectors.shape[0]} task vectors for {len(uploads)} uploads")
        if not uploads:
            raise ConfigError("no uploads to aggregate")
        groups = self.groups(task_vectors)
        group_of = {i: g for g in groups for i in g}
        sums, kept = summed_sets(uploads, group_of, self.min_size, trainable=self.trainable)
        out = GroupedRound(_start(uploads, range(len(uploads))), tuple(groups), list(sums), kept)
        self._apply(round_idx, uploads, sums, out)
        for (i, label), why in kept.items():
            log.debug("hetero grouped round %d: %s of client %s kept (%s)", round_idx, label, uploads[i].client_id, why)
        return out

    def heldout(self, round_idx: int, train: Sequence[HeteroUpload], train_vectors: torch.Tensor,
                new: Sequence[tuple[int, str]], new_vectors: torch.Tensor,
                initial: Mapping[str, tuple[State, State]]) -> tuple[dict[int, tuple[State, State]], GroupedRound]:
        """Held-out clients' starts: their joined group's means (module docstring).

        ``new`` lists ``(client_id, architecture)``; ``initial`` is each architecture's public
        seeded state.  Returns client id -> ``(shared, arch)`` and the step's record (positions:
        the new clients first, then ``train``).
        """
        if not train:
            raise ConfigError("no training clients to join")
        if new_vectors.shape[0] != len(new) or train_vectors.shape[0] != len(train):
            raise ConfigError("one task vector per training and per held-out client")
        found = self.groups(train_vectors)
        joinable = [g for g in found if len(g) >= self.min_size]  # a fragment's sum is never computed
        if not joinable:
            raise ProtocolError(f"no relevance group of at least {self.min_size} training clients to join")
        v_new = new_vectors.to(torch.float64)
        v_train = train_vectors.to(torch.float64)
        cross = (v_new @ v_train.T) / (v_new.norm(dim=1, keepdim=True).clamp_min(1e-12)
                                       * v_train.norm(dim=1)[None, :].clamp_min(1e-12))
        m = len(new)
        probes = [HeteroUpload(a, initial[a][0], initial[a][1], client_id=int(c)) for c, a in new]
        ups = [*probes, *train]
        group_of: dict[int, tuple[int, ...]] = {}
        for k in range(m):
            best = max(range(len(joinable)), key=lambda g: (float(cross[k, list(joinable[g])].mean()), -g))
            group_of[k] = tuple(m + j for j in joinable[best])
        pool = [tuple(m + j for j in g) for g in joinable] if self.heldout_pool else None
        sums, kept = summed_sets(ups, group_of, self.min_size, trainable=self.trainable, recipients=range(m), pool=pool)
        out = GroupedRound(_start(ups, range(m)), tuple(tuple(m + j for j in g) for g in found), list(sums), kept)
        self._apply(round_idx, ups, sums, out)
        return {int(new[k][0]): out.states[k] for k in range(m)}, out
