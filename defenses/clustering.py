"""Detection by similarity structure: FLAME, FoolsGold, DnC.

FLAME needs only cosines and norms, so it runs on a CKKS Gram (the aggregation step adds its
noise after decryption, from the result's typed ``noise_std``).  FoolsGold needs each client's update history
across rounds, and DnC projects random coordinate subsets: both need coordinates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from securefml.defenses.base import AggregationResult, Defense, effective_f
from securefml.defenses.budget import check_optional_f
from securefml.defenses.distance import combine
from securefml.defenses.linalg import DEFAULT_CHUNK, gram_matrix
from securefml.defenses.registry import DEFENSES
from securefml.errors import ConfigError
from securefml.gram import Gram
from securefml.reveals import Reveals

__all__ = [
    "cosine_from_gram",
    "flame_admitted",
    "flame_coefficients",
    "foolsgold_weights",
    "dnc_good_set",
    "FLAME",
    "FoolsGold",
    "DnC",
]


def _generator(context: Mapping[str, Any], who: str) -> torch.Generator:
    gen = context.get("generator")
    if not isinstance(gen, torch.Generator):
        raise ConfigError(f"{who} needs context['generator'] (a torch.Generator) for its randomness")
    return gen


def cosine_from_gram(g: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities from a Gram matrix (a zero vector has cosine 0 with all)."""
    nrm = torch.diagonal(g).clamp_min(0).sqrt()
    denom = nrm[:, None] * nrm[None, :]
    return torch.where(denom > 0, g / denom.clamp_min(1e-300), torch.zeros_like(g)).clamp(-1, 1)


def flame_admitted(cos: torch.Tensor) -> torch.Tensor:
    """FLAME's filter: HDBSCAN on cosine distances, ``min_cluster_size = n/2 + 1``.

    Returns a boolean mask of the admitted (majority-cluster) rows.  With fewer than 3 rows,
    or when HDBSCAN labels every row as noise, every row is admitted (there is no majority
    to compare against) and the caller records it.
    """
    n = cos.shape[0]
    if n < 3:
        return torch.ones(n, dtype=torch.bool)
    from sklearn.cluster import HDBSCAN

    dist = (1.0 - cos.to(torch.float64)).clamp_min(0).cpu().numpy()
    np.fill_diagonal(dist, 0.0)
    dist = (dist + dist.T) / 2
    labels = HDBSCAN(
        min_cluster_size=n // 2 + 1, min_samples=1, allow_single_cluster=True, metric="precomputed", copy=True
    ).fit(dist).labels_
    admitted = torch.from_numpy(labels != -1)
    if not bool(admitted.any()):
        return torch.ones(n, dtype=torch.bool)
    return admitted


