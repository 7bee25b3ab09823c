"""Why CKKS runs of the detection setting score below plaintext over 100 rounds: chaos or CKKS.

    nice -n 10 python benchmarks/robustness_ckks_gap.py \\
        --parts noise perturb curves floor gram perturb_gram perturb_gram_split repeat summary --repeats 3 \\
        --out benchmarks/json/robustness_ckks_gap.json

The detection setting of ``benchmarks/robustness.py`` (digits-fewshot FOMAML, 100 clients, 25 %
unit-scale sign flippers, 8 per round, 100 rounds, ``recommended``), real runs, parts:

``curves``: plaintext and CKKS on ``--curve-seeds``, with the attack and without it (``none``,
same malicious fraction), accuracy after every round (``last_k = rounds``).  Per round: the
personalized accuracy, the aggregate norm, attackers in the cohort, exclusions and suspects; per
pair (same seed and attack): the relative difference of the CKKS global model from the
plaintext one after every round, the first round whose exclusions differ, the first round whose
accuracy differs by more than 0.01 and by more than 0.05.  The round-0 aggregates of a pair come
from identical uploads, so their difference *is* CKKS's decoding error on this setting: its
standard deviation on the entries nonzero in both is recorded per pair.

``noise``: one round of plaintext and CKKS per seed of ``--seeds`` (identical uploads): the
decoding error's standard deviation on entries nonzero in both; its median (``noise_sigma``)
sizes the ``ckks`` perturbation.

``perturb``: plaintext on ``--seeds``, unperturbed and ``--repeats`` times perturbed (a
diagnostic patch of ``ServerOptimizer.step`` in this process only, never in the library), with
and without the attack.  ``ckks``: every aggregate entry gets Gaussian noise of the measured
CKKS size (``--sigma``, default: the ``noise`` measurement) and then CKKS's resolution floor
(entries below ``zero_floor`` become 0), i.e. the decode's error model applied to the plaintext
aggregate; ``tiny``: every entry is multiplied by ``1 + 2^-24 * N(0, 1)`` (float32 rounding
size, no floor).  The noise has its own generator (seeded by the repeat), so cohorts, attackers
and local training are the plaintext run's.  Per seed: the unperturbed accuracy, every
perturbed one, and the paired differences perturbed - unperturbed.

``floor``: CKKS with ``zero_floor=0`` against the default on ``--floor-seeds`` (attack on); the
default run is taken from ``curves`` when that part ran in the same process.

``gram``: one round of plaintext and CKKS per seed: the relative error of the clipping norms
(``MedianClipping`` reads them from the decrypted Gram's diagonal under CKKS) and the absolute
error of the cosines the detector scores (``Reputation._observe``), recorded by a patch of both.

``perturb_gram``: plaintext with those errors' measured size put back in (a patch of the same
two methods: norms times ``1 + norm_rel N(0, 1)``, Gram entries plus ``cosine * N * ||u_i|| ||u_j||``,
symmetric): ``gram``, and ``all`` (that and the ``ckks`` aggregate noise).

``summary``: paired differences from the unperturbed plaintext run per kind of run (CKKS cached
and fresh, each perturbation), computed from the parts above and the 12 cached runs; no runs.

``perturb_gram_split``: the same with the noise on the clipping norms alone (``norms``) and on
the detector's Gram alone (``cosines``).

``repeat``: a fresh CKKS run per ``--repeat-seeds`` (attack on, library defaults): a second draw
of CKKS's randomized encryption beside the one in ``benchmarks/json/robustness.json``.

CKKS runs cost 90-190 s each on a loaded 2-core machine; plaintext 2-7 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from peers import write_report

import securefml.optimizer as optimizer
from securefml.defenses.preaggregators import MedianClipping
from securefml.defenses.reputation import Reputation
from securefml.experiment import RunConfig, run_experiment
from securefml.protocols.ckks_stats import default_zero_floor

#: CKKS's default resolution floor at scale 2^40
TAU = default_zero_floor(40)
ATTACKS = {"signflip": "signflip:scale=1", "none": "none"}
#: the benchmark whose ``detection`` section holds the 12 cached runs compared against
ROBUSTNESS = Path(__file__).parent / "json" / "robustness.json"


class Patch:
    """The diagnostic patch of the server step: optional perturbation, and a record of each round."""

    def __init__(self) -> None:
        self.original = optimizer.ServerOptimizer.step
        self.mode = "off"
        self.sigma = 0.0
        self.gen = torch.Generator().manual_seed(0)
        self.aggregates: list[torch.Tensor] = []
        self.vectors: list[torch.Tensor] = []
        self.keep = False
        #: the ``gram`` mode: relative noise on the clipping norms and on the Gram's entries
        self.norm_rel = 0.0
        self.gram_rel = 0.0
        self.norms: list[torch.Tensor] = []
        self.cosines: list[torch.Tensor] = []
        self.original_scales = MedianClipping._scales
        self.original_observe = Reputation._observe
        patch = self

        def scales(clip: MedianClipping, norms: torch.Tensor, context: Any) -> torch.Tensor:
            if patch.keep:
                patch.norms.append(norms.detach().clone().to(torch.float64))
            if patch.mode in ("gram", "all", "norms") and norms.numel():
                norms = norms * (1 + patch.norm_rel * torch.randn(norms.shape, generator=patch.gen,
                                                                  dtype=torch.float64).to(norms.dtype))
            return patch.original_scales(clip, norms, context)

        def observe(rep: Reputation, gram: Any) -> tuple[torch.Tensor, torch.Tensor]:
            inner = gram.inner.to(torch.float64)
            if patch.keep:
                d = inner.diagonal().clamp_min(1e-300).sqrt()
                patch.cosines.append(inner / (d[:, None] * d[None, :]))
            if patch.mode in ("gram", "all", "cosines") and gram.n:
                d = inner.diagonal().clamp_min(0).sqrt()
                noise = torch.randn(inner.shape, generator=patch.gen, dtype=torch.float64)
                noise = (noise + noise.T) / 2 ** 0.5
                gram = type(gram)(gram.client_ids, (inner + patch.gram_rel * noise * d[:, None] * d[None, :]).to(
                    gram.inner.dtype), gram.reference, gram.reference_sq_norm)
            return patch.original_observe(rep, gram)

        MedianClipping._scales = scales  # type: ignore[method-assign,assignment]
        Reputation._observe = observe  # type: ignore[method-assign,assignment]

        def step(opt: optimizer.ServerOptimizer, out: Any) -> None:
            agg = out.aggregate
            if patch.mode in ("ckks", "all"):
                noisy = agg + patch.sigma * torch.randn(agg.shape, generator=patch.gen, dtype=agg.dtype)
                out.aggregate = torch.where(noisy.abs() < TAU, torch.zeros_like(noisy), noisy)
            elif patch.mode == "tiny":
                out.aggregate = agg * (1 + 2.0 ** -24 * torch.randn(agg.shape, generator=patch.gen, dtype=agg.dtype))
            patch.original(opt, out)
            if patch.keep:
                patch.aggregates.append(out.aggregate.detach().clone().float())
                patch.vectors.append(opt.vector.detach().clone().float())

        optimizer.ServerOptimizer.step = step  # type: ignore[method-assign,assignment]

    def set(self, mode: str, seed: int = 0, sigma: float = 0.0, keep: bool = False,
            norm_rel: float = 0.0, gram_rel: float = 0.0) -> None:
        self.mode, self.sigma, self.keep, self.norm_rel, self.gram_rel = mode, sigma, keep, norm_rel, gram_rel
        self.gen = torch.Generator().manual_seed(1000 + seed)
        self.aggregates, self.vectors, self.norms, self.cosines = [], [], [], []


def config(protocol: str, attack: str, seed: int, rounds: int, last_k: int) -> RunConfig:
    return RunConfig(dataset="digits-fewshot", algorithm="fomaml", rounds=rounds, clients_per_round=8, seed=seed,
                     protocol=protocol, defense="recommended", attack=ATTACKS[attack], malicious=0.25, last_k=last_k)


def run(cfg: RunConfig) -> tuple[Any, float]:
    t0 = time.perf_counter()
    res = run_experiment(cfg)
    return res, round(time.perf_counter() - t0, 1)


def last5(res: Any) -> float:
    return sum(res.metrics["personalized_last_k"]["values"][-5:]) / 5


def curve_record(res: Any, seconds: float) -> dict[str, Any]:
    bad = set(res.metrics["detection"]["malicious_ids"])
    values = res.metrics["personalized_last_k"]["values"]
    rounds = [{"round": i, "accuracy": values[i], "update_norm": h["update_norm"],
               "attackers": sum(c in bad for c in h["cohort"]), "flagged": sorted(h["flagged"]),
               "suspected": sorted(h["suspected"])} for i, h in enumerate(res.history)]
    return {"last_5": sum(values[-5:]) / 5, "seconds": seconds, "rounds": rounds}


def first(pred: list[bool]) -> int | None:
    return next((i for i, p in enumerate(pred) if p), None)


def curves(args: argparse.Namespace, patch: Patch, out: dict[str, Any]) -> None:
    pairs = []
    for seed in args.curve_seeds:
        for attack in ("signflip", "none"):
            runs: dict[str, Any] = {}
            vecs: dict[str, list[torch.Tensor]] = {}
            aggs: dict[str, list[torch.Tensor]] = {}
            for protocol in ("plaintext", "ckks"):
                patch.set("off", keep=True)
                res, sec = run(config(protocol, attack, seed, args.rounds, args.rounds))
                runs[protocol] = curve_record(res, sec)
                vecs[protocol], aggs[protocol] = patch.vectors, patch.aggregates
                print(f"curve seed {seed} {attack} {protocol}: last5 {runs[protocol]['last_5']:.3f} ({sec} s)",
                      flush=True)
            p, c = runs["plaintext"]["rounds"], runs["ckks"]["rounds"]
            rel_model = [float((vc - vp).norm() / vp.norm()) for vp, vc in zip(vecs["plaintext"], vecs["ckks"])]
            rel_agg = [float((gc - gp).norm() / gp.norm()) if gp.norm() > 0 else None
                       for gp, gc in zip(aggs["plaintext"], aggs["ckks"])]
            acc_gap = [b["accuracy"] - a["accuracy"] for a, b in zip(p, c)]
            pairs.append({
                "seed": seed, "attack": attack, "plaintext": runs["plaintext"], "ckks": runs["ckks"],
                "round0_error": round0_error(aggs["plaintext"][0], aggs["ckks"][0]),
                "relative_model_difference": rel_model, "relative_aggregate_difference": rel_agg,
                "accuracy_ckks_minus_plaintext": acc_gap,
                "first_round_flags_differ": first([a["flagged"] != b["flagged"] for a, b in zip(p, c)]),
                "first_round_accuracy_differs_0.01": first([abs(g) > 0.01 for g in acc_gap]),
                "first_round_accuracy_differs_0.05": first([abs(g) > 0.05 for g in acc_gap]),
                "first_round_model_differs_10pct": first([r > 0.1 for r in rel_model]),
                "last_5_ckks_minus_plaintext": runs["ckks"]["last_5"] - runs["plaintext"]["last_5"],
            })
    out["curves"] = pairs


def round0_error(plain: torch.Tensor, ckks: torch.Tensor) -> dict[str, Any]:
    """CKKS's decoding error on one aggregate computed from the same uploads as ``plain``."""
    both = (plain != 0) & (ckks != 0)
    err = (ckks - plain)[both]
    return {"entries": int(plain.numel()), "entries_nonzero_both": int(both.sum()), "std": float(err.std()),
            "max_abs": float(err.abs().max()), "plaintext_zero_ckks_nonzero": int(((plain == 0) & (ckks != 0)).sum()),
            "plaintext_nonzero_ckks_zero": int(((plain != 0) & (ckks == 0)).sum()),
            "plaintext_zero": int((plain == 0).sum())}


