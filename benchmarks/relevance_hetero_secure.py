"""Relevance-weighted Co-LoRA under CKKS or SecAgg+ against plaintext, on the conflicting-task benchmark; one JSON.

    nice -n 10 python benchmarks/relevance_hetero_secure.py --seeds 0 1 2 --rows F.jsonl
    python benchmarks/relevance_hetero_secure.py --summarize F.jsonl [--out F]

Each seed trains the same federation three times on the same data (``digits-clusters``, 4
groups, shapes 32, 64, 64x64 in the shares 1/8, 5/16, 9/16 in every group, the settings of
``relevance_hetero_variants.py``) with ``HeteroConfig.protocol``:

* ``plaintext``: the method as the report runs it (no decryption policy);
* ``policy``: the same rows and the key holder's ``RelevancePolicy(min_effective)`` applied in
  plaintext (refused training rows keep the client's own tensors, held-out rows tempered);
* ``ckks``: every combination decrypted by a real TenSEAL key holder under that policy;
* ``groups``: relevance groups (``hetero_grouped``: threshold grouping of the task vectors,
  every part averaged over the group's members that hold it, sets below the minimum size not
  summed), plain sums;
* ``secagg``: the same groups and sets, each one real SecAgg+ secure sum.

``ckks - policy`` is CKKS's own error; ``policy - plaintext`` is what the policy costs;
``secagg - groups`` is SecAgg+'s quantization and ``groups - plaintext`` what grouping costs.
``--protocols`` picks the runs (default: the CKKS comparison's three); ``--architecture-shares``
changes the training shares of the three shapes (held-out clients stay in equal shares).  Held-out
clients: ``--heldout`` (default 24, equal shares): the key holder's Gram of every party's task
vector is one pairwise product per pair, and 96 held-out clients would make it the run's main
cost.  Timings (taken on a shared, loaded machine) are reported with the ratio of each run to
the plaintext run of the same seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from peers import write_report
from relevance_hetero_variants import BASE, SHAPES, SHARES, paired

from securefml.data import make_digits_clusters
from securefml.relevance import HeteroConfig, run_heterogeneous_budgets

PROTOCOLS = ("plaintext", "policy", "ckks", "groups", "secagg")
CKKS_RUNS = ("plaintext", "policy", "ckks")
BUDGETS = ((0, 0.01), (5, 0.001))


def run_seed(seed: int, heldout: int, changes: dict[str, Any], rounds: int,
             protocols: tuple[str, ...] = PROTOCOLS, shares: list[float] | None = None) -> dict[str, Any]:
    data = make_digits_clusters(groups=4, architectures_per_group=True, seed=seed, n_heldout=heldout, k_shot=2,
                                query=3, architectures=SHAPES, architecture_shares=shares or SHARES,
                                heldout_architecture_shares=[1.0] * len(SHARES))
    row: dict[str, Any] = {"seed": seed, "changes": changes, "rounds": rounds, "by_protocol": {}}
    if shares is not None:
        row["architecture_shares"] = shares
    for proto in protocols:
        t0 = time.perf_counter()
        cfg = HeteroConfig(**{**BASE, "rounds": rounds, "seed": seed, "share": True, "relevance": True,
                              "temperature": 0.2, **changes, "protocol": proto})
        res = run_heterogeneous_budgets(data, cfg, BUDGETS)
        any_res = next(iter(res.values()))
        row["by_protocol"][proto] = {
            "by_budget": {f"{k}@{r:g}": v.per_architecture for (k, r), v in res.items()},
            "refused_rows": any_res.refused_rows, "bytes_uploaded": any_res.bytes_uploaded,
            **({"error_bound": any_res.error_bound} if proto == "secagg" else {}),
            "s": round(time.perf_counter() - t0, 1)}
    return row


def summarize(path: str) -> dict[str, Any]:
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    rows.sort(key=lambda r: r["seed"])
    out: dict[str, Any] = {"seeds": [r["seed"] for r in rows], "changes": rows[0]["changes"] if rows else {},
                           "architecture_shares": rows[0].get("architecture_shares", SHARES) if rows else SHARES,
                           "rounds": rows[0]["rounds"] if rows else None, "by_budget": {}}
    archs = sorted(rows[0]["by_protocol"]["plaintext"]["by_budget"]["0@0.01"]) if rows else []
    protos = [p for p in PROTOCOLS if all(p in r["by_protocol"] for r in rows)]
    pairs = {"ckks_minus_policy": ("ckks", "policy"), "policy_minus_plaintext": ("policy", "plaintext"),
             "ckks_minus_plaintext": ("ckks", "plaintext"), "secagg_minus_groups": ("secagg", "groups"),
             "groups_minus_plaintext": ("groups", "plaintext"), "secagg_minus_plaintext": ("secagg", "plaintext")}
    for b in (f"{k}@{r:g}" for k, r in BUDGETS):
        acc = {p: {a: statistics.fmean(r["by_protocol"][p]["by_budget"][b][a] for r in rows) for a in archs}
               for p in protos}
        diff = {}
        for name, (x, y) in pairs.items():
            if x not in protos or y not in protos:
                continue
            per = {a: [r["by_protocol"][x]["by_budget"][b][a] - r["by_protocol"][y]["by_budget"][b][a] for r in rows]
                   for a in archs}
            mean_all = [statistics.fmean(per[a][k] for a in archs) for k in range(len(rows))]
            diff[name] = {"per_architecture": {a: paired(per[a]) for a in archs},
                          "all_shapes_per_seed": mean_all,
                          "all_shapes_max_abs": max(abs(x) for x in mean_all)}
        out["by_budget"][b] = {"accuracy": acc, "differences": diff}
    out["refused_rows"] = {p: [r["by_protocol"][p]["refused_rows"] for r in rows] for p in protos}
    if "secagg" in protos:
        out["error_bound_secagg"] = [r["by_protocol"]["secagg"]["error_bound"] for r in rows]
    for p in ("ckks", "secagg"):
        if p in protos:
            out[f"bytes_uploaded_{p}"] = [r["by_protocol"][p]["bytes_uploaded"] for r in rows]
    out["seconds"] = {p: [r["by_protocol"][p]["s"] for r in rows] for p in protos}
    out["time_ratio_vs_plaintext"] = {p: statistics.fmean(r["by_protocol"][p]["s"] / r["by_protocol"]["plaintext"]["s"]
                                                          for r in rows) for p in protos}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--heldout", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=int(BASE["rounds"]))
    ap.add_argument("--own-evidence", type=float, default=None)
    ap.add_argument("--min-effective", type=float, default=2.0)
    ap.add_argument("--clients-per-round", type=int, default=int(BASE["clients_per_round"]))
    ap.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(CKKS_RUNS))
    ap.add_argument("--group-min-link", type=float, default=None,
                    help="secagg / groups: the grouping's average-cosine threshold (default HeteroConfig's)")
    ap.add_argument("--heldout-pool", action="store_true",
                    help="secagg / groups: held-out clients take the pooled small sets' mean, not the initialisation")
    ap.add_argument("--architecture-shares", type=float, nargs=3, default=None,
                    help="training shares of the shapes 32, 64, 64x64 (default 1/8, 5/16, 9/16)")
    ap.add_argument("--rows")
    ap.add_argument("--summarize")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.summarize:
        write_report({"note": "timings taken on a shared, loaded 2-core machine; CKKS: real TenSEAL ciphertexts; "
                              "SecAgg+: the real protocol (X25519, AES-CTR masks, Shamir shares)",
                      "heldout_clients": args.heldout, "min_effective": args.min_effective,
                      **summarize(args.summarize)}, args.out)
        return
    torch.set_num_threads(1)
    changes: dict[str, Any] = {"min_effective": args.min_effective}
    if args.clients_per_round != BASE["clients_per_round"]:
        changes["clients_per_round"] = args.clients_per_round
    if args.own_evidence is not None:
        changes["own_evidence"] = args.own_evidence
    if args.group_min_link is not None:
        changes["group_min_link"] = args.group_min_link
    if args.heldout_pool:
        changes["heldout_pool"] = True
    for seed in args.seeds:
        row = run_seed(seed, args.heldout, changes, args.rounds, tuple(args.protocols), args.architecture_shares)
        print(json.dumps(row), flush=True)
        if args.rows:
            with open(args.rows, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
