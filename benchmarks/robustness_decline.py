"""Why the recommended default loses ground under the 10x sign flip over 100 rounds: instrumented runs; one JSON.

    nice -n 10 python benchmarks/robustness_decline.py --seeds 0 1 2 --out benchmarks/json/robustness_decline.json
    nice -n 10 python benchmarks/robustness_decline.py --section candidates --seeds 10 11 12 13 14 --out F

The matrix's configuration (digits-fewshot FOMAML, 10 per round, 100 rounds, 20 % malicious,
``signflip:scale=10``), run with the server instrumented (a subclass of ``Server`` that reads its
own state after each round; nothing in the library changes).  Per round: attackers in the cohort,
attackers and honest clients excluded, the median-clip bound, the aggregate's norm, the server
step's norm, Adam's moments (``||m||`` and the median of ``sqrt(v)``), the share of dead ReLU units
of the global model on the held-out clients' support inputs, and every ``--eval-every`` rounds the
personalized accuracy.  ``last_5`` is the matrix's score (mean of the last 5 rounds).

``diagnosis`` (ablations, same seeds):

* ``attack``: the recommended default under the attack in every round (the matrix cell);
* ``clean``: no attack; ``mean-clean``: the plain mean, no attack;
* ``oracle``: the attackers never upload (removed from every cohort from round 0; a diagnostic,
  not a defense), the recommended default on the rest;
* ``attack-0-10``: the attackers flip only in rounds 0-10 and are honest afterwards;
* ``attack-30-``: honest in rounds 0-29, flip from round 30 on;
* ``attack-0-30``: flip in rounds 0-29, honest afterwards;
* ``oracle-30-``: the attack in rounds 0-29, then the attackers never upload again.

``--labels`` runs only some of them and merges their runs into the section already in ``--out``.

``candidates``: the default and option settings of the defense under the attack and clean, for
choosing an option on development seeds.

``matrix``: ``benchmarks/robustness.py``'s matrix (same configurations, same summary; its own
cache, ``--cache``) for ``--candidates`` at ``--fractions``, every attack and none, ``--seeds``.

Each section is stored under its own key of ``--out``; the other sections already there are kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peers import write_report

import securefml.experiment as experiment
from securefml.attacks import Attack, make_attack
from securefml.attacks.base import AttackContext
from securefml.client import Client
from securefml.defenses import Defense, make_defense
from securefml.defenses.base import Composed
from securefml.defenses.preaggregators import MedianClipping
from securefml.experiment import RunConfig, run_experiment
from securefml.personalize import personalize
from securefml.server import RoundRecord, Server

ATTACK = "signflip:scale=10"
DEFAULT = "recommended"


class WindowedAttack(Attack):
    """``inner`` in rounds ``[start, stop)``; an honest client (its own update) otherwise."""

    def __init__(self, inner: Attack, start: int, stop: int) -> None:
        self.inner, self.start, self.stop = inner, start, stop
        self.name = getattr(inner, "name", "windowed")
        self.omniscient = bool(getattr(inner, "omniscient", False))

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        if self.start <= context.round < self.stop:
            return self.inner.poison_updates(own, context)
        return own


def _medclip(defense: Defense) -> MedianClipping | None:
    """The ``MedianClipping`` of a composed defense (to read its bound), if any."""
    stack: list[Any] = [defense]
    while stack:
        d = stack.pop()
        if isinstance(d, MedianClipping):
            return d
        if isinstance(d, Composed):
            stack += [d.pre, d.rule]
        elif hasattr(d, "rule"):
            stack.append(d.rule)
    return None


def dead_units(params: dict[str, torch.Tensor], inputs: torch.Tensor) -> list[float]:
    """Per hidden layer of the bundled MLP: the share of ReLU units that are zero on every input."""
    weights = sorted(n for n in params if n.endswith("weight"))
    h, out = inputs, []
    for name in weights[:-1]:
        h = torch.relu(h @ params[name].T + params[name[:-6] + "bias"])
        out.append(float((h.max(dim=0).values <= 0).to(torch.float64).mean()))
    return out


class Probe:
    """What the instrumented server records; one per run."""

    def __init__(self, *, oracle_from: int | None, eval_every: int, rounds: int) -> None:
        self.oracle_from, self.eval_every, self.rounds = oracle_from, eval_every, rounds
        self.data: Any = None
        self.steps = 0
        self.inputs: torch.Tensor | None = None
        self.medclip: MedianClipping | None = None
        self.rows: list[dict[str, Any]] = []


PROBE: Probe | None = None


class DiagServer(Server):
    """``Server`` that records its own state after every round into ``PROBE``."""

    def run_round(self, round_idx: int, cohort: Sequence[Client], **kw: Any) -> RoundRecord:
        probe = PROBE
        assert probe is not None
        attackers_in = sum(c.malicious for c in cohort)
        if probe.oracle_from is not None and round_idx >= probe.oracle_from:
            cohort = [c for c in cohort if not c.malicious]
        before = self.model.vector.clone()
        rec = super().run_round(round_idx, cohort, **kw)
        bad_flagged = sum(c in set(rec.malicious) for c in rec.flagged)
        row: dict[str, Any] = {
            "round": round_idx, "attackers": attackers_in, "attackers_excluded": bad_flagged,
            "honest_excluded": len(rec.flagged) - bad_flagged, "aggregate_norm": rec.update_norm,
            "step_norm": float((self.model.vector - before).norm()),
        }
        if probe.medclip is not None and probe.medclip._bounds:
            row["clip_bound"] = probe.medclip._bounds[-1]
        if self.model.name == "adam":
            row["adam_m_norm"] = float(self.model._exp_avg.norm())
            t = self.model._steps.clamp_min(1).to(torch.float64)
            vhat = self.model._exp_avg_sq.to(torch.float64) / (1 - self.model.betas[1] ** t)
            row["adam_sqrt_vhat_median"] = float(vhat.sqrt().median())
        assert probe.inputs is not None
        row["dead_units"] = dead_units(self.params, probe.inputs)
        if round_idx % probe.eval_every == probe.eval_every - 1 or round_idx >= probe.rounds - 5:
            row["accuracy"] = personalize(self.learner, self.params, probe.data.heldout, steps=probe.steps,
                                          device=self.device).mean
        probe.rows.append(row)
        return rec


def run(label: str, defense_spec: str, attack: str, seed: int, args: argparse.Namespace, *,
        oracle_from: int | None = None, window: tuple[int, int] | None = None) -> dict[str, Any]:
    global PROBE
    cfg = RunConfig(dataset="digits-fewshot", algorithm=args.algorithm, rounds=args.rounds, clients_per_round=10,
                    seed=seed, defense=defense_spec, attack=attack, malicious=args.malicious, last_k=5)
    data = experiment.load_dataset(cfg.dataset, seed=seed)
    defense = make_defense(defense_spec)
    probe = Probe(oracle_from=oracle_from, eval_every=args.eval_every, rounds=args.rounds)
    probe.data, probe.steps = data, cfg.resolved(data.kind)["finetune_steps"]
    probe.inputs = torch.cat([t.support_x for t in data.heldout])
    probe.medclip = _medclip(defense)
    PROBE = probe
    inst = None
    if window is not None and attack != "none":
        inst = WindowedAttack(make_attack(attack), *window)
    t0 = time.perf_counter()
    res = run_experiment(cfg, dataset=data, defense=defense, attack=inst)
    PROBE = None
    last5 = res.metrics["personalized_last_k"]["mean"]
    return {"label": label, "defense": defense_spec, "attack": attack, "seed": seed,
            "oracle": oracle_from == 0, "oracle_from": oracle_from,
            "window": list(window) if window else None, "last_5": last5,
            "seconds": round(time.perf_counter() - t0, 1), "rounds": probe.rows}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per label: last-5 accuracy per seed and their mean, and phase means of the recorded series."""
    out: dict[str, Any] = {}
    phases = [(0, 10), (10, 30), (30, 60), (60, 100)]
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = [r for r in runs if r["label"] == label]
        entry: dict[str, Any] = {"per_seed": {r["seed"]: round(r["last_5"], 4) for r in rs},
                                 "mean": round(statistics.fmean(r["last_5"] for r in rs), 4)}
        for lo, hi in phases:
            rows = [x for r in rs for x in r["rounds"] if lo <= x["round"] < hi]
            if not rows:
                continue
            ph: dict[str, Any] = {}
            for key in ("attackers", "attackers_excluded", "honest_excluded"):
                ph[key] = sum(x[key] for x in rows)
            for key in ("aggregate_norm", "step_norm", "clip_bound", "adam_m_norm", "adam_sqrt_vhat_median",
                        "accuracy"):
                vals = [x[key] for x in rows if key in x]
                if vals:
                    ph[key] = round(statistics.fmean(vals), 5)
            ph["dead_units"] = [round(statistics.fmean(x["dead_units"][k] for x in rows), 4)
                                for k in range(len(rows[0]["dead_units"]))]
            entry[f"rounds_{lo}_{hi}"] = ph
        out[label] = entry
    return out


