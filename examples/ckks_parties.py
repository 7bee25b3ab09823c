"""CKKS with the key holder, the clients and the server as separate parties exchanging bytes.

Run: ``python examples/ckks_parties.py``.  Three roles, each an object that could live in its own
process or machine, and only ``bytes`` between them:

* the **key holder** makes the keys, publishes the public context (no secret key in it) and
  decrypts only aggregates and the scalar Gram statistics;
* each **client** encrypts its update under the public context;
* the **server** validates and adds ciphertexts; it can never decrypt (its context is public).

Mean path: clients encrypt ``(w_i / W) * u_i``, the server adds, the key holder decrypts the sum.
Gram path (robust rules): the server computes encrypted inner products, the key holder decrypts
the n x n Gram matrix only, Multi-Krum picks weights from it, the server forms the weighted
homomorphic sum, the key holder decrypts that.  Prints both errors against the plaintext answer.
"""

from __future__ import annotations

import numpy as np
import torch

from securefml.defenses import MultiKrum
from securefml.protocols import CKKSClient, CKKSKeyHolder, CKKSServer, ClientUpdate, PackingFrame
from securefml.protocols.ckks_stats import encrypted_inner_products, weighted_sum
from securefml.updates import LayerLayout


def main() -> dict[str, float]:
    layout = LayerLayout([("fc.weight", (16, 32)), ("fc.bias", (16,))])
    gen = torch.Generator().manual_seed(0)
    honest = [0.01 * torch.randn(layout.numel, generator=gen) for _ in range(4)]
    updates = [ClientUpdate(i, v, layout.layer_names, weight=1.0) for i, v in enumerate(honest)]
    updates.append(ClientUpdate(4, -20 * honest[0], layout.layer_names, weight=1.0))  # a Byzantine client

    # key holder: keys, and the public context as bytes for everyone else
    key_holder = CKKSKeyHolder.generate("stats")
    public = key_holder.public_context_bytes()
    frame = PackingFrame(layout, layout.layer_names, key_holder.preset.slots)

    # -- mean path ----------------------------------------------------------------------------
    total_w = sum(u.weight for u in updates[:4])
    messages = {u.client_id: CKKSClient(public, "stats").encode(0, u, frame, prescale=u.weight / total_w)
                for u in updates[:4]}
    server = CKKSServer(public, "stats")
    assert not server.is_private()
    sums: dict[int, list] = {}
    for cid, msg in messages.items():
        server.decode(0, cid, msg, frame, strict=False, into=sums)
    packed = np.zeros(frame.numel)
    for k, (acc, m) in sums.items():
        lo, hi = frame.chunk_range(k)
        packed[lo:hi] = key_holder.decrypt_aggregate([acc.serialize()], contributors=m)[: hi - lo]
    plain_mean = torch.stack(honest).mean(0).double().numpy()
    mean_error = float(np.abs(packed - plain_mean).max())

    # -- Gram path: a robust rule on decrypted inner products only ------------------------------
    server = CKKSServer(public, "stats")
    received = [server.decode(1, u.client_id, CKKSClient(public, "stats").encode(1, u, frame), frame, strict=True)
                for u in updates]
    chunks = [[c.chunks[k] for k in range(frame.n_chunks)] for c in received]
    inner = {ij: ct.serialize() for ij, ct in encrypted_inner_products(chunks).items()}
    gram = key_holder.decrypt_gram([c.client_id for c in received], inner)
    rule = MultiKrum(f=1)
    result = rule.aggregate_gram(gram, torch.ones(len(received), dtype=torch.float64))
    assert result.weights is not None
    acc, _ = weighted_sum(chunks, [float(w) for w in result.weights])
    assert acc is not None
    robust = key_holder.decrypt_aggregate([a.serialize() for a in acc], contributors=len(received))
    robust = np.concatenate([robust[k * frame.slots : k * frame.slots + frame.chunk_len(k)]
                             for k in range(frame.n_chunks)])
    kept = [i for i, w in enumerate(result.weights.tolist()) if abs(w) > 1e-9]
    plain_robust = sum(float(result.weights[i]) * updates[i].vector.double().numpy() for i in kept)
    return {
        "mean_max_abs_error": mean_error,
        "robust_max_abs_error": float(np.abs(robust - plain_robust).max()),
        "byzantine_weight": float(result.weights[4]),
        "public_context_bytes": float(len(public)),
    }


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value:.3g}")
