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
import math
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


def render_dp_step(data: dict[str, Any]) -> str:
    st, steps = data["setup"], data["steps"]
    lines = [f"{st['dataset']} {st['model']} ({steps['model_parameters']:,} parameters), sigma={st['sigma']}, "
             f"C={st['clip']}, {st['reps']} repeats, device {st['device']}; milliseconds of thread-CPU time (wall "
             "time in the JSON). " + _measured(data), "",
             "| batch | non-private (floor) | DP, auto | DP, vmap | Opacus ew (before) | Opacus hooks (before) | "
             "noise alone | DP auto / floor | DP auto / fastest Opacus | largest difference to Opacus |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b, e in steps["batches"].items():
        ms = e["ms"]
        lines.append(f"| {b} | {ms['plain']:.2f} | {ms['dp_auto']:.2f} | {ms['dp_vmap']:.2f} | {ms['opacus_ew']:.2f} | "
                     f"{ms['opacus_hooks']:.2f} | {ms['noise']:.2f} | {_r(e['dp_auto_over_plain'])} | "
                     f"{_r(e['dp_auto_over_fastest_opacus'])} | {e['max_abs_diff_vs_opacus_zero_noise']:.1e} |")
    lines += ["", f"One client round (ms per client, {st['round_reps']} repeats, q={st['round_sample_rate']}):", "",
              "| learner | non-private | record DP, auto | record DP, vmap | auto / non-private | DP steps per round "
              "| covers the support set |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for name, e in data["rounds"].items():
        ms = e["ms_per_client"]
        lines.append(f"| {name} | {ms['plain']:.1f} | {ms['record_dp_auto']:.1f} | {ms['record_dp_vmap']:.1f} | "
                     f"{_r(e['record_dp_auto_over_plain'])} | {e['released_gradients_per_round']} | "
                     f"{'yes' if e['covers_support'] else 'no (query only)'} |")
    return "\n".join(lines) + "\n"


def render_flower(data: dict[str, Any]) -> str:
    """securefml SecAgg+ on Flower vs Flower's SecAggPlusWorkflow, both through run_simulation (same run)."""
    before, after = data.get("machine_before", {}), data.get("machine_after", {})
    if "scenarios" not in data or not data["scenarios"]:
        return "Flower is not installed: `\"anchor\": \"not measured\"`.\n"
    lines = [
        f"L={data['length']:,} float32 entries per client, {data['rounds']} rounds per peer (median of rounds 2..), "
        f"Flower {data.get('flower_version', '?')}, both through `run_simulation` (Ray, one actor) in one process. "
        f"Measured {before.get('utc', '?')} on {before.get('cpus', '?')} CPUs shared with other work (1-min load "
        f"average {before.get('load_avg', ['?'])[0]} before, {after.get('load_avg', ['?'])[0]} after)."
        + (" Partial run: the rows shown are complete." if data.get("partial") else ""),
        "",
        "| SuperNodes | securefml k / t | Flower neighbours / t | securefml s/round | Flower s/round "
        "| Flower / securefml | securefml bytes/client | Flower bytes/client | all accepted |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for sc in data["scenarios"]:
        ours, peer = sc["securefml"], sc["flower_secaggplus"]
        ratio = sc.get("flower_over_securefml_round_time")
        peer_s = _s(peer["median_round_s"]) if peer.get("median_round_s") else "failed"
        peer_b = f"{peer['bytes_per_client_per_round']:,.0f}" if peer.get("bytes_per_client_per_round") else "-"
        lines.append(
            f"| {sc['nodes']} | {sc['k']} / {sc['t']} | {peer.get('neighbours', '?')} / "
            f"{peer.get('reconstruction_threshold', '?')} | {_s(ours['median_round_s'])} | {peer_s} "
            f"| {_r(ratio) if ratio else '-'} | {ours['bytes_per_client_per_round']:,.0f} | {peer_b} "
            f"| {'yes' if ours['all_accepted'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def render_flower_state(data: dict[str, Any]) -> str:
    """What saving a SecAgg+ client half in Context.state costs per stage (benchmarks/flower_state.py)."""
    before = data.get("machine_before", {})
    lines = [
        f"One SecAgg+ round, N={data['nodes']} clients, k={data['k']}, L={data['length']:,} float32 entries, "
        f"medians over clients; measured {before.get('utc', '?')} on {before.get('cpus', '?')} CPUs shared with "
        f"other work (1-min load average {before.get('load_avg', ['?'])[0]}).",
        "",
        "| stage | client answer ms | dump_half ms | load_half ms | saved bytes | (dump + load) / answer |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for st in data["stages"]:
        ratio = st.get("codec_over_respond")
        lines.append(f"| {st['stage']} | {st['respond_ms']:.3f} | {st['dump_ms']:.3f} | {st['load_ms']:.3f} | "
                     f"{st['state_bytes']:,} | {_r(ratio) if ratio is not None else '-'} |")
    return "\n".join(lines) + "\n"


def render_bayes(data: dict[str, Any]) -> str:
    st = data["setting"]
    names = {"metasgd": "Meta-SGD", "metasgd-ts": "Meta-SGD + TS (support)", "bayes-metasgd": "bayes-metasgd",
             "bayes-maml": "bayes-maml", "pfedbayes": "pFedBayes"}
    lines = [f"{st['dataset']} {st['n_way']}-way {st['k_shot']}-shot, {st['clients_per_round']} clients per round, "
             f"**{st['rounds']} rounds, seeds {', '.join(str(s) for s in st['seeds'])}** (means over seeds), "
             f"{st['heldout_clients']} held-out clients, {st['mc_samples_eval']} Monte Carlo samples. "
             "ECE floor: what the ECE estimator reports for the learner's own predictions if they were "
             "exactly calibrated (labels drawn from them).", "",
             "| learner | accuracy | ECE | ECE floor | ECE pooled | pooled floor | NLL | Brier | mean confidence "
             "| out-of-task AUROC | s / run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in names.items():
        if key not in data["results"]:
            continue
        m = data["results"][key]["mean"]
        sec = data["results"][key].get("seconds_per_run")
        lines.append(f"| {label} | {m['accuracy']:.3f} | {m['ece']:.3f} | {m['ece_floor']:.3f} | {m['ece_pooled']:.3f} "
                     f"| {m['ece_pooled_floor']:.3f} | {m['nll']:.3f} | {m['brier']:.3f} | {m['mean_confidence']:.3f} "
                     f"| {m['ood_auroc']:.3f} | {'-' if sec is None else f'{sec:.0f}'} |")
    c = data["checks"]
    lines += ["", f"bayes-metasgd / Meta-SGD: ECE {_r(c['ece ratio bayes-metasgd / metasgd (target <= 0.5)'])} "
              f"(target <= 0.50x), pooled ECE {_r(c['pooled ece ratio bayes-metasgd / metasgd'])}, accuracy "
              f"{c['accuracy difference bayes-metasgd - metasgd (points, target >= -1)']:+.1f} points (target >= -1), "
              f"lower NLL: {'yes' if c['nll bayes-metasgd < metasgd'] else 'no'}; target met: "
              f"{'yes' if c['target: ece <= 0.5x metasgd at accuracy within 1 point and lower nll'] else 'no'}."]
    pr = data.get("protocols")
    if pr:
        lines += ["", f"Protocols (bayes-metasgd, {pr['rounds']} rounds, seed {pr['seed']}): "
                  + "; ".join(f"{label}: accuracy difference {pr[k]['accuracy_diff']:.1e}, "
                              f"ECE {pr[k]['ece_diff']:.1e}, NLL {pr[k]['nll_diff']:.1e}, largest parameter difference "
                              f"{pr[k]['max_abs_param_diff_vs_plaintext']:.1e} (norm {pr[k]['param_norm']:.0f})"
                              for k, label in (("ckks", "CKKS"), ("secagg", "SecAgg+"))) + "."]
    wall = data.get("wall_seconds")
    lines += ["", data["note"] + (f"; whole benchmark {wall:.0f} s." if wall is not None else ".")]
    return "\n".join(lines) + "\n"


def _ci(v: dict[str, Any] | None, digits: int = 3) -> str:
    """``mean [lo, hi]`` from a ``benchmarks/bayes_calibration.py`` interval (``-`` when undefined)."""
    if not v or v.get("mean") is None:
        return "-"
    if v.get("lo") is None:
        return f"{v['mean']:.{digits}f}"
    return f"{v['mean']:.{digits}f} [{v['lo']:.{digits}f}, {v['hi']:.{digits}f}]"


def render_bayes_calibration(data: dict[str, Any]) -> str:
    st = data["setting"]
    names = {"metasgd": "Meta-SGD", "metasgd-ts": "Meta-SGD + TS (support)",
             "metasgd-ts-cv": "Meta-SGD + TS (cross-validated support)",
             "metasgd-ts-train": "Meta-SGD + TS (training clients)", "bayes-metasgd": "bayes-metasgd",
             "bayes-metasgd-tempered": "bayes-metasgd, tempered posterior", "bayes-maml": "bayes-maml",
             "bayes-maml-tempered": "bayes-maml, tempered posterior", "pfedbayes": "pFedBayes"}
    names = {**names, "bayes-metasgd-ts-train": "bayes-metasgd + TS (training clients)",
             "bayes-maml-ts-train": "bayes-maml + TS (training clients)"}
    names.update({"bayes-metasgd-varstep": "bayes-metasgd + head variance step (at scoring)",
                  "bayes-metasgd-varstep-all": "bayes-metasgd + all-layer variance step (at scoring)",
                  "bayes-maml-varstep": "bayes-maml + head variance step (at scoring)",
                  "bayes-maml-varstep-all": "bayes-maml + all-layer variance step (at scoring)"})
    for key, label in (("kl1e-3", "KL weight 0.001"), ("kl0", "KL weight 0"), ("lograte", "log-scale variance rates"),
                       ("headvar", "head variance step in training"),
                       ("allvar", "all-layer variance step in training")):
        v = f"bayes-metasgd-{key}"  # a retrained variant (benchmarks/bayes_variant.py)
        names.update({v: f"bayes-metasgd, {label}", f"{v}-tempered": f"bayes-metasgd, {label}, tempered posterior",
                      f"{v}-ts-train": f"bayes-metasgd, {label}, + TS (training clients)",
                      f"{v}-varstep": f"bayes-metasgd, {label}, + head variance step (at scoring)",
                      f"{v}-varstep-all": f"bayes-metasgd, {label}, + all-layer variance step (at scoring)"})
    names.update({"metasgd-ts-hier": "Meta-SGD + per-client TS under a federation prior",
                  "bayes-metasgd-ts-hier": "bayes-metasgd + per-client TS under a federation prior",
                  "bayes-metasgd-ebscale": "bayes-metasgd + empirical-Bayes prior scale (at scoring)",
                  "bayes-metasgd-allvar-ts-hier": "bayes-metasgd, all-layer variance step in training, + per-client "
                                                  "TS under a federation prior",
                  "bayes-metasgd-allvar-ebscale": "bayes-metasgd, all-layer variance step in training, + "
                                                  "empirical-Bayes prior scale (at scoring)",
                  "bayes-metasgd-ebscale-own": "bayes-metasgd + empirical-Bayes prior scale at its own KL weight, "
                                               "nu = 1 (diagnostic, not chosen)",
                  "bayes-metasgd-allvar-ebscale-own": "bayes-metasgd, all-layer variance step in training, + "
                                                      "empirical-Bayes prior scale at its own KL weight, nu = 1 "
                                                      "(diagnostic, not chosen)"})
    big = st["big"]
    lines = [f"The same trained models (200 rounds, seeds {', '.join(str(s) for s in st['seeds'])}) re-scored on "
             f"{big['heldout_clients']} new held-out clients per seed with {min(big['query_per_class'])}-"
             f"{max(big['query_per_class'])} query images per class (every held-out image of the class not in the "
             "support set); mean [95% interval over seeds]. **Judged on: debiased L2 calibration error per "
             "client** (Kumar et al. 2019, 15 equal-mass bins; ~0 for calibrated predictions at any query size).", "",
             "| learner | accuracy | ECE | ECE floor | debiased L2-CE | debiased L2-CE pooled | NLL "
             "| mean confidence | out-of-task AUROC |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in names.items():
        m = data["big"].get(key)
        if m is None:
            continue
        lines.append(f"| {label} | {_ci(m['accuracy'])} | {_ci(m['ece'])} | {_ci(m['ece_floor'])} "
                     f"| {_ci(m['l2_ce_debiased'])} | {_ci(m['l2_ce_debiased_pooled'])} | {_ci(m['nll'])} "
                     f"| {_ci(m['mean_confidence'])} | {_ci(m['ood_auroc'])} |")
    small = data["small"]
    if "metasgd" in small and "bayes-metasgd" in small:
        lines += ["", "On the original 30 clients x 50 queries: ECE " + ", ".join(
            f"{names[k]} {_ci(small[k]['ece'])} (floor {_ci(small[k]['ece_floor'])}), debiased L2-CE "
            f"{_ci(small[k]['l2_ce_debiased'])}" for k in ("metasgd", "bayes-metasgd")) + "."]
    c = data["checks"]
    ratio = c.get("l2_ce_debiased ratio bayes-metasgd / metasgd (target <= 0.5)")
    diff = c.get("l2_ce_debiased bayes-metasgd - metasgd")
    if ratio is not None and diff is not None:
        acc = c["accuracy difference bayes-metasgd - metasgd (points)"]
        boot = c.get("l2_ce_debiased ratio, paired bootstrap over clients") or {}
        paired = (f" (paired bootstrap over clients [{boot['lo']:.2f}, {boot['hi']:.2f}])"
                  if boot.get("lo") is not None else "")
        lines += ["", f"bayes-metasgd / Meta-SGD, debiased L2-CE: ratio {_ci(ratio, 2)}{paired} (target <= 0.5), "
                  f"difference {_ci(diff)}; accuracy {_ci(acc, 1)} points; NLL difference "
                  f"{_ci(c['nll difference bayes-metasgd - metasgd'])}."]
    for key in ("bayes-metasgd-varstep", "bayes-metasgd-headvar", "bayes-metasgd-varstep-all",
                "bayes-metasgd-allvar", "bayes-metasgd-allvar-varstep-all"):  # the variance step, scoring/retrained
        vs_m = c.get(f"l2_ce_debiased ratio {key} / metasgd")
        if vs_m is None or key not in names:
            continue
        bm = c.get(f"l2_ce_debiased ratio {key} / metasgd, paired bootstrap over clients") or {}
        bt = c.get(f"l2_ce_debiased ratio {key} / metasgd-ts-train, paired bootstrap over clients") or {}
        lines += ["", f"{names[key]}, debiased L2-CE: ratio to Meta-SGD {_ci(vs_m, 2)} (paired bootstrap "
                  f"[{bm.get('lo', math.nan):.2f}, {bm.get('hi', math.nan):.2f}]; target <= 0.5), to Meta-SGD + TS "
                  f"(training clients) paired bootstrap [{bt.get('lo', math.nan):.2f}, {bt.get('hi', math.nan):.2f}]; "
                  f"accuracy {_ci(c[f'accuracy difference {key} - metasgd (points)'], 1)} points, NLL difference "
                  f"{_ci(c[f'nll difference {key} - metasgd'])}, out-of-task AUROC difference "
                  f"{_ci(c.get(f'ood_auroc difference {key} - metasgd'))} against Meta-SGD."]
    for key in ("bayes-metasgd-kl1e-3", "bayes-metasgd-kl0", "bayes-metasgd-lograte",
                "bayes-metasgd-headvar", "bayes-metasgd-allvar"):  # retrained variants
        vs_m = c.get(f"l2_ce_debiased ratio {key} / metasgd")
        vs_b = c.get(f"l2_ce_debiased ratio {key} / bayes-metasgd")
        if vs_m is None or vs_b is None:
            continue
        bm = c.get(f"l2_ce_debiased ratio {key} / metasgd, paired bootstrap over clients") or {}
        bb = c.get(f"l2_ce_debiased ratio {key} / bayes-metasgd, paired bootstrap over clients") or {}
        lines += ["", f"{names[key]} (retrained), debiased L2-CE: ratio to Meta-SGD {_ci(vs_m, 2)} (paired bootstrap "
                  f"[{bm.get('lo', math.nan):.2f}, {bm.get('hi', math.nan):.2f}]), to bayes-metasgd {_ci(vs_b, 2)} "
                  f"(paired bootstrap [{bb.get('lo', math.nan):.2f}, {bb.get('hi', math.nan):.2f}]); accuracy "
                  f"{_ci(c[f'accuracy difference {key} - metasgd (points)'], 1)} points and NLL difference "
                  f"{_ci(c[f'nll difference {key} - metasgd'])} against Meta-SGD."]
    step = c.get("all-layer vs head variance step, training-pool NLL at the chosen kappa")
    if step:
        lines += ["", "All-layer vs head-only variance step at scoring time, on *training-pool* clients (where "
                  "kappa is chosen): pooled query NLL " + "; ".join(
                      f"{k}: {v['all_layers']:.4f} vs {v['head_only']:.4f}" for k, v in step.items()) + "."]
    rho = c.get("spearman across held-out clients, mean log-variance vs query accuracy (all-layer step)")
    if rho:
        lines += ["", "Spearman correlation across held-out clients between a layer's mean posterior log-variance "
                  "and the client's query accuracy, all-layer step at scoring (mean [95% interval over seeds]): "
                  + "; ".join(f"{k} {_ci(v, 2)}" for k, v in rho.items()) + "."]
    misfit = [(k[len("spearman across held-out clients vs query accuracy ("):-1], v) for k, v in c.items()
              if k.startswith("spearman across held-out clients vs query accuracy (")]
    if misfit:
        lines += ["", "Misfit-tracking variants (per-client width or temperature chosen on the support set, "
                  "hyper-parameters on training-pool clients), Spearman correlation across held-out clients with "
                  "query accuracy (negative: the clients fitted worst get the widest posterior or highest "
                  "temperature): " + "; ".join(
                      f"{names.get(label, label)}: " + ", ".join(f"{k} {_ci(v, 2)}" for k, v in rho_.items())
                      for label, rho_ in misfit) + "."]
        for key in ("metasgd-ts-hier", "bayes-metasgd-ts-hier", "bayes-metasgd-ebscale",
                    "bayes-metasgd-allvar-ts-hier", "bayes-metasgd-allvar-ebscale"):
            bm = c.get(f"l2_ce_debiased ratio {key} / metasgd, paired bootstrap over clients")
            if not bm or key not in data["big"]:
                continue
            lines += ["", f"{names[key]}, debiased L2-CE: ratio to Meta-SGD "
                      f"{_ci(c.get(f'l2_ce_debiased ratio {key} / metasgd'), 2)} (paired bootstrap "
                      f"[{bm.get('lo', math.nan):.2f}, {bm.get('hi', math.nan):.2f}]; target <= 0.5); accuracy "
                      f"{_ci(c[f'accuracy difference {key} - metasgd (points)'], 1)} points, NLL difference "
                      f"{_ci(c[f'nll difference {key} - metasgd'])}, out-of-task AUROC difference "
                      f"{_ci(c.get(f'ood_auroc difference {key} - metasgd'))} against Meta-SGD."]
    lines += ["", data["note"] + "."]
    return "\n".join(lines) + "\n"


def render_ckks(data: dict[str, Any]) -> str:
    m = data.get("machine", {})
    by_part = data.get("machine_by_part", {})

    def stamp(mm: dict[str, Any]) -> str:
        load = mm.get("load_avg", ["not recorded"])[0]
        shown = f"{load:.1f}" if isinstance(load, float) else load
        return f"{mm.get('utc', 'date not recorded')} (1-min load average {shown})"

    runs = {}
    for part in ("aggregation", "bytes", "gram", "round", "threads"):
        if part in data:
            runs.setdefault(stamp(by_part.get(part, m)), []).append(part)
    when = "; ".join(f"{', '.join(parts)} measured {st}" for st, parts in runs.items())
    lines = [f"TenSEAL {m.get('tenseal', '?')}, {m.get('cpus', '?')} CPUs; {when}; every ratio is against a peer "
             "timed in the same run.", "", "| what | measured | target | met |", "|---|---|---|---|"]
    met = data.get("targets_met", {})
    for preset, b in data.get("bytes", {}).items():
        lines.append(f"| bytes per float32, {preset} preset | {b['bytes_per_float32']:.2f} "
                     f"(slot utilisation {b['slot_utilisation']:.3f}) | - | - |")
    a = data.get("aggregation")
    if a:
        lines.append(f"| server receive, N={a['clients']}, L={a['length']:,}, vs raw TenSEAL deserialize+add loop | "
                     f"{_r(a['ratio_server_to_raw_cpu'])} CPU ({_r(a['ratio_server_to_raw'])} wall; "
                     f"{_s(a['server_half_s'])} s vs {_s(a['raw_deserialize_add_s'])} s) | <= 1.2x | "
                     f"{'yes' if met.get('server_aggregation_le_1.2x_raw_cpu') else 'no'} |")
        if "ratio_server_to_raw_from_message_cpu" in a:
            r2 = a["ratio_server_to_raw_from_message_cpu"]
            own = _r(a["ratio_raw_from_message_to_raw_cpu"])
            lines.append(f"| same, vs the raw loop from the messages (each ciphertext's copy into the `bytes` "
                         f"TenSEAL requires, envelope decode; raw loop itself {own})"
                         f" | {_r(r2)} CPU | <= 1.2x | {'yes' if r2 <= a['target_ratio_max'] else 'no'} |")
        if "ratio_server_to_raw_median_cpu" in a:
            lines.append(f"| same, medians of the interleaved runs: vs the raw loop / from the messages / through "
                         f"TenSEAL's native vector | {_r(a['ratio_server_to_raw_median_cpu'])} / "
                         f"{_r(a['ratio_server_to_raw_from_message_median_cpu'])} / "
                         f"{_r(a['ratio_server_to_raw_native_median_cpu'])} CPU | <= 1.2x (raw loop) | "
                         f"{'yes' if met.get('server_aggregation_le_1.2x_raw_median_cpu') else 'no'} |")
        v = a["verification"]
        lines.append(f"| key holder: verify + own sum + decrypt, vs decrypting the server's sum | "
                     f"{_r(v['ratio_key_holder_verified_to_unverified_cpu'])} CPU | - | - |")
        lines.append("| whole mean round, verified vs unverified | "
                     f"{_r(v['ratio_round_verified_to_unverified_cpu'])} CPU | - | - |")
        lines.append(f"| decrypted aggregate error | {a['max_abs_error']:.1e} | within the documented bound | - |")
    g = data.get("gram")
    if g:
        lines.append(f"| encrypted Gram N={g['clients']}, L={g['length']:,} ({g['chunks_per_client']} chunks), vs "
                     f"{g['pairs']} naive encrypted dot products | {_r(g['speedup_vs_naive'])} faster "
                     f"({_s(g['encrypted_gram_s'])} s vs {_s(g['naive_dot_products_s'])} s) | >= 20x | "
                     f"{'yes' if met.get('gram_ge_20x_faster_than_naive') else 'no'} |")
        if "speedup_vs_naive_cpu" in g:
            lines.append(f"| same, CPU time (key holder's path: one relinearization per pair, norms first, other "
                         f"pairs one level lower) | {_r(g['speedup_vs_naive_cpu'])} faster | >= 20x | "
                         f"{'yes' if g['speedup_vs_naive_cpu'] >= 20 else 'no'} |")
            lines.append(f"| same, vs the previous path (TenSEAL, a relinearized product per chunk) | "
                         f"{_r(g['speedup_vs_per_product_cpu'])} faster CPU ({_s(g['encrypted_gram_cpu_s'])} s vs "
                         f"{_s(g['per_product_gram_cpu_s'])} s) | - | - |")
        pr = g.get("primitives")
        if pr:
            lines.append(f"| bound for any scheme with one relinearized product per chunk pair (same run) | "
                         f"{_r(pr['speedup_bound_one_product_per_chunk'])} | - | - |")
            if "speedup_bound_products_and_rescale_only" in pr:
                lines.append(f"| bound if a pair cost only its chunk products and one rescale (same run) | "
                             f"{_r(pr['speedup_bound_products_and_rescale_only'])} | - | - |")
    th = data.get("threads")
    if th:
        lines.append(f"| SEAL's evaluator (`tenseal.sealapi`) releases the GIL: rotations with a spinning peer thread "
                     f"(1 s switch interval) / lazy Gram pairs on two threads vs one, interleaved | "
                     f"{_r(th['slowdown_with_peer'])} / {_r(th['wall_two_over_one_thread'])} wall, "
                     f"{_r(th['cpu_two_over_one_thread'])} CPU | - | {'yes' if th['releases_gil'] else 'no'} |")
    r = data.get("round")
    if r:
        for name in ("mean", "multikrum"):
            e = r[name]
            lines.append(f"| whole round through the halves, {name}, N={r['clients']}, L={r['length']:,} | "
                         f"{_s(e['round_cpu_s'])} s CPU ({_s(e['round_s'])} s wall) | - | - |")
        mk, mn = r["multikrum"], r["mean"]
        ratio = mk["round_cpu_s"] / mn["round_cpu_s"]
        lines.append(f"| MultiKrum round over the mean round (CPU) | {_r(ratio)} | <= 2x | "
                     f"{'yes' if ratio <= 2 else 'no'} |")
        if "multikrum_before" in r:  # issue 15: the key holder's Gram reads the checked bytes, files in memory
            mb = r["multikrum_before"]
            lines.append(f"| MultiKrum round vs the same with the Gram as before (each chunk re-serialized, files on "
                         f"disk), interleaved ({r['repeat']} each), median CPU / wall | "
                         f"{_s(mk['median_round_cpu_s'])} vs {_s(mb['median_round_cpu_s'])} s / "
                         f"{_s(mk['median_round_s'])} vs {_s(mb['median_round_s'])} s: "
                         f"{_r(r['multikrum_over_before_cpu'])} / {_r(r['multikrum_over_before_wall'])} | - | - |")
    return "\n".join(lines) + "\n"


def render_secagg(data: dict[str, Any]) -> str:
    """``benchmarks/secagg.py --out benchmarks/json/secagg.json``: the main scenario and its floors."""
    m, after = data["machine"], data.get("machine_after", {})
    sp, mf, wc, tg = data["secaggplus"], data["mask_floor"], data["workers_1_vs_auto"], data["targets"]
    gil, dr, full = data["gil"], data["secaggplus_10pct_dropouts"], data["secagg_full"]
    med = wc["median"]
    one, old, new = med["one_thread"], med["mask_threads"], med["concurrent_replies"]
    bound = ("the idle-cores bound (per stage, the larger of the process CPU over the cores and the busiest "
             "thread's CPU)")
    busy = m["load_avg"][0] > 2 * m["cpus"]
    lines = [
        f"Measured {m['utc']} on {m['cpus']} CPUs shared with other work (1-min load average "
        f"{m['load_avg'][0]:.1f} before, {after.get('load_avg', ['?'])[0]:.1f} after): "
        + (f"wall times are inflated by that load; CPU times and {bound} are what compare." if busy else
           f"little other load, so wall times are near the idle ones and {bound} can be checked against them."),
        "",
        "| what | measured | target | met |",
        "|---|---|---|---|",
        f"| mask-expansion floor, same run ({mf['streams']} AES-CTR streams of 4L bytes) | "
        f"{_s(mf['floor_cpu_s'])} s CPU, {_s(mf['floor_cpu_s'] / 2)} s over 2 cores | - | - |",
        f"| AES-CTR releases the GIL (a Python thread ticks during one {gil['keystream_mib']} MiB keystream) | "
        f"longest pause {gil['longest_pause_s']:.3f} s in a {_s(gil['call_with_ticker_s'])} s call | - | "
        f"{'yes' if gil['releases_gil'] else 'no'} |",
        f"| round N={sp['n']}, L={sp['L']:,}, k={sp['k_t'][0]}, masked inputs of {sp['reply_pool_threads']} clients "
        f"at once: idle-cores bound | {_s(sp['idle_cores_bound_s'])} s ({_r(sp['idle_bound_over_mask_floor_per_core'])}"
        f" the 2-core floor) | <= 1.0 s | {'yes' if tg['round_idle_cores_bound_le_1s'] else 'no'} |",
        f"| same round: CPU, all threads / wall | {_s(sp['main_process_cpu_s'])} s / {_s(sp['round_s'])} s | "
        f"<= 1.0 s wall | {'yes' if tg['round_le_1s'] else 'no'} |",
        f"| one thread / mask threads per client / concurrent replies, interleaved ({wc['rounds']} each), "
        f"median wall | {_s(one['round_s'])} / {_s(old['round_s'])} / {_s(new['round_s'])} s: concurrent = "
        f"{_r(wc['wall_concurrent_over_one'])} one thread | more never slower | "
        f"{'yes' if tg['auto_workers_not_slower_wall'] else 'no'} |",
        f"| same, median idle-cores bound | {_s(one['idle_cores_bound_s'])} / {_s(old['idle_cores_bound_s'])} / "
        f"{_s(new['idle_cores_bound_s'])} s: concurrent = {_r(wc['bound_concurrent_over_one'])} one thread, "
        f"{_r(wc['bound_concurrent_over_mask_threads'])} mask threads | more never slower | "
        f"{'yes' if tg['auto_workers_not_slower_bound'] else 'no'} |",
        f"| same, median CPU | {_s(one['main_process_cpu_s'])} / {_s(old['main_process_cpu_s'])} / "
        f"{_s(new['main_process_cpu_s'])} s | - | - |",
        f"| with 10% dropouts: idle-cores bound / CPU | {_s(dr['idle_cores_bound_s'])} s / "
        f"{_s(dr['main_process_cpu_s'])} s | - | - |",
        f"| full SecAgg N={full['n']}, L={full['L']:,} (k={full['k_t'][0]}): idle-cores bound / CPU | "
        f"{_s(full['idle_cores_bound_s'])} s / {_s(full['main_process_cpu_s'])} s | - | - |",
        f"| upload vs 4L bytes | {sp['upload_per_client_over_4L']:.4f}x | <= 1.01x | "
        f"{'yes' if tg['upload_le_1.01x_4L'] else 'no'} |",
        f"| max error vs documented bound | {sp['max_abs_error']:.1e} vs {sp['error_bound']:.2e} | within | "
        f"{'yes' if sp['max_abs_error'] <= sp['error_bound'] else 'no'} |",
    ]
    if "held_messages" in med:  # issue 15, second pass: the server's vectors in reused warm buffers
        hm = med["held_messages"]
        lines.append(f"| concurrent replies vs the same with the server holding each message (before), interleaved: "
                     f"median bound / CPU / wall | {_s(new['idle_cores_bound_s'])} vs "
                     f"{_s(hm['idle_cores_bound_s'])} s / "
                     f"{_s(new['main_process_cpu_s'])} vs {_s(hm['main_process_cpu_s'])} s / {_s(new['round_s'])} vs "
                     f"{_s(hm['round_s'])} s: {_r(wc['bound_concurrent_over_held_messages'])} / "
                     f"{_r(wc['cpu_concurrent_over_held_messages'])} / {_r(wc['wall_concurrent_over_held_messages'])}"
                     " | - | - |")
    if "rounding" in data:
        rd = data["rounding"]
        rm = rd["median_ms"]
        lines.append(f"| one client's stochastic rounding, L={rd['L']:,}: previous float64 form / integer form, "
                     f"interleaved ({rd['repeats']} each), median CPU | {rm['previous_float64_floor']:.2f} / "
                     f"{rm['integer_trunc']:.2f} ms ({_r(rd['integer_over_previous'])}) | - | - |")
        lines.append(f"| one client's masked input (rounding + {rd['k'] + 1} mask streams, one thread) / the "
                     f"{rd['k'] + 1} streams alone | {rm['masked_input_one_thread']:.2f} / "
                     f"{rm['mask_streams_alone']:.2f} ms ({_r(rd['masked_input_over_streams'])}) | - | - |")
    if "checks_cost" in data:
        cc = data["checks_cost"]
        lines.append(f"| issue-11 checks on / off, median round / CPU ({cc['repeats']} interleaved pairs) | "
                     f"{_r(cc['ratio_on_over_off'])} / {_r(cc['cpu_ratio_on_over_off'])} | <= 1.1x | "
                     f"{'yes' if tg.get('checks_le_1.1x') else 'no'} |")
    lines += ["", f"Flower's SecAgg+ anchor here: {data.get('flower', {}).get('anchor', 'not measured')} "
              "(timed by `benchmarks/flower.py`)."]
    return "\n".join(lines) + "\n"


def _ms(e: dict[str, float]) -> str:
    return f"{e['mean']:.3f} ± {e['std']:.3f}"


def _yes(flag: object) -> str:
    return "yes" if flag else "**no**"


def render_relevance(data: dict[str, Any]) -> str:
    """``benchmarks/relevance.py --combine ...`` output: one table per section present."""
    lines: list[str] = []
    runs = "; ".join(f"{r['file']}: seeds {r['seeds']}, {r['budget']['rounds']} rounds x {r['budget']['cohort']} "
                     f"clients, client step {r['budget'].get('learner', 'fedavg')} ({', '.join(r['sections'])})"
                     for r in data.get("runs", []))
    lines += [f"Runs: {runs}. {data.get('note', '')}.", ""]
    if "main" in data:
        m = data["main"]
        c = m["checks"]
        lines += ["| personalized accuracy of held-out clients (mean ± std over seeds) | |", "|---|---:|"]
        labels = {"relevance": "relevance-weighted MAML meta-updates (plaintext)",
                  "oracle": "oracle: MAML meta-updates averaged within the true groups",
                  "relevance_fedavg": "relevance-weighted FedAvg updates",
                  "oracle_fedavg": "oracle with FedAvg updates",
                  "fedavg+ft": "global FedAvg + fine-tuning", "maml": "global MAML (project defaults)",
                  "maml_server_sgd": "global MAML, the relevance runs' server step (SGD at 1.0)"}
        lines += [f"| {labels[k]} | {_ms(m[k])} |" for k in labels if k in m]
        if "margin_over_maml_ci95" in m:
            iv = m["margin_over_maml_ci95"]
            lines += ["", f"Relevance minus the better MAML ({labels[m['maml_best']]}), per-seed paired, "
                      f"{int(iv['n'])} seeds: {iv['mean'] * 100:+.1f} points, 95 % interval "
                      f"[{iv['low'] * 100:+.1f}, {iv['high'] * 100:+.1f}]."]
        lines += ["", f"Relevance vs MAML: {c['margin_over_maml'] * 100:+.1f} points (target +5: "
                  f"{_yes(c['beats_maml_by_5pt'])}); vs FedAvg+FT: {c['margin_over_fedavg_ft'] * 100:+.1f} points "
                  f"({_yes(c['beats_fedavg_ft_by_5pt'])}); gap to the oracle {c['gap_to_oracle'] * 100:.1f} points "
                  f"(target <= 1: {_yes(c['within_1pt_of_oracle'])}).", ""]
    for name, label in (("ckks", "CKKS"), ("secagg", "SecAgg+ grouping")):
        if name in data:
            e = data[name]
            diff = e["diff_vs_plaintext"]
            check = next(iter(e["checks"].items()))
            lines += [f"| under {label} | plaintext | {label} | difference | largest model difference | "
                      "train time vs plaintext | target met |", "|---|---:|---:|---:|---:|---:|---|",
                      f"| seeds {len(e['per_seed']['plaintext'])} | {_ms(e['plaintext'])} | {_ms(e[name])} | "
                      f"{diff['mean'] * 100:+.2f} points | {max(e['max_model_diff']):.1e} | "
                      f"{e['train_seconds_ratio_vs_plaintext']:.0f}x | {check[0]}: {_yes(check[1])} |", ""]
    if "hetero" in data:
        h = data["hetero"]
        acc = h["accuracy"]
        lines += [f"Co-LoRA, MLP shapes {h['architectures']} (client shares {h['client_shares']}), rank {h['rank']}, "
                  f"{h['optimizer']} {h['adapter_lr']}, {h['heldout_clients']} held-out clients:", "",
                  "| architecture | P, Q shared across architectures | each architecture alone | gain |"
                  + (" paired 95 % interval |" if "gain_ci95" in h else ""),
                  "|---|---:|---:|---:|" + ("---:|" if "gain_ci95" in h else "")]
        for a in acc["shared"]:
            iv = h.get("gain_ci95", {}).get(a)
            lines.append(f"| {a} | {_ms(acc['shared'][a])} | {_ms(acc['alone'][a])} | "
                         f"{h['gain_from_sharing'][a] * 100:+.1f} points |"
                         + (f" [{iv['low'] * 100:+.1f}, {iv['high'] * 100:+.1f}] |" if iv else ""))
        ch = h["checks"]
        shares = h["client_shares"]
        g_small = h["gain_from_sharing"][min(shares, key=lambda k: shares[k])]
        g_big = h["gain_from_sharing"][max(shares, key=lambda k: shares[k])]
        lines += ["", f"Smallest group gains >= 2 points ({g_small * 100:+.2f}): {_yes(ch['smallest_gains_2pt'])}; "
                  f"largest loses nothing ({g_big * 100:+.2f}): {_yes(ch['largest_no_loss'])}.", ""]
        if "by_finetune_budget" in h:
            small = min(h["client_shares"], key=lambda k: h["client_shares"][k])
            head = "0 steps" if h["primary_budget"].startswith("0@") else h["primary_budget"]
            lines += [f"Held-out fine-tuning budget (steps @ Adam rate; headline: {head}, chosen on "
                      "development seeds), seeds " + ", ".join(str(s) for s in h.get("seeds", [])) + ":", "",
                      f"| budget | {small} shared | {small} alone | {small} gain [95 % interval] | "
                      "largest shape's gain |", "|---|---:|---:|---:|---:|"]
            big = max(h["client_shares"], key=lambda k: h["client_shares"][k])
            for key, b in h["by_finetune_budget"].items():
                iv, ivb = b["gain_ci95"][small], b["gain_ci95"][big]
                label = "0 steps" if key.startswith("0@") else key
                lines.append(f"| {label} | {b['shared'][small]:.3f} | {b['alone'][small]:.3f} | "
                             f"{iv['mean'] * 100:+.1f} [{iv['low'] * 100:+.1f}, {iv['high'] * 100:+.1f}] | "
                             f"{ivb['mean'] * 100:+.1f} |")
            lines.append("")
    if "shift" in data:
        sh = data["shift"]
        lines += [f"Shift at round {sh['shift_round']}: rounds until within 2 points of the oracle, per seed: "
                  f"{sh['rounds_to_within_2pt']} (target <= 20: {_yes(sh['checks']['recovers_within_20_rounds'])}).",
                  ""]
    if "malicious" in data:
        mal = data["malicious"]
        lines += [f"20% malicious clients; robust rule {mal['robust_rule']}:", "",
                  "| attack | relevance alone | weight on malicious | relevance + robust rule | weight on malicious |",
                  "|---|---:|---:|---:|---:|"]
        for atk in ("signflip", "alie"):
            if atk in mal:
                a, b = mal[atk]["relevance"], mal[atk]["relevance+robust"]
                lines.append(f"| {atk} | {_ms(a['personalized'])} | {a['malicious_weight']['mean']:.3f} | "
                             f"{_ms(b['personalized'])} | {b['malicious_weight']['mean']:.3f} |")
        lines.append("")
    return "\n".join(lines)


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
        alie = (" (ALIE no longer raises in such a round: it uses the z of f = n // 2; these runs predate that.)"
                if any(e["error"].startswith("ConfigError: ALIE") for e in errors) else "")
        lines.append(f"{len(errors)} runs raised ({'; '.join(kinds)}: a cohort held a Byzantine majority); each "
                     f"is left out of its seed's worst case: {where}.{alie}")
    if data.get("selection"):
        lines += ["", f"Selection (digits-fewshot FOMAML, 10 per round, {args['selection_rounds']} rounds):", "",
                  "| selection | rounds | accuracy | minus all layers | bytes vs all layers | seeds |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in data["selection"]:
            b = r.get("bytes_vs_all")
            lines.append(f"| `{r['select']}` | {r['rounds']} | {_iv(r['last_k'])} | {_iv(r.get('minus_all_layers'))} | "
                         f"{f'{b:.2f}' if b is not None else '-'} | {len(r['seeds'])} |")
    if data.get("detection"):
        lines += _detection_table(data["detection"], data.get("detection_args", args), data.get("detection_measured"))
    if data.get("protocols"):
        lines += ["", "The recommended default under other protocols, against the same runs in plaintext "
                      "(same cohorts, attack and seeds; the plaintext default unless the row names another; "
                      "last-k accuracy):", "",
                  "| protocol | defense | setting | malicious | attack | rounds | accuracy | plaintext | "
                  "minus plaintext | within 1 point | seeds |",
                  "|---|---|---|---:|---|---:|---:|---:|---:|---|---:|"]
        for r in data["protocols"]:
            # "above": more than a point better than plaintext (not within 1 point, not a miss)
            close = "yes" if r["within_1_point"] else ("above" if r["minus_plaintext"]["mean"] > 0 else "no")
            peer = r.get("plaintext_defense", "recommended")
            name = f"`{r['defense']}`" + ("" if peer == "recommended" else f" (plaintext: `{peer}`)")
            lines.append(f"| {r['protocol']} | {name} | {r['setting']} | {r['malicious']:.0%} | "
                         f"{r['attack']} | {r['rounds']} | {_iv(r['last_k'])} | {_iv(r['plaintext_last_k'])} | "
                         f"{_iv(r['minus_plaintext'])} | {close} | "
                         f"{len(r['seeds'])} |")
    if data.get("demo"):
        lines += ["", "The `make run` setting in plaintext (digits-fewshot FOMAML, 40 clients, 8 per round, "
                      f"{data['demo'][0]['rounds']} rounds, 25 % unit sign flippers or none), each part of the "
                      "default alone:", "",
                  "| defense | attack | accuracy | per seed | minus the mean's | participations flagged | seeds |",
                  "|---|---|---:|---|---:|---:|---:|"]
        for r in data["demo"]:
            lines.append(f"| `{r['defense']}` | {r['attack']} | {_iv(r['last_k'])} | "
                         f"{' / '.join(f'{v:.3f}' for v in r['per_seed'])} | {_iv(r['minus_mean'])} | "
                         f"{_iv(r['flagged_share'])} | {len(r['seeds'])} |")
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
        lines += ["", "Per attack (mean over the seeds of the row):", "",
                  "| setting | malicious | defense | " + " | ".join(args["attacks"]) + " |",
                  "|---|---:|---|" + "---:|" * len(args["attacks"])]
        for block in data["matrix"]:
            for r in block["rows"]:
                per = r.get("per_attack", {})
                cells = [f"{per[a]['mean']:.3f}" if a in per else "-" for a in args["attacks"]]
                lines.append(f"| {block['dataset']} {block['algorithm']} | {block['malicious']:.0%} | "
                             f"`{r['defense']}` | " + " | ".join(cells) + " |")
        lines += ["", "Targets for `recommended` (clean within 2 points of the mean's; worst case within 5 points "
                      "of clean; worst case above every other rule's or within 1 point of the best):", ""]
        for block in data["matrix"]:
            rec = next((r for r in block["rows"] if r["defense"] == "recommended"), None)
            if rec is None:
                continue
            gap = rec.get("clean_minus_mean_clean")
            drop = rec["drop_from_clean"]["mean"]
            others = [r for r in block["rows"] if r["defense"] != "recommended"]
            best = max((r["worst_case"]["mean"] for r in others), default=None)
            vs = ("no other rule measured" if best is None else
                  f"best other rule's worst case {best:.3f}: "
                  f"{'met' if rec['worst_case']['mean'] >= best - 0.01 else 'missed'}")
            lines.append(f"* {block['dataset']} {block['algorithm']} {block['malicious']:.0%} "
                         f"({len(rec['seeds'])} seeds{'' if rec.get('complete', True) else ', incomplete'}): clean "
                         f"{rec['clean']['mean']:.3f}, "
                         + (f"{100 * gap['mean']:+.1f} points against the mean's "
                            f"({'met' if gap['mean'] >= -0.02 else 'missed'}); " if gap else "")
                         + f"worst case {rec['worst_case']['mean']:.3f} ({rec['worst_attack']}), drop "
                         f"{100 * drop:.1f} points ({'met' if drop <= 0.05 else 'missed'}); {vs}.")
    if data.get("detection"):
        lines += ["", _detection_target(data["detection"])]
    return "\n".join(lines) + "\n"


def _has_detector(rows: list[dict[str, Any]]) -> bool:
    """Whether the detection rows carry the detector's own counts (runs recorded before did not)."""
    return all("final_cumulative_detector" in r for r in rows)


def _pair(c: dict[str, Any] | None) -> str:
    return f"{c['tpr']:.2f} / {c['fpr']:.2f}" if c and c.get("tpr") is not None else "-"


def _detection_table(rows: list[dict[str, Any]], args: dict[str, Any], measured: dict[str, Any] | None) -> list[str]:
    """The detection table: on the detector's flags and on the exclusions when the rows have both."""
    head = (f"Detection (digits-fewshot FOMAML, 100 clients, 25 % unit-scale sign flippers, 8 per round, "
            f"{args['detection_rounds']} rounds, `{args['detector']}`); cumulative TPR / FPR")
    out = [""]
    if measured:  # the detection runs were re-measured apart from the other sections
        loads = [x for x in measured.get("load_avg_1min_at_finish", []) if x is not None]
        load = f"{min(loads):.2f}-{max(loads):.2f}" if loads else "?"
        out += [f"Detection runs measured {measured.get('first_start_utc', '?')} to "
                f"{measured.get('last_finish_utc', '?')} on {measured.get('cpus', '?')} CPUs shared with other work "
                f"(1-min load average {load} as each run finished), one torch thread per run; "
                f"{measured.get('runs_done', '?')} of {measured.get('runs_planned', '?')} planned runs finished.", ""]
    if not _has_detector(rows):
        out += [head + ":", "",
                "| protocol | seed | round 10 | round 50 | last round | met (TPR >= 0.8, FPR <= 0.1) | "
                "pooled per round | accuracy |",
                "|---|---:|---|---|---|---|---|---:|"]
        for r in rows:
            every = {c["round"]: c for c in r["cumulative_every_10"]}
            out.append(f"| {r['protocol']} | {r['seed']} | {_pair(every.get(9))} | {_pair(every.get(49))} | "
                       f"{_pair(r['final_cumulative'])} | {'yes' if r['target_met'] else 'no'} | "
                       f"{_pair(r['pooled_per_round'])} | {r['accuracy_last_k']:.3f} |")
        return out
    out += [head + ", counted on the detector's flags (detected: flagged by the detector at its latest "
                   "participation) and on the exclusions (detected: excluded then; at most 3 of 8 per round):", "",
            "| protocol | seed | round 10 | round 50 | last round | met | last round, excluded | met, excluded | "
            "pooled per round | pooled per round, excluded | accuracy |",
            "|---|---:|---|---|---|---|---|---|---|---|---:|"]
    for r in rows:
        every = {c["round"]: c for c in r["cumulative_every_10_detector"]}
        out.append(f"| {r['protocol']} | {r['seed']} | {_pair(every.get(9))} | {_pair(every.get(49))} | "
                   f"{_pair(r['final_cumulative_detector'])} | {'yes' if r['target_met_detector'] else 'no'} | "
                   f"{_pair(r['final_cumulative'])} | {'yes' if r['target_met_excluded'] else 'no'} | "
                   f"{_pair(r['pooled_per_round_detector'])} | {_pair(r['pooled_per_round'])} | "
                   f"{r['accuracy_last_k']:.3f} |")
    return out


def _detection_target(rows: list[dict[str, Any]]) -> str:
    """The detection-target line; on the detector's flags, the exclusions beside them, when both exist."""
    by = sorted({r["protocol"] for r in rows})

    def count(key: str) -> str:
        return "; ".join(f"{p}: met in {sum(r['protocol'] == p and bool(r[key]) for r in rows)} of "
                         f"{sum(r['protocol'] == p for r in rows)} seeds" for p in by)

    line = "Detection target (cumulative TPR >= 0.8 at FPR <= 0.1 by the last round): "
    if not _has_detector(rows):
        return line + count("target_met") + "."
    return line + "on the detector's flags, " + count("target_met_detector") + "; on the exclusions, " + \
        count("target_met_excluded") + "."


def render_selection(data: dict[str, Any]) -> str:
    m = data["measured"]
    titles = {"chunks": "50 % budget (digits-fewshot FOMAML, 10 per round)",
              "topk": "client-chosen top-k, 25 % budget (digits-fewshot MAML, 10 per round)"}
    lines = [f"Measured {m['utc']} on {m['cpus']} CPUs shared with other work (1-min load average "
             f"{m['load_average_1min']:.1f} at the end), one torch thread per run, {data['config']['rounds']} rounds. "
             "Accuracy: personalized, mean of the last 5 evaluations, mean ± 95 % t-interval over seeds; "
             "the difference is paired by seed.", ""]
    for section, rows in data["sections"].items():
        lines += [f"{titles.get(section, section)}:", "",
                  "| selection | accuracy | minus all layers (points) | bytes vs all layers "
                  "| longest gap (rounds) | seeds |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            acc, diff = r["accuracy"], r["minus_all_points"]
            hw = "" if acc["ci95"] is None else f" ± {acc['ci95']:.3f}"
            dw = "" if diff["ci95"] is None else f" ± {diff['ci95']:.1f}"
            lines.append(f"| {r['label']} | {acc['mean']:.3f}{hw} | {diff['mean']:+.1f}{dw} | {r['bytes_ratio']:.2f} | "
                         f"{r['max_gap_rounds']} | {len(r['seeds'])} |")
        lines.append("")
    return "\n".join(lines)


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "bayes": render_bayes,
    "bayes_calibration": render_bayes_calibration,
    "ckks": render_ckks,
    "defenses": render_defenses,
    "plaintext": render_plaintext,
    "meta_cohorts": render_meta_cohorts,
    "meta_cohorts_dp": render_meta_cohorts,
    "dp_step": render_dp_step,
    "flower": render_flower,
    "flower_state": render_flower_state,
    "relevance": render_relevance,
    "relevance_hetero_rela": render_relevance,
    "robustness": render_robustness,
    "robustness_rules": render_robustness,
    "robustness_matrix100": render_robustness,
    "selection": render_selection,
    "secagg": render_secagg,
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
