"""Issue 11, finding 4: the CKKS key holder must not decrypt whatever the server asks.

Each test plays a curious server with the public context (real TenSEAL ciphertexts) that tries
to make the key holder reveal one client's data: a lone ciphertext passed off as a sum, an
inner product with a basis vector passed off as a Gram entry or as an FLTrust reference, and a
rule whose output is one client's update.  Before the fix every one of these decrypted.
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
import torch

from securefml.defenses import Krum, MultiKrum
from securefml.errors import ConfigError, ProtocolError
from securefml.protocols.base import ClientUpdate
from securefml.protocols.ckks import CKKS
from securefml.protocols.ckks_keys import CKKSKeyHolder, load_public_context
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("fc.weight", (4, 5)), ("fc.bias", (4,))])


@pytest.fixture(scope="module")
def holder() -> CKKSKeyHolder:
    return CKKSKeyHolder.generate("stats", min_contributors=2)


@pytest.fixture(scope="module")
def victim(holder):
    """One honest client's update and the ciphertext it uploads (as the server holds it)."""
    ctx = load_public_context(holder.public_context_bytes())
    u = np.random.default_rng(0).normal(size=24)
    return u, ctx, ts.ckks_vector(ctx, u.tolist())


def test_lone_ciphertext_claimed_as_a_sum_of_three_is_refused(holder, victim):
    u, _, ct = victim
    with pytest.raises(ProtocolError):
        holder.decrypt_aggregate([ct.serialize()], contributors=3)


def test_gram_entry_that_is_a_dot_with_a_basis_vector_is_refused(holder, victim):
    u, _, ct = victim
    e_j = [0.0] * 24
    e_j[5] = 1.0
    probe = ct.dot(e_j)  # = u[5], a size-1 ciphertext like any Gram entry
    with pytest.raises(ProtocolError):
        holder.decrypt_gram([0], {(0, 0): probe.serialize()})


def test_server_chosen_reference_is_refused(holder, victim):
    u, ctx, ct = victim
    other = ts.ckks_vector(ctx, np.random.default_rng(1).normal(size=24).tolist())
    inner = {(0, 0): ct.dot(ct).serialize(), (0, 1): ct.dot(other).serialize(), (1, 1): other.dot(other).serialize()}
    e_j = [0.0] * 24
    e_j[7] = 1.0
    reference = [ct.dot(e_j).serialize(), other.dot(e_j).serialize()]  # <u_i, e_7> = u_i[7]
    with pytest.raises(ProtocolError):
        holder.decrypt_gram([0, 1], inner, reference, 1.0)


@pytest.mark.parametrize("rule", [Krum(1), MultiKrum(1, m=1)], ids=["krum", "multikrum-m1"])
def test_rule_that_outputs_one_clients_update_is_refused_under_ckks(holder, rule):
    g = torch.Generator().manual_seed(2)
    ups = [ClientUpdate(i, torch.randn(LAYOUT.numel, generator=g), LAYOUT.layer_names, 1.0) for i in range(5)]
    with pytest.raises(ConfigError, match="one client"):
        CKKS(holder).run_round(0, ups, LAYOUT, defense=rule)
