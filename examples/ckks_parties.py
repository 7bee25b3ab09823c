"""CKKS with the key holder, the clients and the server as separate parties exchanging bytes.

Run: ``python examples/ckks_parties.py``.  Three roles, each an object that could live in its own
process or machine, and only ``bytes`` between them:

* the **key holder** makes the keys, publishes the public context (no secret key in it), holds
  the clients' verify keys, and decrypts only what its policy allows, computed by itself from
  the uploads their authors signed: sums over enough clients, and the round's one Gram;
* each **client** encrypts its update under the public context and signs it;
* the **server** validates and adds ciphertexts; it can never decrypt (its context is public).

Mean path: clients encrypt and sign ``(w_i / W) * u_i``; the server checks and forwards the
signed uploads; the key holder verifies them, adds them itself and decrypts the sum.  Gram path
(robust rules): the key holder computes and decrypts exactly the n x n Gram of the signed uploads,
Multi-Krum picks weights from it, and the key holder decrypts that weighted sum (its policy: at
least two contributors, none above half the weight).  Prints both errors against the plaintext answer.
"""

from __future__ import annotations

import numpy as np
import torch

from securefml.defenses import MultiKrum
from securefml.protocols import CKKSClient, CKKSKeyHolder, CKKSServer, ClientUpdate, PackingFrame
from securefml.protocols.ckks_auth import UploadSigner
from securefml.protocols.ckks_policy import AggregateRequest, GramRequest
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
    # the round's public packing frame travels as bytes; each client rebuilds it over its own model
    frame_bytes = PackingFrame(layout, layout.layer_names, key_holder.preset.slots).to_bytes(0)
    frame = PackingFrame.from_bytes(frame_bytes, layout)
    # each client's signing key; only its public verify key reaches the key holder (out of band)
    signers = {u.client_id: UploadSigner.generate(u.client_id) for u in updates}
    for cid, signer in signers.items():
        key_holder.registry.register(cid, signer.verify_key())

    # -- mean path: the key holder adds the signed ciphertexts itself and decrypts the sum -------
    total_w = sum(u.weight for u in updates[:4])
    messages = {u.client_id: CKKSClient(public, "stats").encode(0, u, frame, signer=signers[u.client_id],
                                                                prescale=u.weight / total_w)
                for u in updates[:4]}
    server = CKKSServer(public, "stats")
    assert not server.is_private()
    received = [server.decode(0, cid, msg, frame, strict=True, normalizer=total_w) for cid, msg in messages.items()]
    uploads = tuple(r.upload for r in received if r.upload is not None)
    dec = key_holder.decrypt_aggregate(AggregateRequest(0, frame, uploads, {u.sender: 1.0 for u in uploads}))
    packed = np.concatenate([dec[k][: frame.chunk_len(k)] for k in range(frame.n_chunks)])
    plain_mean = torch.stack(honest).mean(0).double().numpy()
    mean_error = float(np.abs(packed - plain_mean).max())

    # -- Gram path: a robust rule on decrypted inner products only ------------------------------
    server = CKKSServer(public, "stats")
    received = [
        server.decode(1, u.client_id, CKKSClient(public, "stats").encode(1, u, frame, signer=signers[u.client_id]),
                      frame, strict=True)
        for u in updates
    ]
    uploads = tuple(r.upload for r in received if r.upload is not None)
    gram = key_holder.decrypt_gram(GramRequest(1, frame, uploads))  # exactly the signed uploads' Gram
    rule = MultiKrum(f=1)
    result = rule.aggregate_gram(gram, torch.ones(len(received), dtype=torch.float64))
    assert result.weights is not None
    coefficients = {u.sender: float(w) for u, w in zip(uploads, result.weights.tolist())}
    dec = key_holder.decrypt_aggregate(AggregateRequest(1, frame, uploads, coefficients))
    robust = np.concatenate([dec[k][: frame.chunk_len(k)] for k in range(frame.n_chunks)])
    plain_robust = sum(float(w) * updates[i].vector.double().numpy() for i, w in enumerate(result.weights.tolist()))
    return {
        "mean_max_abs_error": mean_error,
        "robust_max_abs_error": float(np.abs(robust - plain_robust).max()),
        "byzantine_weight": float(result.weights[4]),
        "public_context_bytes": float(len(public)),
    }


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value:.3g}")