def round0(patch: Patch, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One unperturbed round per protocol on the same uploads: its (norms, cosines, aggregate)."""
    rec = {}
    for protocol in ("plaintext", "ckks"):
        patch.set("off", keep=True)
        run(config(protocol, "signflip", seed, 1, 1))
        rec[protocol] = (patch.norms[0], patch.cosines[0], patch.aggregates[0])
    return rec


def noise(args: argparse.Namespace, patch: Patch, out: dict[str, Any]) -> None:
    """One round of plaintext and CKKS per seed (identical uploads): CKKS's error on the aggregate."""
    rows = []
    for seed in args.seeds:
        rec = round0(patch, seed)
        rows.append({"seed": seed, **round0_error(rec["plaintext"][2], rec["ckks"][2])})
        print(f"noise seed {seed}: {rows[-1]}", flush=True)
    out["noise"] = rows
    out["noise_sigma"] = statistics.median(r["std"] for r in rows)


def gram_noise(args: argparse.Namespace, patch: Patch, out: dict[str, Any]) -> None:
    """One round of plaintext and CKKS per seed: CKKS's relative error on the clipping norms (from
    the decrypted Gram's diagonal) and on the cosines the detector scores (from the decrypted Gram)."""
    rows = []
    for seed in args.seeds:
        rec = round0(patch, seed)
        (np_, cp, ap), (nc, cc, ac) = rec["plaintext"], rec["ckks"]
        off = ~torch.eye(cp.shape[0], dtype=torch.bool)
        rows.append({"seed": seed, "norm_relative_error_std": float((nc / np_ - 1).std()),
                     "norm_relative_error_max": float((nc / np_ - 1).abs().max()),
                     "cosine_error_std": float((cc - cp)[off].std()),
                     "cosine_error_max": float((cc - cp)[off].abs().max()),
                     "aggregate": round0_error(ap, ac)})
        print(f"gram seed {seed}: {rows[-1]}", flush=True)
    out["gram_noise"] = {"rows": rows, "norm_rel": statistics.median(r["norm_relative_error_std"] for r in rows),
                         "cosine": statistics.median(r["cosine_error_std"] for r in rows)}


def perturb_gram(args: argparse.Namespace, patch: Patch, out: dict[str, Any], *,
                 modes: tuple[str, str] = ("gram", "all"), key: str = "perturb_gram") -> None:
    """Plaintext with CKKS-sized noise on the Gram-derived quantities (``gram``) and on those and the
    aggregate together (``all``); the unperturbed runs are the ``perturb`` part's."""
    g = out["gram_noise"]
    base = {(r["seed"], r["attack"]): r["plaintext"] for r in out["perturb"]["rows"]}
    rows = []
    for seed in args.seeds:
        row: dict[str, Any] = {"seed": seed, "attack": "signflip", "plaintext": base[(seed, "signflip")]}
        for mode in modes:
            vals = []
            for k in range(args.repeats):
                patch.set(mode, seed=k, sigma=out["noise_sigma"], norm_rel=g["norm_rel"], gram_rel=g["cosine"])
                res, _ = run(config("plaintext", "signflip", seed, args.rounds, 5))
                vals.append(last5(res))
            row[mode] = vals
            row[f"{mode}_minus_plaintext"] = [v - row["plaintext"] for v in vals]
        print(f"{key} seed {seed}: {row['plaintext']:.3f} " + " ".join(
            f"{m} {[round(v, 3) for v in row[m]]}" for m in modes), flush=True)
        rows.append(row)
    patch.set("off")
    out[key] = {"norm_rel": g["norm_rel"], "gram_rel": g["cosine"], "rows": rows}


def perturb_gram_split(args: argparse.Namespace, patch: Patch, out: dict[str, Any]) -> None:
    """``perturb_gram``'s noise on the clipping norms alone (``norms``) and on the detector's Gram alone
    (``cosines``): which of the two moves the runs."""
    perturb_gram(args, patch, out, modes=("norms", "cosines"), key="perturb_gram_split")


def perturb(args: argparse.Namespace, patch: Patch, out: dict[str, Any]) -> None:
    sigma = args.sigma if args.sigma is not None else out.get("noise_sigma")
    if sigma is None:
        raise SystemExit("--sigma is needed when the noise part has not run")
    rows = []
    for attack in args.perturb_attacks:
        for seed in args.seeds:
            patch.set("off")
            base, _ = run(config("plaintext", attack, seed, args.rounds, 5))
            row: dict[str, Any] = {"seed": seed, "attack": attack, "plaintext": last5(base)}
            for mode in ("ckks", "tiny"):
                vals = []
                for k in range(args.repeats):
                    patch.set(mode, seed=k, sigma=sigma)
                    res, _ = run(config("plaintext", attack, seed, args.rounds, 5))
                    vals.append(last5(res))
                row[mode] = vals
                row[f"{mode}_minus_plaintext"] = [v - row["plaintext"] for v in vals]
            print(f"perturb {attack} seed {seed}: {row['plaintext']:.3f} ckks-like "
                  f"{[round(v, 3) for v in row['ckks']]} tiny {[round(v, 3) for v in row['tiny']]}", flush=True)
            rows.append(row)
    patch.set("off")
    out["perturb"] = {"sigma": sigma, "tau": TAU, "repeats": args.repeats, "rows": rows}


def floor(args: argparse.Namespace, patch: Patch, out: dict[str, Any]) -> None:
    rows = []
    for seed in args.floor_seeds:
        patch.set("off")
        res, sec = run(config("ckks:zero_floor=0", "signflip", seed, args.rounds, 5))
        row = {"seed": seed, "zero_floor_0": last5(res), "seconds": sec}
        print(f"floor seed {seed}: zero_floor=0 {row['zero_floor_0']:.3f} ({sec} s)", flush=True)
        rows.append(row)
    out["floor"] = rows


def repeat(args: argparse.Namespace, patch: Patch, out: dict[str, Any]) -> None:
    """A fresh CKKS run (attack on, default floor) on ``--repeat-seeds``: CKKS encryption is
    randomized, so this is a second draw beside the cached run of ``benchmarks/robustness.py``."""
    rows = []
    for seed in args.repeat_seeds:
        patch.set("off")
        res, sec = run(config("ckks", "signflip", seed, args.rounds, 5))
        rows.append({"seed": seed, "ckks": last5(res), "seconds": sec})
        print(f"repeat seed {seed}: ckks {rows[-1]['ckks']:.3f} ({sec} s)", flush=True)
    out["repeat"] = rows


def _spread(diffs: list[float]) -> dict[str, Any]:
    return {"n": len(diffs), "mean": statistics.mean(diffs), "sd": statistics.stdev(diffs) if len(diffs) > 1 else None,
            "min": min(diffs), "max": max(diffs), "below_zero": sum(d < 0 for d in diffs),
            "mean_abs": statistics.mean(abs(d) for d in diffs)}


def summary(args: argparse.Namespace, patch: Patch, out: dict[str, Any]) -> None:
    """Paired differences from the unperturbed plaintext run of the same seed, per kind of run: the
    CKKS runs (the cached ones of ``benchmarks/json/robustness.json``, section ``detection``, and this
    script's fresh ones) beside each perturbation of plaintext.  No runs."""
    cached = {(r["protocol"], r["seed"]): r["accuracy_last_k"] for r in json.loads(ROBUSTNESS.read_text())["detection"]}
    plain = {s: cached[("plaintext", s)] for p, s in cached if p == "plaintext"}
    ckks_cached = [cached[("ckks", s)] - plain[s] for s in sorted(plain) if ("ckks", s) in cached]
    fresh = {p["seed"]: p["ckks"]["last_5"] for p in out.get("curves", []) if p["attack"] == "signflip"}
    fresh.update({r["seed"]: r["ckks"] for r in out.get("repeat", [])})
    ckks_fresh = [fresh[s] - plain[s] for s in sorted(fresh)]
    res: dict[str, Any] = {
        "plaintext_cached": plain, "ckks_cached": {s: cached[("ckks", s)] for s in sorted(plain)},
        "ckks_fresh": fresh,
        "ckks_cached_minus_plaintext": _spread(ckks_cached), "ckks_fresh_minus_plaintext": _spread(ckks_fresh),
        "ckks_all_minus_plaintext": _spread(ckks_cached + ckks_fresh),
        "ckks_fresh_minus_cached": {s: fresh[s] - cached[("ckks", s)] for s in sorted(fresh)},
    }
    for part, modes in (("perturb", ("ckks", "tiny")), ("perturb_gram", ("gram", "all")),
                        ("perturb_gram_split", ("norms", "cosines"))):
        for attack in ("signflip", "none"):
            rows = [r for r in out.get(part, {}).get("rows", []) if r["attack"] == attack]
            for mode in modes:
                diffs = [d for r in rows for d in r[f"{mode}_minus_plaintext"]]
                if diffs:
                    res[f"{part}_{mode}_{attack}_minus_plaintext"] = _spread(diffs)
    res["none_ckks_minus_plaintext"] = {p["seed"]: p["last_5_ckks_minus_plaintext"]
                                        for p in out.get("curves", []) if p["attack"] == "none"}
    if args.cache:
        res["cached_trajectories"] = cached_trajectories(Path(args.cache), args.cache_seeds)
    out["summary"] = res


def cached_trajectories(path: Path, seeds: list[int]) -> list[dict[str, Any]]:
    """Per round of the cached detection runs (``benchmarks/robustness.py --cache`` format) on ``seeds``:
    aggregate norm, attackers in the cohort, attackers and honest clients excluded."""
    rows = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        key = json.loads(rec["key"])
        if key["seed"] not in seeds or key["rounds"] != 100 or key["attack"] != ATTACKS["signflip"]:
            continue
        bad = set(rec["malicious_ids"])
        rows.append({"protocol": key["protocol"], "seed": key["seed"], "last_5": rec["last_k"],
                     "update_norm": [r["update_norm"] for r in rec["rounds"]],
                     "attackers": [sum(c in bad for c in r["cohort"]) for r in rec["rounds"]],
                     "attackers_excluded": [sum(c in bad for c in r["flagged"]) for r in rec["rounds"]],
                     "honest_excluded": [sum(c not in bad for c in r["flagged"]) for r in rec["rounds"]]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", nargs="+",
                    default=["noise", "perturb", "curves", "floor", "gram", "perturb_gram", "perturb_gram_split",
                             "repeat", "summary"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--curve-seeds", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--floor-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--repeat-seeds", type=int, nargs="+", default=[1, 3, 4, 5])
    ap.add_argument("--perturb-attacks", nargs="+", default=["signflip", "none"])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--sigma", type=float, default=None, help="noise std of the ckks-like perturbation")
    ap.add_argument("--cache", help="the summary part: a benchmarks/robustness.py cache holding the cached runs")
    ap.add_argument("--cache-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out")
    ap.add_argument("--resume", help="a JSON this script wrote: its parts are kept, the new ones added")
    args = ap.parse_args()
    torch.set_num_threads(1)
    patch = Patch()
    out: dict[str, Any] = json.loads(Path(args.resume).read_text()) if args.resume else {}
    out.setdefault("args", {})
    out["args"].update({p: vars(args) for p in args.parts})
    for part in args.parts:
        {"noise": noise, "curves": curves, "perturb": perturb, "floor": floor, "gram": gram_noise,
         "perturb_gram": perturb_gram, "repeat": repeat, "summary": summary,
         "perturb_gram_split": perturb_gram_split}[part](args, patch, out)
        if args.out:  # after every part, so a stopped run keeps what it measured
            Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    write_report(out, args.out, indent=1)


if __name__ == "__main__":
    main()
