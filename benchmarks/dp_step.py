"""Cost of a record-level DP-SGD step: vectorized per-example gradients vs Opacus' hooks, same run.

What is timed, on the same model, batch and device, interleaved (``peers.interleaved``):

* ``plain``: one non-private gradient of the batch-mean loss (``PlainGradients``): the floor;
* ``dp_vmap`` / ``dp_auto``: one released DP gradient (``DPGradients``: per-example gradients by
  ``vmap(grad)`` / by the default engine, expanded weights where the loss allows; flat clipping;
  floating-point-resistant Gaussian noise from the AES-CTR noise source; one accountant step) --
  the library's record-level DP step since the gradient-function redesign;
* ``opacus_ew`` / ``opacus_hooks``: the step the library took before, through Opacus'
  ``GradSampleModule`` (expanded weights / hooks) and ``DPOptimizer.pre_step`` (clip, noise,
  scale, accountant hook), weights copied into the module first and the noise drawn from the
  same AES-CTR source, as the removed route did;
* ``noise``: the noise draw alone (identical in every DP candidate), for reading the rest.

The sampling rate is 1 so every candidate sees the same batch.  Each candidate is timed twice per
repeat-slot: wall time, and CPU time of the calling thread (``time.thread_time``, one torch
thread).  On a machine shared with other processes the wall time of a few-millisecond step is
mostly waiting for a core; the CPU time is what the step costs, and the ratios quoted are CPU-time
ratios (both are in the JSON).  Per-round figures time a whole client round (``update``) of
FedAvg, FOMAML and second-order MAML, non-private vs ``RecordLevelDP`` (both engines), on
``digits-fewshot`` tasks.  A zero-noise check reports the largest difference between the
library's and Opacus' released gradients.

Usage: ``python benchmarks/dp_step.py [--batches 10 64 256] [--reps 15] [--device cpu]
[--threads 1] [--out benchmarks/json/dp_step.json]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from opacus.grad_sample import wrap_model
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from peers import machine, sync, write_report

from securefml.data import load_dataset
from securefml.meta import LEARNERS, MetaConfig, PlainGradients
from securefml.models import make_model
from securefml.privacy import DPGradients, Ledger, NoiseSource, RecordLevelDP


class _SourcedDPOptimizer(DPOptimizer):
    """``DPOptimizer`` drawing its noise from a ``NoiseSource``, as the removed record-level route did."""

    noise_source: NoiseSource

    def add_noise(self) -> None:
        for p in self.params:
            summed = p.summed_grad  # type: ignore[attr-defined]
            _check_processed_flag(summed)
            std = self.noise_multiplier * self.max_grad_norm
            noise = torch.from_numpy(self.noise_source.normal(summed.numel(), std, fp_resistant=True))
            p.grad = (summed + noise.reshape(summed.shape).to(device=summed.device, dtype=summed.dtype)).view_as(p)
            _mark_as_processed(summed)


def _opacus_step(model: torch.nn.Module, mode: str, *, sigma: float, clip: float,
                 batch: int) -> Any:
    """The removed route: weights into a GradSampleModule, backward of the summed loss, DPOptimizer.pre_step."""
    module = copy.deepcopy(model)
    gsm = wrap_model(module, grad_sample_mode=mode, loss_reduction="sum")
    opt = _SourcedDPOptimizer(torch.optim.SGD(module.parameters(), lr=1.0), noise_multiplier=sigma,
                              max_grad_norm=clip, expected_batch_size=batch, loss_reduction="mean")
    opt.noise_source = NoiseSource.seeded(batch)
    ledger = Ledger("rdp", 1e-5)
    opt.attach_step_hook(ledger.accountant.get_optimizer_hook_fn(sample_rate=1.0))
    named = dict(module.named_parameters())

    def step(weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(weights[n])
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
        opt.pre_step()
        out = {n: p.grad.detach().clone() for n, p in named.items() if p.grad is not None}
        opt.zero_grad(set_to_none=True)
        return out

    return step


def interleaved_cpu(candidates: Mapping[str, Callable[[], object]], reps: int, *,
                    device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Median wall and thread-CPU seconds of each candidate over ``reps`` interleaved repeats (after a warm-up)."""
    for fn in candidates.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in candidates}
    cpu: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            sync(device)
            w0, c0 = time.perf_counter(), time.thread_time()
            fn()
            sync(device)
            cpu[name].append(time.thread_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {k: {"median_s": statistics.median(cpu[k]), "wall_median_s": statistics.median(wall[k]),
                "cpu_runs_s": [round(t, 6) for t in cpu[k]]} for k in candidates}


def time_steps(batches: list[int], reps: int, device: str) -> dict[str, Any]:
    data = load_dataset("digits-fewshot", seed=0)
    model = make_model(data, seed=0, device=device)
    learner = LEARNERS.create("fedavg", model=model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = learner.weights_loss_fn("classification")
    d_in = data.train[0].support_x.shape[1]
    n_classes = int(max(int(t.support_y.max()) for t in data.train)) + 1
    out: dict[str, Any] = {"model_parameters": sum(p.numel() for p in weights.values()), "batches": {}}
    for b in batches:
        out["batches"][str(b)] = _time_batch(model, loss, weights, b, d_in, n_classes, reps, device)
    return out


def _time_batch(model: torch.nn.Module, loss: Any, weights: dict[str, torch.Tensor], b: int, d_in: int,
                n_classes: int, reps: int, device: str) -> dict[str, Any]:
    """Every candidate on one batch of ``b`` examples."""
    plain = PlainGradients()
    gen = torch.Generator().manual_seed(b)
    x = torch.randn(b, d_in, generator=gen).to(device)
    y = torch.randint(0, n_classes, (b,), generator=gen).to(device)
    dps = {engine: DPGradients(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0,
                               ledger=Ledger("rdp", 1e-5), source=NoiseSource.seeded(b), per_sample=engine)
           for engine in ("vmap", "auto")}
    ew = _opacus_step(model, "ew", sigma=1.0, clip=1.0, batch=b)
    hooks = _opacus_step(model, "hooks", sigma=1.0, clip=1.0, batch=b)
    source = NoiseSource.seeded(b + 1)
    numel = sum(p.numel() for p in weights.values())
    res = interleaved_cpu({
        "plain": lambda: plain(loss, weights, (x, y)),
        "dp_vmap": lambda: dps["vmap"](loss, weights, (x, y)),
        "dp_auto": lambda: dps["auto"](loss, weights, (x, y)),
        "opacus_ew": lambda: ew(weights, x, y),
        "opacus_hooks": lambda: hooks(weights, x, y),
        "noise": lambda: source.normal(numel, 1.0, fp_resistant=True),
    }, reps, device=device)
    med = {k: v["median_s"] for k, v in res.items()}
    quiet = DPGradients(noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=1.0, ledger=Ledger("rdp", 1e-5),
                        source=NoiseSource.seeded(0))
    ours = quiet(loss, weights, (x, y))
    ref = _opacus_step(model, "ew", sigma=0.0, clip=1.0, batch=b)(weights, x, y)
    fastest_opacus = min(med["opacus_ew"], med["opacus_hooks"])
    return {
        "ms": {k: 1e3 * v for k, v in med.items()},
        "wall_ms": {k: 1e3 * v["wall_median_s"] for k, v in res.items()},
        "dp_auto_over_plain": med["dp_auto"] / med["plain"],
        "dp_vmap_over_plain": med["dp_vmap"] / med["plain"],
        "opacus_ew_over_plain": med["opacus_ew"] / med["plain"],
        "opacus_hooks_over_plain": med["opacus_hooks"] / med["plain"],
        "dp_auto_over_fastest_opacus": med["dp_auto"] / fastest_opacus,
        "dp_vmap_over_fastest_opacus": med["dp_vmap"] / fastest_opacus,
        "engine_calls_auto": dict(dps["auto"].engine_calls),
        "max_abs_diff_vs_opacus_zero_noise": max(float((ours[n] - ref[n]).abs().max()) for n in ours),
        "cpu_runs_s": {k: v["cpu_runs_s"] for k, v in res.items()},
    }


def time_rounds(reps: int, device: str) -> dict[str, Any]:
    data = load_dataset("digits-fewshot", seed=0)
    tasks = [t.to(device) if hasattr(t, "to") else t for t in data.train[:5]]
    return {name: _time_learner(name, data, tasks, reps, device) for name in ("fedavg", "fomaml", "maml")}


def _time_learner(name: str, data: Any, tasks: list[Any], reps: int, device: str) -> dict[str, Any]:
    """One client round of ``name``, non-private and record-level DP (both engines)."""
    cfg = MetaConfig(inner_steps=5, inner_lr=0.1, outer_lr=0.1, outer_steps=1)
    learner = LEARNERS.create(name, model=make_model(data, seed=0, device=device), config=cfg)
    dp = {engine: RecordLevelDP(learner, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                                source=NoiseSource.seeded(0), allow_support_leak=True, per_sample=engine)
          for engine in ("vmap", "auto")}
    params = learner.init_params(device)

    def loop(fn: Any) -> Any:
        return lambda: [fn(params, t) for t in tasks]

    res = interleaved_cpu({"plain": loop(learner.update), "record_dp_vmap": loop(dp["vmap"].update),
                           "record_dp_auto": loop(dp["auto"].update)}, reps, device=device)
    med = {k: v["median_s"] / len(tasks) for k, v in res.items()}
    return {"ms_per_client": {k: 1e3 * v for k, v in med.items()},
                 "wall_ms_per_client": {k: 1e3 * v["wall_median_s"] / len(tasks) for k, v in res.items()},
                 "record_dp_auto_over_plain": med["record_dp_auto"] / med["plain"],
                 "record_dp_vmap_over_plain": med["record_dp_vmap"] / med["plain"],
                 "released_gradients_per_round": dp["auto"].steps_per_participation,
                 "covers_support": dp["auto"].covers_support}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[10, 64, 256])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--round-reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the JSON here (e.g. benchmarks/json/dp_step.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    summary: dict[str, Any] = {
        "setup": {"dataset": "digits-fewshot", "model": "bundled MLP", "sigma": 1.0, "clip": 1.0,
                  "step_sample_rate": 1.0, "round_sample_rate": 0.5, "reps": args.reps,
                  "round_reps": args.round_reps, "device": args.device,
                  "noise": "AES-CTR NoiseSource, floating-point resistant, in every DP candidate",
                  "timing": "median thread-CPU time of interleaved repeats (wall time also recorded), shared machine",
                  "threads": args.threads},
        "machine_before": machine(),
    }
    summary["steps"] = time_steps(args.batches, args.reps, args.device)
    summary["rounds"] = time_rounds(args.round_reps, args.device)
    summary["machine_after"] = machine()
    write_report(summary, args.out)


if __name__ == "__main__":
    main()
