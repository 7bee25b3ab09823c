"""Relevance-weighted Co-LoRA aggregation under CKKS: the plaintext rule's rows, one decryption each.

``hetero_relevance`` gives every client i its own ``(shared part, architecture part)``: each is
a weighted combination ``sum_j r_ij x_j`` of the round's uploads, with rows ``r_i`` from the
relevance weights (restricted to the candidates, evidence-gated for the shared part).  Here the
same rows are computed (``combination_families``) and each per-client combination is decrypted
by the CKKS key holder (``EncryptedRelevance.combine``), so the server never sees an upload.

Data flow of one round (``SecureHeteroRelevance.aggregate``)
------------------------------------------------------------
1. The cohort's task vectors are encrypted and signed; the key holder decrypts their Gram
   (key-holder round ``round * STRIDE + 0``).  The server turns it into cosines and
   ``relevance_weights(cos / T)`` (self included), as the plaintext rule does.
2. The rows are grouped into *combination families*: one per architecture (its clients' ``A``,
   ``B``) and one per set of clients holding the same shared block keys (``P``, ``Q`` of the
   blocks every architecture has; those of ``mid<k>`` blocks only some have).  A family's
   contributors encrypt their flattened tensors once; every recipient's row is one
   ``AggregateRequest`` in its own key-holder round (each contributor re-signs its ciphertexts
   for it: its consent to that combination).
3. Every row is checked against the key holder's ``RelevancePolicy`` (recipient-blind: after
   leaving out any one contributor, at least ``min_effective`` effective contributors) before it
   is asked for, and again by the key holder before it decrypts.  A training client whose row
   is refused keeps its own upload's tensors of that family this round (what a row concentrated
   on itself nearly is); a held-out client's row is first tempered (``weights.temper_row``,
   recipient-blind) and, if even that cannot meet the bound, starts from the public seeded
   initialisation of its architecture.

Frozen tensors (the seeded backbone every party can rebuild) are not encrypted: ``trainable``
names the tensors that are, and every other architecture tensor must be equal across the
architecture's uploads (``ConfigError`` otherwise), so copying the recipient's own is exact.

``mode="policy"`` runs the same rows and the same policy in plaintext (the Gram of the task
vectors computed directly): the comparison ``mode="ckks"`` against it isolates CKKS's rounding;
``hetero_relevance`` without any policy is the method's plaintext reference.

Threat model and declared leakage
---------------------------------
As ``securefml.relevance.encrypted``: an honest-but-curious server that may send the key holder
any request; a key holder that follows its code and does not collude with the server.  The
server learns the task vectors' Gram, the relevance weights, which rows were refused, and the
decrypted per-client combinations it is handed in this in-process simulation (in a deployment
row i's plaintext goes to client i only; a party holding every row of a round and the public
weights can solve for individual uploads when the rows are invertible).  Guarantee (tested
against a hypothesis-driven server in ``tests/property/test_relevance_ckks_adversary.py`` for
the key holder, and here for the rows this module asks for): no decrypted combination has
fewer than ``min_effective`` effective contributors after leaving out any one of them.  Not
covered: colluding clients pooling their aggregates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from securefml.errors import ConfigError
from securefml.gram import Gram
from securefml.protocols.ckks_policy import SKIP_BELOW
from securefml.relevance.colora import HeteroUpload
from securefml.relevance.encrypted import EncryptedRelevance
from securefml.relevance.hetero_relevance import check_rows, cross_share, restricted_rows
from securefml.relevance.policy import RelevancePolicy
from securefml.relevance.weights import cross_weights, relevance_weights, temper_row

__all__ = ["CombinationFamily", "combination_families", "combine_plain", "SecureRound", "SecureHeteroRelevance",
           "SECURE_MODES"]

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]

#: how ``SecureHeteroRelevance`` combines: under CKKS, or the same rows and policy in plaintext
SECURE_MODES = ("ckks", "policy")


@dataclass(frozen=True)
class CombinationFamily:
    """Per-client combinations of one set of tensors over one set of contributors.

    Attributes
    ----------
    label:
        ``"arch <name>"`` or ``"shared <keys>"`` (for logs and refusals).
    part:
        ``"arch"`` or ``"shared"``: which half of a recipient's state the keys belong to.
    keys:
        The tensor names combined, in the order they are flattened.
    contributors, recipients:
        Positions in the round's uploads.
    rows:
        ``[len(recipients), len(contributors)]`` float64; each row a distribution.
    """

    label: str
    part: str
    keys: tuple[str, ...]
    contributors: tuple[int, ...]
    recipients: tuple[int, ...]
    rows: torch.Tensor


def _state(u: HeteroUpload, part: str) -> Mapping[str, torch.Tensor]:
    return u.shared if part == "shared" else u.arch


def combination_families(
    uploads: Sequence[HeteroUpload], weights: torch.Tensor, *, share: bool = True,
    own_evidence: float | None = None, trainable: Callable[[str], bool] | None = None,
    recipients: Sequence[int] | None = None,
) -> list[CombinationFamily]:
    """The rows ``relevance_aggregate_heterogeneous`` applies, grouped into families.

    ``trainable`` selects the architecture tensors that are combined (None: all); the others
    must be equal across each architecture's uploads.  ``recipients`` restricts the rows to
    those positions (None: every upload).
    """
    n = check_rows(uploads, weights)
    who = list(range(n)) if recipients is None else [int(i) for i in recipients]
    archs = [u.architecture for u in uploads]
    same = torch.tensor([[a == b for b in archs] for a in archs], dtype=torch.bool)
    arch_rows = restricted_rows(weights, same)
    lam = cross_share(weights, same, own_evidence if share else None)
    keep = trainable if trainable is not None else (lambda _name: True)
    families: list[CombinationFamily] = []
    for a in sorted(set(archs[i] for i in who)):
        group = tuple(j for j in range(n) if archs[j] == a)
        ref = uploads[group[0]].arch
        if any(uploads[j].arch.keys() != ref.keys() for j in group):
            raise ConfigError(f"uploads of architecture {a!r} must hold the same parameters")
        keys = tuple(k for k in ref if keep(k))
        for k in ref:
            if not keep(k) and any(not torch.equal(uploads[j].arch[k], ref[k]) for j in group):
                raise ConfigError(f"architecture {a!r} tensor {k!r} differs across clients but is not combined "
                                  "(only frozen tensors may be left out)")
        rec = tuple(i for i in who if archs[i] == a)
        if keys:
            rows = arch_rows[list(rec)][:, list(group)]
            families.append(CombinationFamily(f"arch {a}", "arch", keys, group, rec, rows))
    grouped: dict[tuple[tuple[int, ...], tuple[str, ...]], list[int]] = {}
    for i in who:
        by_cand: dict[tuple[int, ...], list[str]] = {}
        for key, value in uploads[i].shared.items():
            cand = tuple(j for j in range(n) if (share or bool(same[i, j])) and key in uploads[j].shared)
            shapes = {tuple(uploads[j].shared[key].shape) for j in cand}
            if shapes != {tuple(value.shape)}:
                raise ConfigError(f"shared {key} has shapes {sorted(shapes)} across clients: ranks differ")
            by_cand.setdefault(cand, []).append(key)
        for cand, keys_i in by_cand.items():
            grouped.setdefault((cand, tuple(keys_i)), []).append(i)
    for (cand, keys_t), rec_l in grouped.items():
        mask = torch.zeros(n, dtype=torch.bool)
        mask[list(cand)] = True
        picked: list[torch.Tensor] = []
        for i in rec_l:
            row = restricted_rows(weights[i:i + 1], mask[None, :])[0]
            li = float(lam[i])
            if li < 1.0:
                row = li * row + (1.0 - li) * restricted_rows(weights[i:i + 1], (mask & same[i])[None, :])[0]
            picked.append(row[list(cand)])
        families.append(CombinationFamily(f"shared {','.join(keys_t)}", "shared", keys_t, cand, tuple(rec_l),
                                          torch.stack(picked)))
    return families


def _without_probes(fam: CombinationFamily, m: int) -> CombinationFamily:
    """``fam`` without contributor positions ``< m`` (held-out clients' zero-weight placeholders), rows renormalised."""
    cols = [c for c, j in enumerate(fam.contributors) if j >= m]
    rows = fam.rows[:, cols]
    total = rows.sum(1, keepdim=True)
    uniform = torch.full_like(rows, 1.0 / max(rows.shape[1], 1))
    rows = torch.where(total > 0, rows / total.clamp_min(1e-300), uniform)
    return CombinationFamily(fam.label, fam.part, fam.keys, tuple(fam.contributors[c] for c in cols), fam.recipients,
                             rows)


def _flat(u: HeteroUpload, fam: CombinationFamily) -> torch.Tensor:
    st = _state(u, fam.part)
    return torch.cat([st[k].detach().to("cpu", torch.float64).reshape(-1) for k in fam.keys])


def _unflat(vec: torch.Tensor, like: Mapping[str, torch.Tensor], keys: Sequence[str]) -> State:
    out: State = {}
    at = 0
    for k in keys:
        n = like[k].numel()
        out[k] = vec[at:at + n].reshape(like[k].shape).to(like[k].dtype)
        at += n
    return out


def _start(uploads: Sequence[HeteroUpload], positions: Sequence[int]) -> dict[int, tuple[State, State]]:
    return {i: ({k: v.clone() for k, v in uploads[i].shared.items()},
                {k: v.clone() for k, v in uploads[i].arch.items()}) for i in positions}


def combine_plain(uploads: Sequence[HeteroUpload], families: Sequence[CombinationFamily]
                  ) -> dict[int, tuple[State, State]]:
    """Apply the families' rows in plaintext: recipient position -> ``(shared, arch)``.

    Tensors no family combines (frozen ones) are the recipient's own.
    """
    rec = sorted({i for f in families for i in f.recipients})
    out = _start(uploads, rec)
    for fam in families:
        stack = torch.stack([_flat(uploads[j], fam) for j in fam.contributors])
        mixed = fam.rows.to(torch.float64) @ stack
        for r, i in enumerate(fam.recipients):
            out[i][0 if fam.part == "shared" else 1].update(_unflat(mixed[r], _state(uploads[i], fam.part), fam.keys))
    return out


@dataclass
class SecureRound:
    """What one secure combination step produced.

    Attributes
    ----------
    states:
        Recipient position -> its ``(shared part, architecture part)``.
    refused:
        ``(recipient position, family label)`` -> why that row was not decrypted (the recipient
        kept its own tensors of the family, or, held out, took the fallback).
    applied:
        ``(recipient position, family label)`` -> the row over the family's contributors that
        was decrypted (tiny entries dropped and renormalised, as the key holder sees it).
    bytes_uploaded:
        Serialized ciphertext bytes of the contributors' uploads (CKKS mode; 0 otherwise).
    """

    states: dict[int, tuple[State, State]]
    refused: dict[tuple[int, str], str] = field(default_factory=dict)
    applied: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    bytes_uploaded: int = 0


def _prepared(row: torch.Tensor) -> torch.Tensor:
    """The row as ``EncryptedRelevance.combine`` requests it: entries <= SKIP_BELOW dropped, renormalised."""
    r = row.to(torch.float64)
    r = torch.where(r > SKIP_BELOW, r, torch.zeros_like(r))
    return r / r.sum()


class SecureHeteroRelevance:
    """Relevance-weighted Co-LoRA aggregation under CKKS (or its plaintext twin, module docstring).

    Parameters
    ----------
    policy:
        The key holder's ``RelevancePolicy`` (``min_effective``, ``min_contributors``).
    mode:
        ``"ckks"`` (a fresh key holder with ``policy``; real TenSEAL ciphertexts) or
        ``"policy"`` (same rows and policy, plaintext).
    temperature, share, own_evidence:
        As ``HeteroConfig``.
    trainable:
        Architecture tensors that are combined (the others must be frozen: equal across an
        architecture's uploads).
    """

    def __init__(self, policy: RelevancePolicy, *, mode: str = "ckks", temperature: float = 0.2, share: bool = True,
                 own_evidence: float | None = None, trainable: Callable[[str], bool] | None = None,
                 encrypted: EncryptedRelevance | None = None) -> None:
        if mode not in SECURE_MODES:
            raise ConfigError(f"mode must be one of {SECURE_MODES}, got {mode!r}")
        if not temperature > 0:
            raise ConfigError(f"temperature must be positive, got {temperature}")
        self.policy = policy
        self.mode = mode
        self.temperature = float(temperature)
        self.share = bool(share)
        self.own_evidence = own_evidence
        self.trainable = trainable
        self.encrypted: EncryptedRelevance | None = None
        self._index: dict[int, int] | None = None
        self._cos = torch.zeros(0, 0, dtype=torch.float64)
        if mode == "ckks":
            self.encrypted = encrypted if encrypted is not None else EncryptedRelevance.generate(
                min_effective=policy.min_effective, min_contributors=policy.min_contributors)
            if self.encrypted.policy.min_effective < policy.min_effective:
                raise ConfigError("the key holder's policy is weaker than the one asked for")

    def __repr__(self) -> str:
        return (f"SecureHeteroRelevance(mode={self.mode!r}, min_effective={self.policy.min_effective}, "
                f"temperature={self.temperature}, own_evidence={self.own_evidence})")

    def _violation(self, row: torch.Tensor, ids: Sequence[int] | None = None) -> str | None:
        """The policy's verdict on ``row`` as it would be requested (``_prepared``), None when allowed."""
        r = _prepared(row)
        names = list(range(r.numel())) if ids is None else list(ids)
        return self.policy.violation({c: float(w) for c, w in zip(names, r.tolist()) if w > 0})

    # -- weights ------------------------------------------------------------------------------
    def register(self, round_idx: int, client_ids: Sequence[int], vectors: torch.Tensor) -> None:
        """One Gram of every party's task vector, kept for the run (key-holder round ``round_idx``, slot 0).

        Task vectors that do not change over the run (``run_heterogeneous``: a frozen reference
        network's gradient on the client's support set) need one Gram, not one per round: every
        round then uses its cohort's sub-matrix.  Declared leakage: the cosines of every pair of
        registered parties (held-out clients included), once.
        """
        ids = [int(c) for c in client_ids]
        cos = self.cosines(round_idx, ids, vectors)
        self._index = {c: k for k, c in enumerate(ids)}
        self._cos = cos

    def cosines(self, round_idx: int, client_ids: Sequence[int], vectors: torch.Tensor) -> torch.Tensor:
        """Cosines of the task vectors: from the key holder's decrypted Gram (CKKS) or directly.

        Parties that were all ``register``-ed get the kept Gram's sub-matrix (``vectors`` unused).
        """
        index = self._index
        if index is not None and all(int(c) in index for c in client_ids):
            pos = [index[int(c)] for c in client_ids]
            return self._cos[pos][:, pos]
        if self.encrypted is not None:
            return self.encrypted.gram(round_idx, client_ids, vectors, slot=0).cosine()
        return Gram.from_updates(vectors.to(torch.float64), list(client_ids)).cosine()

    # -- the combinations --------------------------------------------------------------------
    def _run(self, round_idx: int, uploads: Sequence[HeteroUpload], families: Sequence[CombinationFamily],
             *, heldout: bool, fallback: Mapping[str, tuple[State, State]] | None = None) -> SecureRound:
        ids = [int(u.client_id) if u.client_id is not None else -1 - j for j, u in enumerate(uploads)]
        rec_all = sorted({i for f in families for i in f.recipients})
        res = SecureRound(_start(uploads, rec_all))
        slot = 1
        for fam in families:
            rows = fam.rows.clone()
            if heldout:  # a new client has no own upload to keep: temper its row first
                cand = torch.ones(rows.shape[1], dtype=torch.bool)
                m = self.policy.min_effective * (1 + 1e-6)
                rows = torch.stack([temper_row(r, None, m, cand, blind=True) if self._violation(r) else r
                                    for r in rows])
            contrib_ids = [ids[j] for j in fam.contributors]
            vectors = torch.stack([_flat(uploads[j], fam) for j in fam.contributors])
            decrypted: dict[int, torch.Tensor] = {}
            if self.encrypted is not None:
                got = self.encrypted.combine(round_idx, contrib_ids, vectors, rows, first_slot=slot)
                res.bytes_uploaded += got.bytes_uploaded
                for r, vec in got.vectors.items():
                    decrypted[r] = torch.from_numpy(np.asarray(vec, dtype=np.float64))
                    res.applied[(fam.recipients[r], fam.label)] = got.applied[r]
                for r, why in got.refused.items():
                    res.refused[(fam.recipients[r], fam.label)] = why
            else:
                for r in range(rows.shape[0]):
                    row = _prepared(rows[r])
                    verdict = self._violation(row, contrib_ids)
                    if verdict is not None:
                        res.refused[(fam.recipients[r], fam.label)] = f"refused before asking: {verdict}"
                        continue
                    decrypted[r] = row @ vectors
                    res.applied[(fam.recipients[r], fam.label)] = row
            slot += rows.shape[0]
            for r, i in enumerate(fam.recipients):
                half = 0 if fam.part == "shared" else 1
                if r in decrypted:
                    res.states[i][half].update(_unflat(decrypted[r], _state(uploads[i], fam.part), fam.keys))
                elif heldout and fallback is not None:
                    start = fallback[uploads[i].architecture][half]
                    res.states[i][half].update({k: start[k].clone() for k in fam.keys})
        for (i, label), why in res.refused.items():
            log.info("hetero secure round %d: %s of client %s not decrypted (%s)", round_idx, label, ids[i], why)
        return res

    def aggregate(self, round_idx: int, uploads: Sequence[HeteroUpload], task_vectors: torch.Tensor) -> SecureRound:
        """One round: per-client ``(shared, arch)`` for every upload (module docstring, steps 1-3)."""
        ids = [int(u.client_id) if u.client_id is not None else j for j, u in enumerate(uploads)]
        if task_vectors.shape[0] != len(uploads):
            raise ConfigError(f"{task_vectors.shape[0]} task vectors for {len(uploads)} uploads")
        w = relevance_weights(self.cosines(round_idx, ids, task_vectors), temperature=self.temperature,
                              include_self=True)
        fams = combination_families(uploads, w, share=self.share, own_evidence=self.own_evidence,
                                    trainable=self.trainable)
        return self._run(round_idx, uploads, fams, heldout=False)

    def heldout(self, round_idx: int, train: Sequence[HeteroUpload], train_vectors: torch.Tensor,
                new: Sequence[tuple[int, str]], new_vectors: torch.Tensor,
                initial: Mapping[str, tuple[State, State]]) -> dict[int, tuple[State, State]]:
        """Held-out clients' starts: the training clients' states mixed by each one's relevance.

        ``new`` lists ``(client_id, architecture)``; ``initial`` is each architecture's public
        seeded state (the start of a held-out client whose row cannot meet the policy, and the
        shapes of its placeholder).  One Gram over training and new task vectors (declared
        leakage: their cosines), then per family one encryption per contributor and one request
        per held-out client (key-holder round ``round_idx + 1``).
        """
        n = len(train)
        ids = [int(u.client_id) if u.client_id is not None else j for j, u in enumerate(train)]
        cos = self.cosines(round_idx, ids + [int(c) for c, _ in new], torch.cat([train_vectors, new_vectors]))
        cw = cross_weights(cos[n:, :n], temperature=self.temperature)
        have = {u.architecture for u in train}
        keep = [k for k, (_, a) in enumerate(new) if a in have]
        if not keep:
            return {}
        # the held-out clients as zero-weight placeholders in front of the training uploads
        probes = [HeteroUpload(new[k][1], initial[new[k][1]][0], initial[new[k][1]][1], client_id=int(new[k][0]))
                  for k in keep]
        m = len(probes)
        w = torch.zeros(m + n, m + n, dtype=torch.float64)
        w[:m, m:] = cw[keep]
        w[m:, m:] = torch.eye(n, dtype=torch.float64)
        ups = [*probes, *train]
        fams = [_without_probes(f, m) for f in combination_families(
            ups, w, share=self.share, own_evidence=self.own_evidence, trainable=self.trainable,
            recipients=range(m))]
        got = self._run(round_idx + 1, ups, fams, heldout=True, fallback=initial)
        return {int(new[k][0]): got.states[r] for r, k in enumerate(keep)}
