"""Model-poisoning attacks: the malicious clients rewrite their own update vectors.

Every attack here receives the malicious clients' own ``[m, d]`` updates (what they would have
sent if honest) and returns the ``[m, d]`` rows they send instead.  Attacks that, in their paper,
assume the adversary knows the honest updates of the round take ``omniscient=True`` (the
default where the paper's attack is the full-knowledge one) and read
``AttackContext.honest_updates``; with ``omniscient=False`` they estimate the honest statistics
from the malicious clients' own genuine updates, the "partial knowledge" setting of the papers.

The pure math (ALIE's z, the Min-Max / Min-Sum search, Fang's bounds) lives in plain
functions beside the classes that use them; the attack on Krum simulates Krum with the
library's one ``krum_scores`` (``securefml.defenses.distance``), so attack and defense cannot
disagree on what Krum selects.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from securefml.attacks.base import Attack, AttackContext
from securefml.attacks.registry import ATTACKS
from securefml.defenses.distance import krum_scores, nearest_sums
from securefml.defenses.linalg import sq_distances_from_gram, stable_gram
from securefml.errors import ConfigError

__all__ = [
    "SignFlip",
    "Gaussian",
    "Scaling",
    "ModelReplacement",
    "ALIE",
    "IPM",
    "MinMax",
    "MinSum",
    "FangKrum",
    "FangTrimmedMean",
    "Mimic",
    "alie_z",
    "benign_reference",
    "minmax_gamma",
    "perturbation_direction",
]


# -- shared helpers -------------------------------------------------------------------------


def benign_reference(own: torch.Tensor, context: AttackContext, *, omniscient: bool) -> torch.Tensor:
    """The ``[h, d]`` updates an attack treats as the benign ones.

    With ``omniscient`` the round's honest updates (``context.honest_updates``) must be
    present: the federation loop passes them only to attacks whose ``omniscient`` is True, so
    their absence is a configuration error, not something to paper over.  Otherwise the
    malicious clients' own genuine updates stand in for the honest ones.
    """
    if omniscient:
        if context.honest_updates is None or context.honest_updates.shape[0] == 0:
            raise ConfigError("an omniscient attack needs AttackContext.honest_updates (none were given)")
        ref = context.honest_updates
        if ref.dim() != 2 or ref.shape[1] != own.shape[1]:
            raise ConfigError(
                f"honest updates of shape {tuple(ref.shape)} do not match own updates of shape {tuple(own.shape)}"
            )
        return ref.to(device=own.device)
    return own


def _positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not (ok and math.isfinite(value)):
        raise ConfigError(f"{name} must be {'non-negative' if allow_zero else 'positive'} and finite, got {value}")
    return value


def _random(kind: str, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Float64 ``randn``/``rand`` drawn on the generator's device, then moved to ``device``."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    draw = torch.randn if kind == "normal" else torch.rand
    return draw(shape, generator=generator, dtype=torch.float64, device=gen_device).to(device)


def _rows(vector: torch.Tensor, m: int, dtype: torch.dtype) -> torch.Tensor:
    return vector.to(dtype).unsqueeze(0).expand(m, -1).clone()


def perturbation_direction(benign: torch.Tensor, kind: str) -> torch.Tensor:
    """Shejwalkar & Houmansadr's perturbation vectors (computed in float64).

    ``"unit"``: the inverse unit vector ``-mean / ||mean||``; ``"std"``: the inverse standard
    deviation ``-std``; ``"sign"``: the inverse sign ``-sign(mean)``.
    """
    b = benign.to(torch.float64)
    mu = b.mean(0)
    if kind == "unit":
        norm = mu.norm()
        return -mu / norm if norm > 0 else torch.zeros_like(mu)
    if kind == "std":
        return -(b.std(0, correction=1) if b.shape[0] > 1 else torch.zeros_like(mu))
    if kind == "sign":
        return -torch.sign(mu)
    raise ConfigError(f"unknown perturbation {kind!r}; choose one of: sign, std, unit")


# -- simple attacks --------------------------------------------------------------------------


@ATTACKS.register("signflip", positional="scale")
class SignFlip(Attack):
    """Send ``-scale`` times the honest update one would have sent (bit/sign flipping).

    Threat model: each malicious client acts on its own data only (not omniscient).
    Reference: Allen-Zhu et al., 2020; the "bit-flip" attack of Karimireddy et al., 2021.
    """

    name = "signflip"

    def __init__(self, scale: float = 1.0) -> None:
        if not scale > 0:
            raise ConfigError(f"SignFlip scale must be positive, got {scale}")
        self.scale = float(scale)

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        return -self.scale * own


@ATTACKS.register("gaussian", positional="std")
class Gaussian(Attack):
    """Send i.i.d. Gaussian noise ``N(mean, std^2 I)`` instead of an update.

    Threat model: non-omniscient, non-colluding noise; the weakest Byzantine baseline.  With
    ``around_own=True`` the noise is centred on each client's own update (a noisy client).

    Parameters
    ----------
    std:
        Standard deviation of every coordinate.
    mean:
        Centre of the noise (ignored with ``around_own``).
    around_own:
        Centre the noise on the client's own update instead of ``mean``.

    References
    ----------
    Blanchard et al., Machine Learning with Adversaries, NeurIPS 2017 ("Gaussian" Byzantine);
    Fang et al., USENIX Security 2020 (Gaussian attack baseline).
    """

    name = "gaussian"

    def __init__(self, std: float = 1.0, *, mean: float = 0.0, around_own: bool = False) -> None:
        self.std = _positive("Gaussian std", std)
        if not math.isfinite(mean):
            raise ConfigError(f"Gaussian mean must be finite, got {mean}")
        self.mean = float(mean)
        self.around_own = bool(around_own)

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        noise = _random("normal", tuple(own.shape), context.generator, own.device)
        centre = own.to(torch.float64) if self.around_own else torch.full_like(noise, self.mean)
        return (centre + self.std * noise).to(own.dtype)


@ATTACKS.register("scaling", positional="scale")
class Scaling(Attack):
    """Boost the malicious update by a factor (Bagdasaryan et al.'s model replacement).

    Bagdasaryan et al. scale the attacker's update ``X - G`` by ``gamma = n / eta`` so that,
    after the server averages ``n`` updates with server learning rate ``eta``, the global model
    is replaced by the attacker's ``X``.  With ``m`` colluding attackers sending the same
    update, each needs ``gamma = n / (eta * m)``; that is the factor used when ``scale`` is None.

    Threat model: non-omniscient; the attacker knows the cohort size and the server learning
    rate.  Assumes mean aggregation; norm bounding (Sun et al. 2019) or FLAME cap the boost.

    Parameters
    ----------
    scale:
        Fixed boost factor, or None for the model-replacement factor ``n / (eta * m)``.
    server_lr:
        The server learning rate ``eta`` the replacement factor assumes.

    References
    ----------
    Bagdasaryan et al., How To Backdoor Federated Learning, AISTATS 2020.
    """

    name = "scaling"

    def __init__(self, scale: float | None = None, *, server_lr: float = 1.0) -> None:
        self.scale = None if scale is None else _positive("Scaling scale", scale)
        self.server_lr = _positive("server_lr", server_lr)

    def factor(self, context: AttackContext) -> float:
        """The boost actually applied this round."""
        if self.scale is not None:
            return self.scale
        return context.n_clients / (self.server_lr * max(1, context.n_malicious))

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        return self.factor(context) * own


@ATTACKS.register("model-replacement")
class ModelReplacement(Scaling):
    """``Scaling`` with Bagdasaryan et al.'s replacement factor ``n / (eta * m)`` (no fixed scale)."""

    name = "model-replacement"

    def __init__(self, *, server_lr: float = 1.0) -> None:
        super().__init__(None, server_lr=server_lr)


# -- A Little Is Enough and Inner Product Manipulation --------------------------------------


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s ``z_max``: ``s = floor(n/2 + 1) - f``, ``z = Phi^{-1}((n - s) / n)``.

    ``s`` is how many honest clients the attacker needs to "recruit" for a majority; ``z`` is
    the largest deviation (in standard deviations) such that, under a normal model, the
    malicious value is still closer to the mean than those ``s`` honest values.

    >>> round(alie_z(25, 5), 4)
    0.4677
    """
    if n < 2 or not 0 < f < n:
        raise ConfigError(f"ALIE needs n >= 2 and 0 < f < n, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0 < p < 1:
        raise ConfigError(f"ALIE's z is undefined for n={n}, f={f} (needs f < n/2 + 1 and s < n)")
    return NormalDist().inv_cdf(p)


@ATTACKS.register("alie", positional="z")
class ALIE(Attack):
    """A Little Is Enough: every malicious client sends ``mean - z * std`` of the benign updates.

    The statistics are per coordinate over the benign updates (the honest ones when omniscient,
    else the malicious clients' own genuine updates, as in the paper's setting).  ``z`` defaults
    to Baruch et al.'s ``z_max`` from the cohort size ``n`` and the number of malicious clients
    ``f`` (:func:`alie_z`).  The standard deviation is the unbiased one (``1/(k-1)``), as in
    Karimireddy et al.'s reference code.

    Threat model: ``f`` colluding clients, small per-coordinate shifts that stay within the
    spread of honest updates, so distance- and median-based rules keep them.

    Parameters
    ----------
    z:
        Deviation in standard deviations; None computes ``z_max(n, f)`` every round.
    omniscient:
        Use the round's honest updates (True) or the malicious clients' own (False).

    References
    ----------
    Baruch, Baruch & Goldberg, A Little Is Enough: Circumventing Defenses For Distributed
    Learning, NeurIPS 2019.  ByzFL's ``ALittleIsEnough`` adds ``+tau * std`` instead.
    """

    name = "alie"

    def __init__(self, z: float | None = None, *, omniscient: bool = True) -> None:
        if z is not None and not math.isfinite(z):
            raise ConfigError(f"ALIE z must be finite, got {z}")
        self.z = None if z is None else float(z)
        self.omniscient = bool(omniscient)

    def z_for(self, context: AttackContext) -> float:
        """The ``z`` applied in this round.

        A random cohort can hold a Byzantine majority (``f > n // 2``: a cohort of 10 at 25 %
        does so in about 2 % of rounds).  The paper's formula has no ``z`` there (``s <= 0``: the
        attackers need no honest recruit), and raising would end an evaluation run on a draw of
        the cohort, not on anything the user configured.  Such a round uses the ``z`` of the
        largest ``f`` the formula covers, ``f = n // 2`` (``s = 1``), the strongest deviation in
        the paper's family; no rule is expected to resist that round anyway.
        """
        if self.z is not None:
            return self.z
        return alie_z(context.n_clients, min(context.n_malicious, context.n_clients // 2))

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        benign = benign_reference(own, context, omniscient=self.omniscient).to(torch.float64)
        mu = benign.mean(0)
        std = benign.std(0, correction=1) if benign.shape[0] > 1 else torch.zeros_like(mu)
        return _rows(mu - self.z_for(context) * std, own.shape[0], own.dtype)


@ATTACKS.register("ipm", positional="epsilon")
class IPM(Attack):
    """Inner Product Manipulation: every malicious client sends ``-epsilon * mean(benign)``.

    With a small ``epsilon`` the malicious rows sit close to the origin, inside the honest
    cloud, yet make the inner product of the aggregate with the true gradient negative once
    the robust rule lets enough of them through.

    Threat model: ``f`` colluding omniscient clients (the paper's setting).

    Parameters
    ----------
    epsilon:
        Attack strength; 0.1 (small) and 100 (large) are the paper's two regimes.
    omniscient:
        Use the round's honest updates (True) or the malicious clients' own (False).

    References
    ----------
    Xie, Koyejo & Gupta, Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
    Manipulation, UAI 2020.
    """

    name = "ipm"

    def __init__(self, epsilon: float = 0.1, *, omniscient: bool = True) -> None:
        self.epsilon = _positive("IPM epsilon", epsilon)
        self.omniscient = bool(omniscient)

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        benign = benign_reference(own, context, omniscient=self.omniscient).to(torch.float64)
        return _rows(-self.epsilon * benign.mean(0), own.shape[0], own.dtype)


# -- Min-Max / Min-Sum ----------------------------------------------------------------------


def minmax_gamma(
    benign: torch.Tensor,
    direction: torch.Tensor,
    *,
    objective: str = "minmax",
    gamma_init: float = 10.0,
    tol: float = 1e-5,
    max_iter: int = 200,
) -> float:
    """The largest ``gamma`` such that ``mean + gamma * direction`` stays inconspicuous.

    ``"minmax"``: its largest distance to a benign update is at most the largest pairwise
    benign distance.  ``"minsum"``: its sum of squared distances to the benign updates is at
    most the largest such sum of any benign update.  Shejwalkar & Houmansadr's search: grow
    ``gamma`` while the condition holds, then halve the step around the boundary until it is
    below ``tol``.  Returns the largest ``gamma`` found that satisfies the condition (0 if
    none does).
    """
    b = benign.to(torch.float64)
    p = direction.to(torch.float64)
    mu = b.mean(0)
    d2 = torch.cdist(b, b).pow(2)
    if objective == "minmax":
        threshold = d2.max()
    elif objective == "minsum":
        threshold = d2.sum(1).max()
    else:
        raise ConfigError(f"unknown objective {objective!r}; choose minmax or minsum")

    # ||b_i - mu - gamma p||^2 = a_i - 2 gamma c_i + gamma^2 pp: each test costs O(h), not O(h d).
    centred = b - mu
    a = centred.pow(2).sum(1)
    c = centred @ p
    pp = p @ p

    def ok(gamma: float) -> bool:
        dist2 = (a - 2 * gamma * c + gamma * gamma * pp).clamp_min(0)
        score = dist2.max() if objective == "minmax" else dist2.sum()
        return bool(score <= threshold)

    if not ok(0.0) or p.norm() == 0:
        return 0.0
    gamma = float(gamma_init)
    # Grow until the condition fails (the paper starts from a generous gamma_init).
    grow = 0
    while ok(gamma) and grow < 60:
        gamma *= 2.0
        grow += 1
    lo, hi = 0.0, gamma
    for _ in range(max_iter):
        if hi - lo <= tol * max(1.0, lo):
            break
        mid = 0.5 * (lo + hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


@ATTACKS.register("minmax", positional="perturbation")
class MinMax(Attack):
    """Min-Max: ``mean + gamma * p`` with the largest ``gamma`` whose farthest benign update is
    no farther than the two farthest benign updates are from each other.

    All malicious clients send the same row.  Because that row is never an outlier by
    distance, distance-based rules (Krum, Bulyan, trimmed mean) keep it.

    Threat model: ``f`` colluding clients; omniscient (the paper's "AGR-agnostic, full
    knowledge of benign gradients") or estimating from their own updates.

    Parameters
    ----------
    perturbation:
        ``"unit"`` (inverse unit vector), ``"std"`` (inverse standard deviation) or ``"sign"``.
    omniscient:
        Use the round's honest updates (True) or the malicious clients' own (False).

    References
    ----------
    Shejwalkar & Houmansadr, Manipulating the Byzantine: Optimizing Model Poisoning Attacks
    and Defenses for Federated Learning, NDSS 2021.
    """

    name = "minmax"
    objective = "minmax"

    def __init__(self, perturbation: str = "std", *, omniscient: bool = True, tol: float = 1e-5) -> None:
        if perturbation not in ("unit", "std", "sign"):
            raise ConfigError(f"unknown perturbation {perturbation!r}; choose one of: sign, std, unit")
        self.perturbation = perturbation
        self.omniscient = bool(omniscient)
        self.tol = _positive("tol", tol)

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        benign = benign_reference(own, context, omniscient=self.omniscient).to(torch.float64)
        p = perturbation_direction(benign, self.perturbation)
        gamma = minmax_gamma(benign, p, objective=self.objective, tol=self.tol)
        context.attack_info[self.name] = {"gamma": gamma}
        return _rows(benign.mean(0) + gamma * p, own.shape[0], own.dtype)


@ATTACKS.register("minsum", positional="perturbation")
class MinSum(MinMax):
    """Min-Sum: like Min-Max but bounds the *sum* of squared distances to the benign updates by
    the largest such sum of any benign update (Shejwalkar & Houmansadr, NDSS 2021)."""

    name = "minsum"
    objective = "minsum"


# -- Fang et al. ----------------------------------------------------------------------------


@ATTACKS.register("fang-krum")
class FangKrum(Attack):
    """Fang et al.'s full-knowledge attack on Krum.

    The malicious clients all send ``-lambda * s`` where ``s = sign(mean of honest updates)``
    (the direction the model would move without attack), with the largest ``lambda`` for which
    Krum selects a malicious row.  ``lambda`` starts from the paper's upper bound and is halved
    until Krum picks a malicious row or it falls below ``threshold`` (then ``threshold`` is
    sent: the attack failed but still pushes against the honest direction).  Krum is simulated
    with ``f = n_malicious`` and Blanchard et al.'s ``n - f - 2`` neighbours.

    Threat model: ``c`` colluding omniscient clients who know the aggregation rule is Krum.
    Written in update space: the paper's global model ``w_Re`` is the zero update.

    References
    ----------
    Fang, Cao, Jia & Gong, Local Model Poisoning Attacks to Byzantine-Robust Federated
    Learning, USENIX Security 2020 (section 3.3, "Attacking Krum").
    """

    name = "fang-krum"

    def __init__(self, *, threshold: float = 1e-5, omniscient: bool = True) -> None:
        self.threshold = _positive("FangKrum threshold", threshold)
        self.omniscient = bool(omniscient)

    @staticmethod
    def lambda_upper_bound(benign: torch.Tensor, n_total: int, c: int) -> float:
        """The paper's bound on ``lambda`` (distances to the zero update play ``D(w_i, w_Re)``)."""
        b = benign.to(torch.float64)
        h, d = b.shape
        dist = torch.cdist(b, b)  # the paper's D is the Euclidean distance, not its square
        nearest = nearest_sums(dist, min(max(1, n_total - c - 2), h - 1)).min()
        denom = max(1, n_total - 2 * c - 1) * math.sqrt(d)
        return float(nearest / denom + b.norm(dim=1).max() / math.sqrt(d))

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        benign = benign_reference(own, context, omniscient=self.omniscient).to(torch.float64)
        m = own.shape[0]
        s = torch.sign(benign.mean(0))
        n_total = benign.shape[0] + m if self.omniscient else context.n_clients
        lam = self.lambda_upper_bound(benign, n_total, m)
        chosen = self.threshold
        while lam >= self.threshold:
            crafted = _rows(-lam * s, m, torch.float64)
            rows = torch.cat([crafted, benign])
            scores = krum_scores(sq_distances_from_gram(stable_gram(rows)), context.n_malicious or m)
            if int(scores.argmin()) < m:
                chosen = lam
                break
            lam /= 2.0
        context.attack_info[self.name] = {"lambda": chosen}
        return _rows(-chosen * s, m, own.dtype)


@ATTACKS.register("fang-trmean", positional="b")
class FangTrimmedMean(Attack):
    """Fang et al.'s full-knowledge attack on trimmed mean (and median).

    For each coordinate ``j`` let ``s_j`` be the sign of the honest mean (the direction the
    parameter moves without attack) and ``w_max,j`` / ``w_min,j`` the honest extremes.  If
    ``s_j = -1`` the malicious values are drawn uniformly from ``[w_max,j, b * w_max,j]`` (or
    ``[w_max,j, w_max,j / b]`` when ``w_max,j <= 0``); if ``s_j >= 0``, from
    ``[w_min,j / b, w_min,j]`` (or ``[b * w_min,j, w_min,j]`` when ``w_min,j <= 0``).  Every
    malicious value thus lies beyond the honest extreme on the side opposite to ``s_j``, which
    drags the trimmed statistics against the honest direction.

    Threat model: ``c`` colluding omniscient clients; ``b > 1`` (the paper uses 2).

    References
    ----------
    Fang, Cao, Jia & Gong, USENIX Security 2020 (section 3.4, "Attacking Trimmed Mean").
    """

    name = "fang-trmean"

    def __init__(self, b: float = 2.0, *, omniscient: bool = True) -> None:
        if not b > 1 or not math.isfinite(b):
            raise ConfigError(f"FangTrimmedMean b must be > 1, got {b}")
        self.b = float(b)
        self.omniscient = bool(omniscient)

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        benign = benign_reference(own, context, omniscient=self.omniscient).to(torch.float64)
        m = own.shape[0]
        s = torch.sign(benign.mean(0))
        wmax, wmin = benign.max(0).values, benign.min(0).values
        # Interval [lo, hi] per coordinate, following the four cases of the paper.
        lo = torch.where(s < 0, wmax, torch.where(wmin > 0, wmin / self.b, self.b * wmin))
        hi = torch.where(s < 0, torch.where(wmax > 0, self.b * wmax, wmax / self.b), wmin)
        lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
        u = _random("uniform", (m, benign.shape[1]), context.generator, own.device)
        return (lo + u * (hi - lo)).to(own.dtype)


# -- Mimic ----------------------------------------------------------------------------------


@ATTACKS.register("mimic", positional="target")
class Mimic(Attack):
    """Every malicious client copies one honest client's update.

    Copying an honest update is undetectable by any rule that looks at updates only, yet it
    over-weights one client and, on non-IID data, biases the aggregate towards that client's
    distribution.  Karimireddy et al. choose the honest client whose update lies farthest
    along the top principal direction of the honest updates; here that direction is estimated
    from the current round (the paper accumulates it over a warm-up phase).  A fixed ``target``
    index copies that honest row instead (ByzFL's behaviour).

    Threat model: omniscient (needs the honest updates); ``f`` colluding clients.

    References
    ----------
    Karimireddy, He & Jaggi, Byzantine-Robust Learning on Heterogeneous Datasets via
    Bucketing, ICLR 2022.
    """

    name = "mimic"
    omniscient = True

    def __init__(self, target: int | None = None) -> None:
        if target is not None and int(target) < 0:
            raise ConfigError(f"Mimic target must be a non-negative honest index, got {target}")
        self.target = None if target is None else int(target)

    def choose(self, honest: torch.Tensor) -> int:
        """Index of the honest row to copy."""
        if self.target is not None:
            if self.target >= honest.shape[0]:
                raise ConfigError(f"Mimic target {self.target} but only {honest.shape[0]} honest updates")
            return self.target
        h = honest.to(torch.float64)
        centred = h - h.mean(0)
        if h.shape[0] < 2 or centred.abs().max() == 0:
            return 0
        # The projections on the top right-singular vector are u_1 * s_1: the top eigenvector of
        # the small [h, h] Gram matrix gives them without an SVD of the [h, d] matrix.
        _, vecs = torch.linalg.eigh(centred @ centred.T)
        return int(vecs[:, -1].abs().argmax())

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        honest = benign_reference(own, context, omniscient=True)
        idx = self.choose(honest)
        context.attack_info[self.name] = {"target": idx}
        return _rows(honest[idx], own.shape[0], own.dtype)