def matrix_section(args: argparse.Namespace) -> dict[str, Any]:
    """The robustness matrix (``benchmarks/robustness.py``'s functions) for the candidate defenses."""
    import robustness

    ns = argparse.Namespace(rounds=args.rounds, clients_per_round=10, seeds=args.seeds, malicious=args.fractions,
                            defenses=args.candidates, settings=args.settings, attacks=robustness.ATTACKS,
                            last_k=5)
    runner = robustness.Runner(Path(args.cache), 1)
    planned = robustness.matrix_configs(ns)
    runner.run(planned)
    return {"args": {k: v for k, v in vars(ns).items()}, "errors": runner.errors(planned),
            "runs_done": sum(runner.get(c) is not None for c in planned), "runs_planned": len(planned),
            "matrix": robustness.matrix(ns, runner)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--section", choices=["diagnosis", "candidates", "matrix"], default="diagnosis")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--malicious", type=float, default=0.2)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.25], help="matrix: malicious fractions")
    ap.add_argument("--settings", nargs="+", default=["digits-fewshot/fomaml"], help="matrix: dataset/algorithm")
    ap.add_argument("--cache", default="results/robustness-decline-runs.jsonl", help="matrix: the runs' cache")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--algorithm", default="fomaml")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--candidates", nargs="+", default=[DEFAULT])
    ap.add_argument("--labels", nargs="+", help="diagnosis: only these ablations, merged into the section in --out")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    experiment.Server = DiagServer  # type: ignore[misc]  # the instrumented server, for these runs only
    runs: list[dict[str, Any]] = []
    if args.section == "matrix":
        section = matrix_section(args)
    else:
        for seed in args.seeds:
            if args.section == "diagnosis":
                ablations: dict[str, dict[str, Any]] = {
                    "attack": dict(spec=DEFAULT, attack=ATTACK), "clean": dict(spec=DEFAULT, attack="none"),
                    "mean-clean": dict(spec="mean", attack="none"),
                    "oracle": dict(spec=DEFAULT, attack=ATTACK, oracle_from=0),
                    "attack-0-10": dict(spec=DEFAULT, attack=ATTACK, window=(0, 11)),
                    "attack-30-": dict(spec=DEFAULT, attack=ATTACK, window=(30, args.rounds)),
                    "attack-0-30": dict(spec=DEFAULT, attack=ATTACK, window=(0, 30)),
                    "oracle-30-": dict(spec=DEFAULT, attack=ATTACK, oracle_from=30),
                }
                for label in args.labels or list(ablations):
                    kw: dict[str, Any] = dict(ablations[label])
                    runs.append(run(label, kw.pop("spec"), kw.pop("attack"), seed, args, **kw))
            else:
                for spec in args.candidates:
                    runs.append(run(f"{spec} | {ATTACK}", spec, ATTACK, seed, args))
                    runs.append(run(f"{spec} | none", spec, "none", seed, args))
    report: dict[str, Any] = {}
    if args.out and Path(args.out).exists():
        report = json.loads(Path(args.out).read_text())
    if args.section != "matrix":
        if args.labels and args.section in report:  # merge: replace these labels' runs, keep the others
            runs = [r for r in report[args.section]["runs"] if r["label"] not in args.labels] + runs
        section = {"args": vars(args), "summary": summary(runs), "runs": runs}
    report[args.section] = section
    write_report(rounded(report), args.out, indent=None)


def rounded(value: Any, digits: int = 6) -> Any:
    """``value`` with every float rounded to ``digits`` decimals (the per-round series stay readable in size)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


if __name__ == "__main__":
    main()