def flame_coefficients(
    cos: torch.Tensor, norms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """FLAME's filter and adaptive clipping as coefficients on the updates.

    Returns (coefficients, admitted mask, clipping bound ``S`` = median norm of all updates).
    The aggregate is ``sum over admitted of min(1, S / ||u_i||) u_i / |admitted|``.
    """
    admitted = flame_admitted(cos).to(norms.device)
    n64 = norms.to(torch.float64)
    s = float(n64.median())
    gamma = torch.where(n64 > s, s / n64.clamp_min(1e-300), torch.ones_like(n64))
    coeffs = torch.where(admitted, gamma, torch.zeros_like(gamma)) / admitted.sum()
    return coeffs, admitted, s


def foolsgold_weights(history_gram: torch.Tensor) -> torch.Tensor:
    """FoolsGold's learning rates from the Gram matrix of the clients' update histories.

    Follows the paper's Algorithm 1: pairwise cosines of histories, pardoning of honest
    clients, ``1 - max cosine``, rescaling to a maximum of 1, then the logit with
    confidence parameter kappa = 1 clipped to [0, 1].
    """
    n = history_gram.shape[0]
    cs = cosine_from_gram(history_gram) - torch.eye(n, dtype=torch.float64, device=history_gram.device)
    maxcs = cs.max(dim=1).values
    # pardoning: cs[i, j] *= maxcs[i] / maxcs[j] where maxcs[i] < maxcs[j]
    ratio = maxcs[:, None] / torch.where(maxcs[None, :] != 0, maxcs[None, :], torch.ones_like(maxcs[None, :]))
    cs = torch.where(maxcs[:, None] < maxcs[None, :], cs * ratio, cs)
    wv = (1 - cs.max(dim=1).values).clamp(0, 1)
    top = wv.max()
    if float(top) <= 0:
        return torch.zeros_like(wv)
    wv = wv / top
    wv = torch.where(wv >= 1, torch.full_like(wv, 0.99), wv)
    logit = torch.log(wv / (1 - wv)) + 0.5
    return torch.nan_to_num(logit, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)


def dnc_good_set(
    x: torch.Tensor, f: int, *, iterations: int, subsample: int, c: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """DnC's good set (Shejwalkar & Houmansadr, Algorithm 2) and the last outlier scores.

    Each iteration projects a random subset of ``subsample`` coordinates, centred, onto its
    top right singular vector, and keeps the ``n - floor(c f)`` rows with the smallest
    squared projection; the good set is the intersection over iterations (an iteration that
    would empty it is skipped).
    """
    n, d = x.shape
    remove = int(np.floor(c * f))
    if remove >= n:
        raise ConfigError(f"DnC with f={f}, c={c} would remove all {n} clients")
    good = torch.ones(n, dtype=torch.bool, device=x.device)
    scores = torch.zeros(n, dtype=torch.float64, device=x.device)
    b = min(subsample, d)
    for _ in range(iterations):
        idx = torch.randperm(d, generator=generator)[:b].sort().values.to(x.device)
        xs = x[:, idx].to(torch.float64)
        xc = xs - xs.mean(dim=0, keepdim=True)
        # top right singular vector v of xc: with xc xc^T = sum_k s_k^2 u_k u_k^T, the
        # projections are xc v = s_1 u_1, so the scores come from an [n, n] eigenproblem
        evals, evecs = torch.linalg.eigh(xc @ xc.T)
        scores = evals[-1].clamp_min(0) * evecs[:, -1].square()
        keep = torch.zeros(n, dtype=torch.bool, device=x.device)
        keep[torch.sort(scores, stable=True).indices[: n - remove]] = True
        if not bool((good & keep).any()):
            break  # the intersection would be empty: keep the last non-empty good set
        good &= keep
    return good, scores


@DEFENSES.register("flame")
class FLAME(Defense):
    """FLAME (Nguyen et al., USENIX Security 2022): clustering, adaptive clipping, noise.

    1. HDBSCAN on pairwise cosine distances with ``min_cluster_size = n/2 + 1`` admits the
       majority cluster; the rest are flagged.  2. Every admitted update is clipped to the
       median norm ``S`` of all the round's updates.  3. The admitted, clipped updates are
       averaged.  4. Gaussian noise with standard deviation ``noise * S`` is added
       (``noise = 0.001`` is the paper's choice for image classification; 0 disables it).
       The noise is drawn from ``context["generator"]`` (``ConfigError`` if missing).
       On a Gram (CKKS), steps 1-3 give the coefficients and the result's typed ``noise_std``
       field tells the aggregation step how much noise to add to the decrypted aggregate
       (``info["noise_std"]`` keeps the same number for the round's record).

    Threat model: fewer than half the clients inject backdoors; the backdoored updates
    differ in direction (caught by 1) or magnitude (bounded by 2), and the residual is
    smoothed by 4.  Uniform client weights, as in the paper.  Requires scikit-learn's
    ``HDBSCAN`` (scikit-learn >= 1.3).

    References
    ----------
    T. D. Nguyen, P. Rieger, H. Chen, et al. FLAME: Taming Backdoors in Federated Learning.
    USENIX Security 2022.
    """

    name = "flame"
    runs_on = frozenset({Reveals.UPDATES, Reveals.GRAM, Reveals.BUCKETS})

    def __init__(self, *, noise: float = 0.001, chunk: int = DEFAULT_CHUNK) -> None:
        if not (isinstance(noise, (int, float)) and 0 <= noise < float("inf")):
            raise ConfigError(f"noise (the noise std as a multiple of the clipping bound) must be >= 0, got {noise!r}")
        self.noise = float(noise)
        self.chunk = int(chunk)

    def _decide(self, g: torch.Tensor, ids: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...], dict[str, Any]]:
        norms = torch.diagonal(g).clamp_min(0).sqrt()
        coeffs, admitted, s = flame_coefficients(cosine_from_gram(g), norms)
        flagged = tuple(ids[i] for i in (~admitted).nonzero().flatten().tolist())
        return coeffs, flagged, {"clip_bound": s, "noise_std": self.noise * s, "admitted": int(admitted.sum())}

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        coeffs, flagged, info = self._decide(gram_matrix(updates, chunk=self.chunk), client_ids)
        agg = combine(coeffs, updates, dtype=torch.float64)
        if self.noise > 0:
            gen = _generator(context, "FLAME (noise > 0)")
            agg += torch.randn(agg.shape, generator=gen, dtype=torch.float64).to(agg.device) * info["noise_std"]
        return AggregationResult(agg.to(updates.dtype), client_ids, weights=coeffs, flagged=flagged, info=info,
                                 noise_std=float(info["noise_std"]))

    def decide_gram(self, gram: Gram, weights: torch.Tensor, *, context: Mapping[str, Any]) -> AggregationResult:
        coeffs, flagged, info = self._decide(gram.inner.to(torch.float64), gram.client_ids)
        return AggregationResult(None, gram.client_ids, weights=coeffs, flagged=flagged, info=info,
                                 noise_std=float(info["noise_std"]))


@DEFENSES.register("foolsgold")
class FoolsGold(Defense):
    """FoolsGold (Fung, Yoon, Beschastnikh, RAID 2020): down-weight clients that look alike.

    Keeps each client's summed update history (explicit state: ``state_dict()``), computes
    pairwise cosine similarities of the histories, and gives each client a learning rate
    that falls as its maximum similarity to another client rises (with the paper's
    pardoning and logit steps).  Sybils pushing one poisoned objective have near-identical
    histories and get rates near 0; ``flagged`` lists clients with rate 0.

    The paper sums ``sum_i alpha_i u_i``; here the result is normalised by ``sum_i alpha_i``
    so it stays on the scale of a mean (and is 0 when every rate is 0).  The optional
    feature-importance weighting of the paper is not applied.

    Threat model: a group of colluding sybils with a common objective; assumes honest
    clients' data is diverse (non-IID), otherwise honest clients are penalised too.  Needs
    the same client ids across rounds and their coordinates (not a Gram, not buckets).

    References
    ----------
    C. Fung, C. J. M. Yoon, I. Beschastnikh. The Limitations of Federated Learning in Sybil
    Settings. RAID 2020.
    """

    name = "foolsgold"
    runs_on = frozenset({Reveals.UPDATES})

    def __init__(self, *, chunk: int = DEFAULT_CHUNK) -> None:
        self.chunk = int(chunk)
        self._history: dict[int, torch.Tensor] = {}

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        d = updates.shape[1]
        rows = []
        for i, cid in enumerate(client_ids):
            prev = self._history.get(cid)
            if prev is not None and prev.numel() != d:
                raise ConfigError(f"FoolsGold history of client {cid} has {prev.numel()} entries, update has {d}")
            upd = updates[i].to(torch.float64)
            h = upd.clone() if prev is None else prev.to(updates.device) + upd
            self._history[cid] = h
            rows.append(h)
        wv = foolsgold_weights(gram_matrix(torch.stack(rows), chunk=self.chunk))
        total = wv.sum()
        coeffs = wv / total if float(total) > 0 else torch.zeros_like(wv)
        flagged = tuple(client_ids[i] for i in (wv <= 0).nonzero().flatten().tolist())
        return AggregationResult(combine(coeffs, updates), client_ids, weights=coeffs, scores=wv, flagged=flagged)

    def state_dict(self) -> dict[str, Any]:
        return {"history": {cid: h.detach().cpu().clone() for cid, h in self._history.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        hist = state.get("history", {})
        if not isinstance(hist, Mapping) or not all(isinstance(h, torch.Tensor) for h in hist.values()):
            raise ConfigError("FoolsGold state 'history' must map client ids to tensors")
        self._history = {int(cid): h.to(torch.float64).clone() for cid, h in hist.items()}


@DEFENSES.register("dnc", positional="f")
class DnC(Defense):
    """Divide-and-Conquer (Shejwalkar & Houmansadr, NDSS 2021): spectral outlier removal.

    ``iterations`` times: sample ``subsample`` coordinates (``context["generator"]``,
    ``ConfigError`` if missing), centre the sub-vectors, score each client by its squared
    projection on the top right singular vector, and keep the ``n - floor(c f)`` lowest
    scores.  The aggregate is the mean of the clients kept in every iteration; the others
    are flagged.

    Threat model: up to ``f`` Byzantine clients crafting updates that are individually
    plausible (e.g. min-max, min-sum, ALIE) but jointly shifted along a common direction.
    Uniform weights, as in the paper.  Needs coordinates.

    References
    ----------
    V. Shejwalkar, A. Houmansadr. Manipulating the Byzantine: Optimizing Model Poisoning
    Attacks and Defenses for Federated Learning. NDSS 2021.
    """

    name = "dnc"
    runs_on = frozenset({Reveals.UPDATES, Reveals.BUCKETS})

    def __init__(self, f: int | None = None, *, iterations: int = 5, subsample: int = 10_000, c: float = 1.0) -> None:
        self.f = check_optional_f(f)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(f"iterations must be a positive integer, got {iterations!r}")
        if isinstance(subsample, bool) or not isinstance(subsample, int) or subsample < 1:
            raise ConfigError(f"subsample must be a positive integer, got {subsample!r}")
        if not (isinstance(c, (int, float)) and c >= 0):
            raise ConfigError(f"c (the filtering fraction multiplier) must be >= 0, got {c!r}")
        self.iterations = iterations
        self.subsample = subsample
        self.c = float(c)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        f = effective_f(self.f, context, self)
        gen = _generator(context, "DnC")
        good, scores = dnc_good_set(
            updates, f, iterations=self.iterations, subsample=self.subsample, c=self.c, generator=gen
        )
        coeffs = good.to(torch.float64) / good.sum()
        flagged = tuple(client_ids[i] for i in (~good).nonzero().flatten().tolist())
        return AggregationResult(
            combine(coeffs, updates), client_ids, weights=coeffs, scores=scores, flagged=flagged, info={"f": f}
        )
