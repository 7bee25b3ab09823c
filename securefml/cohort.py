"""The simulator's batching of client work: one cohort's local training, vectorized where it can be.

In a deployment every client trains on its own device.  In simulation, clients whose tasks have
the same shapes can train as one ``torch.func.vmap`` (``MetaLearner.update_many``): the results
agree with one-at-a-time training to float rounding, many times faster.  This module is that
optimization and nothing else: it returns each client's ``LocalResult`` exactly as
``Client.local_update`` would, and a per-client reason for each client that failed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from securefml.client import Client, LocalResult
from securefml.errors import SecureFMLError
from securefml.meta.base import MetaLearner, Params
from securefml.rounds import check_finite
from securefml.updates import LayerLayout

__all__ = ["train_cohort"]

log = logging.getLogger(__name__)


def _shape_key(client: Client) -> tuple[object, ...]:
    t = client.task
    tensors = (t.support_x, t.support_y, t.query_x, t.query_y)
    return (t.kind, *(x.shape for x in tensors), *(x.dtype for x in tensors))


def train_cohort(
    learner: MetaLearner,
    params: Params,
    layout: LayerLayout,
    cohort: Sequence[Client],
    *,
    round_idx: int = 0,
    vectorize: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[list[LocalResult], dict[int, str]]:
    """Every client's local update, in cohort order; failures recorded per client.

    With ``vectorize``, clients whose tasks stack (same shapes) run as one vmap per group; the
    rest, and every client of a group whose vmap raised, run one at a time.
    """
    done: dict[int, LocalResult] = {}
    rejected: dict[int, str] = {}
    if vectorize:
        groups: dict[tuple[object, ...], list[Client]] = {}
        for c in cohort:
            groups.setdefault(_shape_key(c), []).append(c)
        for members in groups.values():
            tasks = [c.task.to(device) for c in members]
            if not learner.vectorizes(tasks):
                continue
            try:
                outs = learner.update_many(params, tasks)
            except SecureFMLError as exc:  # attribute it by running the group one at a time
                log.info("round %d: vectorized group failed (%s); running it client by client", round_idx, exc)
                continue
            for c, task, (upd, metrics) in zip(members, tasks, outs):
                flat = layout.flatten(upd).detach()
                try:
                    check_finite(flat, c.client_id)
                except SecureFMLError as exc:
                    log.warning("round %d: client %d failed locally: %s", round_idx, c.client_id, exc)
                    rejected[c.client_id] = f"{type(exc).__name__}: {exc}"
                    continue
                done[c.client_id] = LocalResult(c.client_id, flat, float(task.support_x.shape[0]), metrics)
    results: list[LocalResult] = []
    for client in cohort:
        if client.client_id in done:
            results.append(done[client.client_id])
            continue
        if client.client_id in rejected:
            continue
        try:
            results.append(client.local_update(learner, params, layout, device=device))
        except SecureFMLError as exc:
            log.warning("round %d: client %d failed locally: %s", round_idx, client.client_id, exc)
            rejected[client.client_id] = f"{type(exc).__name__}: {exc}"
    return results, rejected
