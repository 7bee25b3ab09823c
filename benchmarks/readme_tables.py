"""Regenerate the README's performance tables from the benchmarks' JSON output.

Each table lives between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in README.md and
is rendered from ``benchmarks/json/NAME.json`` (written by the benchmark's ``--out``).  No
number in those regions is typed by hand: rerun the benchmark, then this script.

    python benchmarks/readme_tables.py            # rewrite the regions in place
    python benchmarks/readme_tables.py --check    # exit 1 if a region differs from its JSON

Regions whose JSON file is missing are left as they are (and reported).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REGION = re.compile(r"(<!-- bench:(?P<name>[a-z0-9_]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.S)


def _s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _r(x: float) -> str:
    return f"{x:.2f}x"


def _measured(data: dict[str, Any]) -> str:
    before = data.get("machine_before", {})
    after = data.get("machine_after", {})
    when = before.get("utc", "date not recorded")
    load = before.get("load_avg", ["?"])[0], after.get("load_avg", ["?"])[0]
    partial = " Partial run: stopped before every row was measured; the rows shown are complete." \
        if data.get("partial") else ""
    return (f"Measured {when} on {before.get('cpus', '?')} CPUs shared with other work (1-min load average "
            f"{load[0]} before, {load[1]} after; torch {before.get('torch', '?')}, "
            f"{before.get('torch_threads', '?')} threads): medians of interleaved repeats.{partial}")


def render_defenses(data: dict[str, Any]) -> str:
    st = data["setup"]
    floor = data["floor"]["sum_float32_s"]
    lines = [
        f"n={st['n']}, d={st['d']:,} float32, f={st['f']}, {st['reps']} repeats; ByzFL {data['byzfl']}. "
        f"Floor: float32 sum of the rows, {_s(floor)} s. " + _measured(data),
        "",
        "| rule | securefml s | / floor | ByzFL numpy s | ByzFL torch s | securefml / fastest ByzFL | target | met |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for spec, e in data["rules"].items():
        peers = e.get("byzfl_s", {})
        numpy_s = peers.get("byzfl_numpy")
        torch_s = peers.get("byzfl_torch", peers.get("byzfl_parts_torch_numpy"))
        best = min(peers.values()) if peers else None
        lines.append(
            f"| {spec} | {_s(e['seconds'])} | {_r(e['over_floor'])} | {_s(numpy_s) if numpy_s else '-'} | "
            f"{_s(torch_s) if torch_s else '-'} | {_r(e['seconds'] / best) if best else e.get('anchor', '-')} | "
            f"{e.get('target', '-')} | {'yes' if e.get('met') else ('no' if 'met' in e else '-')} |"
        )
    acc = data.get("mean_accuracy")
    if acc:
        lines += ["", f"Mean accuracy: largest error {acc['max_abs_error']:.2e}, "
                      f"{acc['max_error_over_bound']:.3f} of its (n+2)u bound."]
    if "bulyan:f=" + str(st["f"]) in data["rules"]:
        lines += ["ByzFL has no Bulyan: its row is compared with ByzFL's Krum plus ByzFL's Meamed on n-2f rows."]
    return "\n".join(lines) + "\n"


def render_plaintext(data: dict[str, Any]) -> str:
    st, sec, rat = data["setup"], data["seconds"], data["ratios"]
    rows = [
        ("float32 sum of the N vectors (floor)", sec["floor_sum_s"], "-"),
        ("wire decode of the N messages alone (floor)", sec["floor_decode_s"], "-"),
        ("plaintext server half (decode + aggregate)", sec["plaintext_server_s"],
         f"{_r(rat['plaintext_server_over_floor_sum_plus_decode'])} the two floors"),
        ("plaintext round (encode + decode + aggregate)", sec["plaintext_round_s"],
         f"{_r(rat['plaintext_round_over_fastest_secaggplus'])} the faster SecAgg+ round"),
    ]
    for k, v in sec.items():
        if k.startswith("secaggplus_round"):
            how = k.removeprefix("secaggplus_round").removesuffix("_s").strip("_").replace("workers", "workers=")
            rows.append((f"SecAgg+ round, {how or 'single process'}", v, "-"))
    lines = [f"N={st['n']}, L={st['L']:,}, k={st['neighbours']}, {st['reps']} repeats. " + _measured(data), "",
             "| step | seconds | ratio |", "|---|---:|---:|"]
    lines += [f"| {a} | {_s(b) if isinstance(b, float) else b} | {c} |" for a, b, c in rows]
    tg = {k: "met" if v else "not met" for k, v in data["targets"].items()}
    lines += ["", f"Targets: round no slower than SecAgg+: {tg['round_le_secaggplus']}; "
                  f"server half within 2x the floors: {tg['server_le_2x_floor_sum_plus_decode']}."]
    return "\n".join(lines) + "\n"


def render_meta_cohorts(data: dict[str, Any]) -> str:
    st = data["setup"]
    lines = [f"{st['dataset']}, {st['clients_per_round']} clients per round, {st['rounds_per_run']} rounds per run, "
             f"{st['reps']} repeats, device {st['device']}. " + _measured(data), "",
             "| learner | loop rounds/s | vmap rounds/s | speedup | largest difference of the global models |",
             "|---|---:|---:|---:|---:|"]
    for alg, e in data["learners"].items():
        lines.append(f"| {alg} | {e['loop_rounds_per_s']:.3f} | {e['vmap_rounds_per_s']:.3f} | {_r(e['speedup'])} | "
                     f"{e['max_abs_diff_global_model']:.1e} |")
    return "\n".join(lines) + "\n"


def _iv(v: dict[str, Any] | None, digits: int = 3) -> str:
    """``mean ± 95 % half-width`` from a benchmark interval (``-`` when missing)."""
    if not v:
        return "-"
    half = v.get("ci95")
    return f"{v['mean']:.{digits}f}" + (f" ± {half:.{digits}f}" if half is not None else "")


def render_robustness(data: dict[str, Any]) -> str:
    """Selection, detection and worst-case tables of ``benchmarks/robustness.py``."""
    args = data["args"]
    before = data.get("machine_before", {})
    after = data.get("machine_after", {})
    if data.get("report_only"):
        when = (f"Summarized {before.get('utc', '?')} from the runs recorded in the benchmark's cache, measured "
                f"earlier on {before.get('cpus', '?')} CPUs shared with other work (1-min load average "
                f"{before.get('load_avg', ['?'])[0]} at summary time)")
    else:
        when = (f"Measured {before.get('utc', '?')} to {after.get('utc', '?')} on {before.get('cpus', '?')} CPUs "
                f"shared with other work (1-min load average {before.get('load_avg', ['?'])[0]} before, "
                f"{after.get('load_avg', ['?'])[0]} after)")
    lines = [f"{when}, one torch thread per run; {data['runs_done']} of {data['runs_planned']} planned runs "
             f"finished. Accuracy: personalized, mean of the last {args['last_k']} rounds' evaluations, "
             f"mean ± 95 % t-interval over seeds."]
    errors = data.get("errors", [])
    if errors:
        where = "; ".join(f"{e['algorithm']} `{e['defense']}` {e['attack']} {e['malicious']:.0%} seed {e['seed']}"
                          for e in errors)
        kinds = sorted({e["error"].split(" for ")[0] for e in errors})
        lines.append(f"{len(errors)} runs raised ({'; '.join(kinds)}: a cohort held a Byzantine majority); each "
                     f"is left out of its seed's worst case: {where}.")
    if data.get("selection"):
        lines += ["", f"Selection (digits-fewshot FOMAML, 10 per round, {args['selection_rounds']} rounds):", "",
                  "| selection | rounds | accuracy | minus all layers | bytes vs all layers | seeds |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in data["selection"]:
            b = r.get("bytes_vs_all")
            lines.append(f"| `{r['select']}` | {r['rounds']} | {_iv(r['last_k'])} | {_iv(r.get('minus_all_layers'))} | "
                         f"{f'{b:.2f}' if b is not None else '-'} | {len(r['seeds'])} |")
    if data.get("detection"):
        lines += ["", f"Detection (digits-fewshot FOMAML, 100 clients, 25 % unit-scale sign flippers, 8 per round, "
                      f"{args['detection_rounds']} rounds, `{args['detector']}`); cumulative TPR / FPR:", "",
                  "| protocol | seed | round 10 | round 50 | last round | met (TPR >= 0.8, FPR <= 0.1) | "
                  "pooled per round | accuracy |",
                  "|---|---:|---|---|---|---|---|---:|"]
        for r in data["detection"]:
            every = {c["round"]: c for c in r["cumulative_every_10"]}

            def at(rnd: int, every: dict[int, Any] = every) -> str:
                c = every.get(rnd)
                return f"{c['tpr']:.2f} / {c['fpr']:.2f}" if c else "-"

            fin, pooled = r["final_cumulative"], r["pooled_per_round"]
            lines.append(f"| {r['protocol']} | {r['seed']} | {at(9)} | {at(49)} | "
                         f"{fin['tpr']:.2f} / {fin['fpr']:.2f} | "
                         f"{'yes' if r['target_met'] else 'no'} | {pooled['tpr']:.2f} / {pooled['fpr']:.2f} | "
                         f"{r['accuracy_last_k']:.3f} |")
    if data.get("matrix"):
        lines += ["", f"Worst case over {', '.join(args['attacks'])} ({args['rounds']} rounds, "
                      f"{args['clients_per_round']} per round; sorted by worst case):", "",
                  "| setting | malicious | defense | clean | worst case | worst attack | drop from clean | "
                  "clean minus mean's clean | seeds |",
                  "|---|---:|---|---:|---:|---|---:|---:|---:|"]
        for block in data["matrix"]:
            for r in block["rows"]:
                lines.append(f"| {block['dataset']} {block['algorithm']} | {block['malicious']:.0%} | "
                             f"`{r['defense']}` | {_iv(r['clean'])} | {_iv(r['worst_case'])} | {r['worst_attack']} | "
                             f"{_iv(r['drop_from_clean'])} | {_iv(r.get('clean_minus_mean_clean'))} | "
                             f"{len(r['seeds'])} |")
    return "\n".join(lines) + "\n"


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "defenses": render_defenses,
    "plaintext": render_plaintext,
    "meta_cohorts": render_meta_cohorts,
    "robustness": render_robustness,
}


def regenerate(text: str, json_dir: Path) -> tuple[str, list[str], list[str]]:
    """The README text with every known region re-rendered; and the regions updated / skipped."""
    updated: list[str] = []
    skipped: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group("name")
        path = json_dir / f"{name}.json"
        if name not in RENDERERS or not path.exists():
            skipped.append(name)
            return m.group(0)
        body = RENDERERS[name](json.loads(path.read_text()))
        if body != m.group("body"):
            updated.append(name)
        return m.group(1) + body + m.group(4)

    return REGION.sub(sub, text), updated, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--json-dir", default=str(ROOT / "benchmarks" / "json"))
    ap.add_argument("--check", action="store_true", help="report out-of-date regions, change nothing")
    args = ap.parse_args()
    readme = Path(args.readme)
    new, updated, skipped = regenerate(readme.read_text(), Path(args.json_dir))
    report = {"updated": updated, "skipped_no_json_or_renderer": skipped}
    if args.check:
        print(json.dumps(report))
        sys.exit(1 if updated else 0)
    readme.write_text(new)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
