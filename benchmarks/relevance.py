"""Relevance-aware personalized aggregation on ``digits-clusters``; prints JSON.

    nice -n 10 python benchmarks/relevance.py [--seeds 0 1 2] [--rounds 30] [--only main ckks ...] [--out F]
    python benchmarks/relevance.py --combine a.json b.json ... --out benchmarks/json/relevance.json

Sections (``--only`` picks some):

* ``main``: personalized accuracy of held-out clients (fine-tuned ``--finetune`` steps on their
  support set) for relevance aggregation, an oracle that aggregates within the true groups,
  FedAvg+FT and MAML, same rounds and cohort size.
* ``shift``: a quarter of the clients move to another group at round ``--shift-round``;
  personalized accuracy of the training clients (their own models) every few rounds, relevance
  versus the oracle that knows the new groups.
* ``ckks`` / ``secagg``: the same relevance run under CKKS (encrypted Gram and weighted sums)
  and under SecAgg+ relevance grouping; differences to plaintext.
* ``hetero``: Co-LoRA adapters on three MLP shapes; P, Q shared across architectures versus
  each architecture group trained alone.
* ``malicious``: 20% malicious clients (sign flip, ALIE), relevance alone versus relevance after
  a robust rule; accuracy and the weight honest clients give malicious ones.

Every comparison is between runs of the same script on the same seeds; nothing is compared
with a number typed in from an earlier run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from peers import write_report

from securefml.attacks import make_attack
from securefml.client import Client
from securefml.data import ClusteredDataset, make_digits_clusters
from securefml.data.base import Task
from securefml.defenses import make_defense
from securefml.experiment import RunConfig, run_experiment
from securefml.meta import LEARNERS, MetaConfig
from securefml.models import make_model
from securefml.protocols import CKKS, AggregationProtocol, Plaintext, SecAggPlus
from securefml.relevance import (
    HeteroConfig,
    RelevanceAggregation,
    RelevanceConfig,
    RelevancePolicy,
    RelevanceServer,
    TaskVectorConfig,
    TaskVectorizer,
    run_heterogeneous_budgets,
)


@dataclass
class Budget:
    rounds: int
    cohort: int
    local_steps: int
    local_lr: float
    finetune: int
    temperature: float
    learner: str = "maml"


#: client-side configuration of each learner (MAML: the project's classification defaults, the
#: same client step as the MAML baseline; its server step is the relevance-weighted average)
def learner_config(name: str, budget: Budget) -> MetaConfig:
    if name == "maml":
        return MetaConfig(inner_steps=5, inner_lr=0.1, outer_lr=1.0, outer_steps=1)
    return MetaConfig(budget.local_steps, budget.local_lr, 1.0, 1)


class OracleVectorizer:
    """Task vector = one-hot of the client's true group: relevance weights become group averages."""

    def __init__(self, groups: dict[int, int], n_groups: int) -> None:
        self.groups = dict(groups)
        self.n_groups = n_groups
        self.config = TaskVectorConfig(smoothing=0.0)

    def __call__(self, task: Task, *, update: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        v = torch.zeros(self.n_groups)
        v[self.groups[task.client_id]] = 1.0
        return v


def build(data: ClusteredDataset, budget: Budget, protocol: AggregationProtocol, *, seed: int, oracle: bool = False,
          defense: str = "mean", learner_name: str | None = None, blind: bool = False) -> RelevanceServer:
    model = make_model(data, seed=seed)
    name = learner_name or budget.learner
    learner = LEARNERS.create(name, model=model, config=learner_config(name, budget))
    step = RelevanceAggregation(RelevanceConfig(temperature=budget.temperature, blind=blind), protocol=protocol)
    vec: Any = TaskVectorizer(model, learner.init_params())
    if oracle:
        groups = {**data.groups_at(0), **{t.client_id: g for t, g in zip(data.heldout, data.heldout_groups)}}
        vec = OracleVectorizer(groups, len(data.permutations))
    return RelevanceServer(learner, protocol, make_defense(defense), relevance=step, vectorizer=vec)


def train(server: RelevanceServer, data: ClusteredDataset, budget: Budget, *, seed: int, malicious: float = 0.0,
          attack: str = "none", every: int = 0, rounds: int | None = None) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    n_mal = int(round(malicious * len(data.train)))
    mal_ids = set(torch.randperm(len(data.train), generator=gen)[:n_mal].tolist())
    atk = make_attack(attack) if n_mal else None
    clients = [Client.build(t, attack=atk if i in mal_ids else None, generator=gen) for i, t in enumerate(data.train)]
    curve = []
    mal_weight = []
    nbytes = refused = 0
    t0 = time.perf_counter()
    for rnd in range(rounds or budget.rounds):
        if data.shift_round is not None and rnd == data.shift_round:
            for cid, task, g in data.shifted:
                clients[cid].task = task
                if isinstance(server.vectorizer, OracleVectorizer):
                    server.vectorizer.groups[cid] = g
        idx = sorted(torch.randperm(len(clients), generator=gen)[: budget.cohort].tolist())
        rec = server.run_round(rnd, [clients[i] for i in idx], generator=gen)
        nbytes += rec.bytes_uploaded
        refused += len(rec.rejected)
        if "malicious_weight" in rec.extras:
            mal_weight.append(rec.extras["malicious_weight"])
        if every and (rnd + 1) % every == 0:
            honest = [c.task for c in clients if not c.malicious]
            score = server.evaluate_clients(honest, steps=budget.finetune).mean
            curve.append({"round": rnd + 1, "train_clients": score})
    out: dict[str, Any] = {"train_seconds": time.perf_counter() - t0, "bytes_uploaded": nbytes,
                           "refused_rows": refused}
    held = server.personalize_new(data.heldout, steps=budget.finetune)
    groups = {t.client_id: g for t, g in zip(data.heldout, data.heldout_groups)}
    out["personalized"] = held.mean
    out["per_group"] = held.by_group(groups)
    if curve:
        out["curve"] = curve
    if mal_weight:
        out["malicious_weight"] = statistics.fmean(mal_weight)
    return out


def baseline(data: ClusteredDataset, budget: Budget, algorithm: str, seed: int, *, server_sgd: bool = False) -> float:
    """Personalized accuracy of a global baseline (``run_experiment``), same rounds, cohort, fine-tuning.

    ``server_sgd``: MAML with the relevance runs' server step (the cohort's meta-updates averaged
    and applied at rate 1.0, plain SGD) instead of the project's MAML default (Adam at 0.005),
    so the comparison does not rest on a server optimizer the relevance runs do not use.
    """
    extra: dict[str, Any] = {}
    if algorithm == "fedavg":
        extra = dict(inner_steps=budget.local_steps, inner_lr=budget.local_lr, server_opt="sgd", server_lr=1.0)
    elif server_sgd:
        extra = dict(server_opt="sgd", server_lr=1.0)
    cfg = RunConfig(dataset="digits-clusters", algorithm=algorithm, rounds=budget.rounds,
                    clients_per_round=budget.cohort, seed=seed, finetune_steps=budget.finetune, **extra)
    res = run_experiment(cfg, dataset=data)
    return float(res.metrics["personalized"]["accuracy"])


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def paired_interval(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of the per-seed differences ``a - b`` with a two-sided 95 % Student-t interval."""
    d = [x - y for x, y in zip(a, b)]
    m = statistics.fmean(d)
    if len(d) < 2:
        return {"mean": m, "low": float("nan"), "high": float("nan"), "n": float(len(d))}
    from scipy.stats import t  # scikit-learn's dependency; only the benchmark needs it
    half = float(t.ppf(0.975, len(d) - 1)) * statistics.stdev(d) / len(d) ** 0.5
    return {"mean": m, "low": m - half, "high": m + half, "n": float(len(d))}


def section_main(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    rows: dict[str, list[float]] = {"relevance": [], "oracle": [], "relevance_fedavg": [], "oracle_fedavg": [],
                                    "fedavg+ft": [], "maml": [], "maml_server_sgd": []}
    per_seed = []
    for seed in args.seeds:
        data = make_digits_clusters(seed=seed, n_heldout=args.heldout, k_shot=args.k_shot, query=args.query)
        got: dict[str, Any] = {}
        got["relevance"] = train(build(data, budget, Plaintext(), seed=seed), data, budget, seed=seed)
        got["oracle"] = train(build(data, budget, Plaintext(), seed=seed, oracle=True), data, budget, seed=seed)
        got["relevance_fedavg"] = train(build(data, budget, Plaintext(), seed=seed, learner_name="fedavg"), data,
                                        budget, seed=seed)
        got["oracle_fedavg"] = train(build(data, budget, Plaintext(), seed=seed, oracle=True, learner_name="fedavg"),
                                     data, budget, seed=seed)
        for k, v in got.items():
            rows[k].append(v["personalized"])
        fed = baseline(data, budget, "fedavg", seed)
        maml = baseline(data, budget, "maml", seed)
        maml_sgd = baseline(data, budget, "maml", seed, server_sgd=True)
        rows["fedavg+ft"].append(fed)
        rows["maml"].append(maml)
        rows["maml_server_sgd"].append(maml_sgd)
        per_seed.append({"seed": seed, **{k: {"personalized": v["personalized"], "per_group": v["per_group"]}
                                          for k, v in got.items()}, "fedavg+ft": fed, "maml": maml,
                         "maml_server_sgd": maml_sgd})
    out: dict[str, Any] = {k: summary(v) for k, v in rows.items()}
    rel_m = out["relevance"]["mean"]
    # MAML gets the better of its two server steps (chosen on these held-out scores: in MAML's favour)
    best = max(("maml", "maml_server_sgd"), key=lambda k: out[k]["mean"])
    out["maml_best"] = best
    out["margin_over_maml_ci95"] = paired_interval(rows["relevance"], rows[best])
    out["checks"] = {
        "beats_fedavg_ft_by_5pt": rel_m - out["fedavg+ft"]["mean"] >= 0.05,
        "beats_maml_by_5pt": rel_m - out[best]["mean"] >= 0.05,
        "maml_ci95_lower_bound_above_5pt": out["margin_over_maml_ci95"]["low"] >= 0.05,
        "within_1pt_of_oracle": out["oracle"]["mean"] - rel_m <= 0.01,
        "gap_to_oracle": out["oracle"]["mean"] - rel_m,
        "margin_over_maml": rel_m - out[best]["mean"],
        "margin_over_fedavg_ft": rel_m - out["fedavg+ft"]["mean"],
    }
    out["per_seed"] = per_seed
    return out


def section_shift(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    per_seed = []
    recover = []
    for seed in args.seeds:
        data = make_digits_clusters(seed=seed, n_heldout=args.heldout, shift_round=args.shift_round, k_shot=args.k_shot,
                                    query=args.query)
        total = args.shift_round + 20
        rel = train(build(data, budget, Plaintext(), seed=seed), data, budget, seed=seed, every=5, rounds=total)
        ora = train(build(data, budget, Plaintext(), seed=seed, oracle=True), data, budget, seed=seed, every=5,
                    rounds=total)
        gaps = [{"round": a["round"], "gap": b["train_clients"] - a["train_clients"]}
                for a, b in zip(rel["curve"], ora["curve"])]
        after = [g for g in gaps if g["round"] > args.shift_round]
        first_ok = next((g["round"] - args.shift_round for g in after if g["gap"] <= 0.02), None)
        recover.append(first_ok)
        per_seed.append({"seed": seed, "relevance_curve": rel["curve"], "oracle_curve": ora["curve"], "gaps": gaps,
                         "rounds_to_within_2pt": first_ok})
    return {"shift_round": args.shift_round, "rounds_to_within_2pt": recover,
            "checks": {"recovers_within_20_rounds": all(r is not None and r <= 20 for r in recover)},
            "per_seed": per_seed}


def section_protocol(args: argparse.Namespace, budget: Budget, name: str) -> dict[str, Any]:
    plain, secure, secs, psecs = [], [], [], []
    extra: dict[str, list[Any]] = {"max_model_diff": [], "bytes_uploaded": [], "refused_rows": []}
    blind = name == "ckks"  # the plaintext run applies exactly the weights the CKKS key holder allows
    for seed in args.seeds:
        data = make_digits_clusters(seed=seed, n_heldout=args.heldout, k_shot=args.k_shot, query=args.query)
        plain_server = build(data, budget, Plaintext(), seed=seed, blind=blind)
        p = train(plain_server, data, budget, seed=seed)
        proto: AggregationProtocol = (CKKS(policy=RelevancePolicy(min_effective=2.0)) if name == "ckks"
                                      else SecAggPlus(clip_range=8.0))
        server = build(data, budget, proto, seed=seed)
        t0 = time.perf_counter()
        server.enroll(list(data.train) + list(data.heldout))  # CKKS: one key-holder Gram of every task vector
        enrol_s = time.perf_counter() - t0
        s = train(server, data, budget, seed=seed)
        s["train_seconds"] += enrol_s
        plain.append(p["personalized"])
        secure.append(s["personalized"])
        secs.append(s["train_seconds"])
        psecs.append(p["train_seconds"])
        extra["max_model_diff"].append(max(float((plain_server.models[c] - server.models[c]).abs().max())
                                           for c in server.models if c in plain_server.models))
        extra["bytes_uploaded"].append(s.get("bytes_uploaded", 0))
        extra["refused_rows"].append(s.get("refused_rows", 0))
    return protocol_summary(name, plain, secure, statistics.fmean(s / p for s, p in zip(secs, psecs)), extra)


def protocol_summary(name: str, plain: list[float], secure: list[float], ratio: float,
                     extra: dict[str, list[Any]]) -> dict[str, Any]:
    diff = [b - a for a, b in zip(plain, secure)]
    gap = statistics.fmean(secure) - statistics.fmean(plain)
    # CKKS computes the same weighted sums (two-sided bound); SecAgg+ grouping is a different
    # (hard) weighting, so the requirement is not to lose more than 2 points
    check = {"ckks_within_0.5pt_of_plaintext": abs(gap) <= 0.005} if name == "ckks" else \
        {"secagg_at_most_2pt_below_plaintext": gap >= -0.02}
    return {"plaintext": summary(plain), name: summary(secure), "diff_vs_plaintext": summary(diff),
            "per_seed": {"plaintext": plain, name: secure}, **extra,
            "train_seconds_ratio_vs_plaintext": ratio, "checks": check}


def section_malicious(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attack in ("signflip", "alie"):
        rows: dict[str, dict[str, list[float]]] = {}
        for label, defense in (("relevance", "mean"), ("relevance+robust", args.robust)):
            acc, mw = [], []
            for seed in args.seeds:
                data = make_digits_clusters(seed=seed, n_heldout=args.heldout, k_shot=args.k_shot, query=args.query)
                r = train(build(data, budget, Plaintext(), seed=seed, defense=defense), data, budget, seed=seed,
                          malicious=0.2, attack=attack)
                acc.append(r["personalized"])
                mw.append(r.get("malicious_weight", 0.0))
            rows[label] = {"personalized": summary(acc), "malicious_weight": summary(mw)}  # type: ignore[dict-item]
        out[attack] = rows
    out["robust_rule"] = args.robust
    return out


def parse_budget(text: str, lr: float) -> tuple[int, float]:
    """``"20"`` -> (20, lr); ``"20@0.001"`` -> (20, 0.001): held-out fine-tuning steps and Adam rate."""
    steps, _, rate = text.partition("@")
    return int(steps), float(rate) if rate else lr


def section_hetero(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """Co-LoRA shared vs each architecture alone; every fine-tuning budget scored after one training."""
    shares = [0.125, 0.3125, 0.5625]
    shapes = "32,64,64x64"
    budgets = sorted({(budget.finetune, args.hetero_lr),
                      *(parse_budget(b, args.hetero_lr) for b in args.hetero_budgets)})
    per_budget: dict[str, dict[str, dict[str, list[float]]]] = {
        budget_key(k): {"shared": {}, "alone": {}} for k in budgets}
    for seed in args.seeds:
        data = make_digits_clusters(seed=seed, groups=args.hetero_groups, n_heldout=args.hetero_heldout, k_shot=2,
                                    query=3, architectures=shapes, architecture_shares=shares,
                                    heldout_architecture_shares=[1.0, 1.0, 1.0],
                                    architectures_per_group=args.hetero_groups > 1)
        for label, share in (("shared", True), ("alone", False)):
            cfg = HeteroConfig(rounds=budget.rounds, clients_per_round=budget.cohort, local_steps=budget.local_steps,
                               lr=args.hetero_lr, optimizer="adam", finetune_steps=budget.finetune, rank=args.rank,
                               share=share, seed=seed, shared_per_architecture=args.hetero_per_architecture,
                               pretrain=args.hetero_pretrain, pretrain_steps=args.hetero_pretrain_steps,
                               relevance=args.hetero_relevance, temperature=args.temperature)
            scored = run_heterogeneous_budgets(data, cfg, budgets)
            for k in budgets:
                for a, v in scored[k].per_architecture.items():
                    per_budget[budget_key(k)][label].setdefault(a, []).append(v)
    out = {"seeds": list(args.seeds), "architectures": shapes,
           "client_shares": {"32": shares[0], "64": shares[1], "64x64": shares[2]},
           "rank": args.rank, "optimizer": "adam", "adapter_lr": args.hetero_lr,
           "heldout_clients": args.hetero_heldout, "heldout_shares": "equal per shape",
           "shared_per_architecture": args.hetero_per_architecture, "per_seed_by_finetune_budget": per_budget}
    if args.hetero_relevance or args.hetero_groups > 1:  # recorded only when used (earlier reports pool unchanged)
        out["tasks"] = {"groups": args.hetero_groups, "every_shape_in_every_group": args.hetero_groups > 1,
                        "relevance_weighted": args.hetero_relevance, "temperature": args.temperature}
    if args.hetero_pretrain != "none":  # recorded only when used, so earlier reports pool unchanged
        out["pretrain"] = {"mode": args.hetero_pretrain, "steps": args.hetero_pretrain_steps,
                           "data": "the training clients' pooled support and query images"}
    return hetero_primary(out, args.hetero_primary or budget_key((budget.finetune, args.hetero_lr)))


BASE_ROUNDS = 30


def hetero_from_rows(paths: list[str], primary: str) -> dict[str, Any]:
    """A hetero section from ``relevance_hetero_variants.py --rows`` files (one JSON line per seed).

    The variants script writes each seed as it finishes, so a long run on a shared machine
    keeps every finished seed; this turns those rows (one variant) into the section
    ``section_hetero`` would have written for the same seeds and settings.
    """
    from relevance_hetero_variants import BASE, SHAPES, SHARES, VARIANT_DATA, VARIANTS

    rows: dict[int, dict[str, Any]] = {}
    for path in paths:
        with open(path) as fh:
            for line in fh:
                if line.strip():
                    r = json.loads(line)
                    rows[int(r["seed"])] = r
    names = {r["name"] for r in rows.values()}
    if len(names) != 1:
        raise SystemExit(f"rows of one variant expected, got {sorted(names)}")
    name = names.pop()
    seeds = sorted(rows)
    default = f"{BASE['finetune_steps']}@{BASE['lr']:g}"
    per_budget: dict[str, dict[str, dict[str, list[float]]]] = {}
    for seed in seeds:
        r = rows[seed]
        scored = {**r["by_budget"], default: {"shared": r["shared"], "alone": r["alone"]}}
        for key, res in scored.items():
            for label in ("shared", "alone"):
                for a, v in res[label].items():
                    per_budget.setdefault(key, {"shared": {}, "alone": {}})[label].setdefault(a, []).append(v)
    changes = {**VARIANTS[name], **VARIANT_DATA.get(name, {})}
    out = {"seeds": seeds, "architectures": SHAPES,
           "client_shares": {"32": SHARES[0], "64": SHARES[1], "64x64": SHARES[2]},
           "rank": BASE["rank"], "optimizer": BASE["optimizer"], "adapter_lr": BASE["lr"],
           "heldout_clients": 96, "heldout_shares": "equal per shape", "shared_per_architecture": False,
           "variant": name, "changes": changes, "per_seed_by_finetune_budget": per_budget,
           "seconds": sum(rows[s]["s"] for s in seeds)}
    return hetero_primary(out, primary)


def pool_hetero(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two hetero sections of the same settings on different seeds, as one (headline budget: ``a``'s)."""
    for key in ("architectures", "client_shares", "rank", "adapter_lr", "heldout_clients", "shared_per_architecture",
                "pretrain", "tasks"):
        if a.get(key) != b.get(key):
            raise SystemExit(f"hetero sections differ in {key}: {a[key]} vs {b[key]}")
    if set(a["seeds"]) & set(b["seeds"]):
        raise SystemExit(f"hetero sections share seeds {sorted(set(a['seeds']) & set(b['seeds']))}")
    keys = set(a["per_seed_by_finetune_budget"]) & set(b["per_seed_by_finetune_budget"])
    pooled = {k: {label: {arch: a["per_seed_by_finetune_budget"][k][label][arch]
                          + b["per_seed_by_finetune_budget"][k][label][arch]
                          for arch in a["per_seed_by_finetune_budget"][k][label]}
                  for label in ("shared", "alone")} for k in sorted(keys)}
    out = {**a, "seeds": a["seeds"] + b["seeds"], "per_seed_by_finetune_budget": pooled,
           "seconds": a.get("seconds", 0.0) + b.get("seconds", 0.0)}
    return hetero_primary(out, a["primary_budget"])


def budget_key(k: tuple[int, float]) -> str:
    return f"{k[0]}@{k[1]:g}"


def hetero_primary(section: dict[str, Any], key: str) -> dict[str, Any]:
    """The hetero section's headline figures (``accuracy``, ``gain_ci95``, ``checks``) at budget ``key``.

    Every budget's per-seed values are kept, so the headline budget can be (re)selected without
    training again (``--combine ... --hetero-primary KEY``); the choice is made on development
    seeds (``relevance_hetero_variants.py``), never on these.
    """
    per_budget = section["per_seed_by_finetune_budget"]
    res = per_budget[key]
    by_budget = {k: {"gain_ci95": {a: paired_interval(r["shared"][a], r["alone"][a]) for a in r["shared"]},
                     "shared": {a: statistics.fmean(v) for a, v in r["shared"].items()},
                     "alone": {a: statistics.fmean(v) for a, v in r["alone"].items()}}
                 for k, r in per_budget.items()}
    counts = section["client_shares"]
    smallest, largest = min(counts, key=lambda k: counts[k]), max(counts, key=lambda k: counts[k])
    table = {label: {a: summary(v) for a, v in rows.items()} for label, rows in res.items()}
    gain = {a: table["shared"][a]["mean"] - table["alone"][a]["mean"] for a in table["shared"]}
    ci = {a: paired_interval(res["shared"][a], res["alone"][a]) for a in res["shared"]}
    steps, _, rate = key.partition("@")
    return {**section, "finetune_steps": int(steps), "finetune_lr": float(rate), "primary_budget": key,
            "by_finetune_budget": by_budget,
            "accuracy": table, "gain_from_sharing": gain, "per_seed": res, "gain_ci95": ci,
            "checks": {"smallest_gains_2pt": gain[smallest] >= 0.02,
                       "smallest_interval_above_0": ci[smallest]["low"] > 0.0,
                       "largest_no_loss": gain[largest] >= 0.0}}


def combine(paths: list[str]) -> dict[str, Any]:
    """One report from several runs of this script (e.g. one process per seed of ``ckks``).

    Sections appear once each, except ``ckks`` / ``secagg``, whose seeds are pooled and whose
    summaries are recomputed from the pooled per-seed values.  Each input's budget and seeds
    are kept under ``runs``.
    """
    out: dict[str, Any] = {"runs": [], "note": "timings taken on a shared, loaded 2-core machine"}
    for path in paths:
        with open(path) as fh:
            rep = json.load(fh)
        out["runs"].append({"file": path.rsplit("/", 1)[-1], "budget": rep["budget"], "seeds": rep["seeds"],
                            "sections": [k for k in rep if k in SECTIONS]})
        for name in SECTIONS:
            if name not in rep:
                continue
            sec = rep[name]
            if name in ("ckks", "secagg") and name in out:
                prev = out[name]
                pooled = {k: prev["per_seed"][k] + sec["per_seed"][k] for k in ("plaintext", name)}
                lists = {k: prev[k] + sec[k] for k in ("max_model_diff", "bytes_uploaded", "refused_rows")}
                ratio = [prev["train_seconds_ratio_vs_plaintext"]] * len(prev["per_seed"]["plaintext"]) + \
                    [sec["train_seconds_ratio_vs_plaintext"]] * len(sec["per_seed"]["plaintext"])
                out[name] = protocol_summary(name, pooled["plaintext"], pooled[name], statistics.fmean(ratio), lists)
                out[name]["seconds"] = prev["seconds"] + sec["seconds"]
            elif name == "hetero" and name in out:
                out[name] = pool_hetero(out[name], {"seeds": rep["seeds"], **sec})
            elif name in out:
                raise SystemExit(f"section {name} appears in two inputs")
            else:
                out[name] = {"seeds": rep["seeds"], **sec} if name == "hetero" else sec
    return out


SECTIONS = ("main", "shift", "ckks", "secagg", "hetero", "malicious")


def update(base_path: str, paths: list[str]) -> dict[str, Any]:
    """``base_path`` (a combined report) with the sections of ``paths`` replacing its own.

    A section rerun alone (e.g. ``hetero`` on more seeds) replaces the old one, and its entry in
    ``runs`` replaces the old section's; every other section and its ``runs`` entry is kept.
    """
    with open(base_path) as fh:
        out: dict[str, Any] = json.load(fh)
    new = combine(paths)
    replaced = {name for name in SECTIONS if name in new}
    kept = []
    for run in out.get("runs", []):
        left = [name for name in run["sections"] if name not in replaced]
        if left:
            kept.append({**run, "sections": left})
    out["runs"] = kept + new["runs"]
    for name in replaced:
        out[name] = new[name]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--cohort", type=int, default=16)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--local-lr", type=float, default=0.3)
    ap.add_argument("--finetune", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--k-shot", type=int, default=1, help="support images per class (held-out clients adapt on these)")
    ap.add_argument("--query", type=int, default=7)
    ap.add_argument("--shift-round", type=int, default=15)
    ap.add_argument("--robust", default="multikrum:f=4")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--hetero-lr", type=float, default=0.01, help="Adam rate of the Co-LoRA adapters")
    ap.add_argument("--hetero-per-architecture", action="store_true",
                    help="Co-LoRA: every architecture counts the same in the shared P, Q")
    ap.add_argument("--hetero-pretrain", default="none", choices=["none", "family", "independent"],
                    help="Co-LoRA: pre-train the frozen backbones on the training clients' pooled images")
    ap.add_argument("--hetero-pretrain-steps", type=int, default=300, help="Adam steps of that pre-training")
    ap.add_argument("--hetero-groups", type=int, default=1,
                    help="Co-LoRA: digits-clusters task groups (> 1: conflicting tasks, every shape in every group)")
    ap.add_argument("--hetero-relevance", action="store_true",
                    help="Co-LoRA: per-client relevance-weighted P, Q (across shapes), A, B (within), at --temperature")
    ap.add_argument("--hetero-heldout", type=int, default=96, help="held-out clients, equal shares of the shapes")
    ap.add_argument("--hetero-budgets", nargs="*", default=["0", "20", "5@0.001", "20@0.001", "20@0.003"],
                    help="further held-out fine-tuning budgets STEPS[@ADAM_RATE] scored after the same training")
    ap.add_argument("--learner", default="maml", choices=["maml", "fedavg"],
                    help="client step of the relevance runs (maml: relevance-weighted meta-updates)")
    ap.add_argument("--out", help="also write the JSON report to this file")
    ap.add_argument("--combine", nargs="+", metavar="JSON", help="merge earlier reports (see combine) and exit")
    ap.add_argument("--hetero-primary", metavar="STEPS@RATE",
                    help="the hetero section's headline fine-tuning budget (default: --finetune at --hetero-lr)")
    ap.add_argument("--update", metavar="JSON", help="with --combine: replace these sections of this combined report")
    ap.add_argument("--hetero-from-rows", nargs="+", metavar="JSONL",
                    help="write a report whose hetero section is built from relevance_hetero_variants.py rows")
    ap.add_argument("--only", nargs="+", default=["main", "shift", "secagg", "hetero", "malicious"])
    args = ap.parse_args()
    if args.hetero_from_rows:
        sec = hetero_from_rows(args.hetero_from_rows, args.hetero_primary or "0@0.01")
        write_report({"runs": [{"file": p.rsplit("/", 1)[-1], "budget": {"rounds": BASE_ROUNDS, "cohort": 16,
                                                                      "learner": "Co-LoRA adapters, Adam 0.01"},
                                "seeds": sec["seeds"], "sections": ["hetero"]} for p in args.hetero_from_rows],
                      "note": "timings taken on a shared, loaded 2-core machine", "hetero": sec}, args.out,
                     default=float)
        return
    if args.combine:
        merged = update(args.update, args.combine) if args.update else combine(args.combine)
        if args.hetero_primary and "hetero" in merged:
            merged["hetero"] = hetero_primary(merged["hetero"], args.hetero_primary)
        write_report(merged, args.out, default=float)
        return
    torch.set_num_threads(1)
    budget = Budget(args.rounds, args.cohort, args.local_steps, args.local_lr, args.finetune, args.temperature,
                    args.learner)
    report: dict[str, Any] = {"budget": vars(budget), "seeds": args.seeds,
                              "note": "timings taken on a shared, loaded 2-core machine"}
    started = time.perf_counter()
    for name in args.only:
        t0 = time.perf_counter()
        if name == "main":
            report[name] = section_main(args, budget)
        elif name == "shift":
            report[name] = section_shift(args, budget)
        elif name in ("ckks", "secagg"):
            report[name] = section_protocol(args, budget, name)
        elif name == "malicious":
            report[name] = section_malicious(args, budget)
        elif name == "hetero":
            report[name] = section_hetero(args, budget)
        report[name]["seconds"] = time.perf_counter() - t0
    report["seconds"] = time.perf_counter() - started
    write_report(report, args.out, default=float)


if __name__ == "__main__":
    main()
