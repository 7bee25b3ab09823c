"""SecAgg+ client and server halves over your own transport: only bytes cross it.

Run: ``python examples/secagg_halves.py``.  The server builds the round's public plan and sends it
as bytes (``RoundPlan.to_bytes``); each client, which may live on another device, decodes it
(``RoundPlan.from_bytes``) and runs its half.  The ``Mailbox`` below stands for your network: it
carries ``bytes`` and nothing else, so the same calls work over gRPC, HTTP or a message queue.
One client drops out after sharing its keys; the server still recovers the sum of the others.
Prints the secure weighted mean next to the plain one and the bytes that crossed the wire.
"""

from __future__ import annotations

import numpy as np

from securefml.protocols import RoundPlan, SecAggClient, SecAggPlus, SecAggServer


class Mailbox:
    """A stand-in for the user's transport: it only ever holds bytes, and counts them."""

    def __init__(self) -> None:
        self.bytes_sent = 0

    def send(self, data: bytes) -> bytes:
        assert isinstance(data, bytes)
        self.bytes_sent += len(data)
        return bytes(data)  # what arrives at the other end


def main() -> dict[str, float]:
    rng = np.random.default_rng(0)
    cohort = [3, 5, 8, 13, 21]
    length = 1000
    updates = {c: rng.normal(scale=0.1, size=length).astype(np.float32) for c in cohort}
    weights = {c: float(w) for c, w in zip(cohort, (1.0, 2.0, 1.0, 1.0, 2.0))}
    dropped = 21  # leaves after sharing its keys, before sending its masked update
    wire = Mailbox()

    # -- server: plan the round and publish it as bytes -----------------------------------------
    plan = SecAggPlus(clip_range=1.0, threshold=3).plan(0, cohort, length, max_weight=2.0)
    plan_bytes = wire.send(plan.to_bytes())
    server = SecAggServer(plan)

    # -- each client, on its own device: decode the plan, then answer each stage ----------------
    clients = {c: SecAggClient(c, RoundPlan.from_bytes(plan_bytes, round_idx=0)) for c in cohort}
    for c, client in clients.items():
        server.receive_advertise(c, wire.send(client.advertise()))
    for c, client in clients.items():
        server.receive_share(c, wire.send(client.share(wire.send(server.keys_for(c)))))
    for c, client in clients.items():
        server.receive_complaints(c, wire.send(client.complain(wire.send(server.shares_for(c)))))
    server.close_complaints()
    alive = [c for c in cohort if c != dropped]
    for c in alive:
        exclusions = wire.send(server.exclusions_for(c))
        server.receive_masked(c, wire.send(clients[c].masked(exclusions, updates[c], weights[c])))
    server.close_masked()
    for c in alive:
        server.receive_unmask(c, wire.send(clients[c].unmask(wire.send(server.request_for(c)))))
    total = server.finish()

    # -- the server learns the weighted sum of the survivors, nothing else -----------------------
    weighted_sum, total_weight = plan.fixed_point.decode_sum(total)
    secure_mean = weighted_sum / total_weight
    plain_mean = sum(weights[c] * updates[c].astype(np.float64) for c in alive) / sum(weights[c] for c in alive)
    bound = plan.fixed_point.error_bound(len(alive), total_weight)
    error = float(np.abs(secure_mean - plain_mean).max())
    assert error <= bound, (error, bound)
    return {"survivors": len(alive), "max_abs_error": error, "error_bound": bound,
            "bytes_on_wire": wire.bytes_sent}


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value}")
