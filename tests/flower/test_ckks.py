"""CKKS over Flower: provisioned keys, the key holder on its own SuperNode, the in-process result.

The keys are provisioned once per session in a separate process (``securefml.flower.provision``);
the ServerApp's protocol is ``PublicCKKS`` (public context only), the key-holder node loads the
secret key, every client node its own signing key.
"""

from __future__ import annotations

import pytest  # noqa: I001

pytest.importorskip("flwr", reason="Flower is the optional extra: pip install 'securefml[flower]'")

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from flwr.app import ConfigRecord, Context, RecordDict  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from securefml.defenses import make_defense  # noqa: E402
from securefml.errors import ConfigError  # noqa: E402
from securefml.flower import SecureStrategy, StrategyConfig, forget_halves  # noqa: E402
from securefml.flower.ckks_parties import (  # noqa: E402
    KEY_HOLDER_ROLE,
    ROLE_KEY,
    CKKSDeployment,
    PublicCKKS,
)
from securefml.flower.client import ERROR_CODE  # noqa: E402
from securefml.flower.provision import SECRET, read_manifest  # noqa: E402
from securefml.flower.records import StageRecord, write_stage  # noqa: E402
from securefml.protocols.ckks import CKKS  # noqa: E402
from securefml.protocols.ckks_params import KEY_HOLDER_PARTY  # noqa: E402
from securefml.rounds import ClientUpdate  # noqa: E402
from tests.flower.conftest import CKKS_PARTIES  # noqa: E402
from tests.flower.helpers import LAYOUT, fixed_app, known_updates, local_grid  # noqa: E402

N = 5
KEY_NODE = 999


pytestmark = pytest.mark.usefixtures("forget_flower_memory")


def _cohort_all(_r: int, ids):  # type: ignore[no-untyped-def]
    return ids


def _strategy(dep: CKKSDeployment, defense: str = "mean") -> SecureStrategy:
    return SecureStrategy(dep.server_protocol(), make_defense(defense), LAYOUT, torch.zeros(LAYOUT.numel),
                          config=StrategyConfig(min_nodes=N + 1), cohort_fn=_cohort_all,
                          service_nodes={KEY_HOLDER_PARTY: KEY_HOLDER_PARTY})


def _grid(dep: CKKSDeployment, ups):  # type: ignore[no-untyped-def]
    return local_grid(fixed_app(dep, ups, services=dep), N, extra={KEY_NODE: {ROLE_KEY: KEY_HOLDER_ROLE}})


def test_ckks_mean_over_flower_equals_the_in_process_round(ckks_keys: Path) -> None:
    dep = CKKSDeployment(str(ckks_keys))
    ups = known_updates(N, seed=4)
    strat = _strategy(dep)
    assert isinstance(strat.protocol, PublicCKKS) and strat.protocol.key_holder is None
    assert not strat.protocol.server.is_private()
    grid = _grid(dep, ups)
    msgs = strat.configure_train(1, None, ConfigRecord(), grid)  # type: ignore[arg-type]
    strat.aggregate_train(1, grid.send_and_receive(msgs))
    rec = strat.history[0]
    assert rec.accepted == list(range(N)) and rec.stages == ["announce", "update", "decrypt"]
    assert KEY_HOLDER_PARTY not in rec.cohort
    ref = CKKS(preset="add-only").run_round(0, [ClientUpdate(c, u, LAYOUT.layer_names, 1.0) for c, u in ups.items()],
                                            LAYOUT, defense=make_defense("mean"))
    assert torch.allclose(strat.model.vector, ref.aggregate, atol=1e-4)


def test_the_server_side_protocol_never_makes_a_key_holder_and_clients_refuse_other_keys(ckks_keys: Path) -> None:
    dep = CKKSDeployment(str(ckks_keys))
    server = dep.server_protocol()
    with pytest.raises(ConfigError, match="own SuperNode"):
        server.service_halves(0, LAYOUT, setup=server.halves_setup(make_defense("mean")))
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match="key-holder"):
        dep.key_holder(ctx)  # a client node never loads the secret key
    assert dep.service_half(ctx, 0, KEY_HOLDER_PARTY, LAYOUT) is None
    assert read_manifest(ckks_keys).parties == tuple(range(CKKS_PARTIES))
    assert (ckks_keys / SECRET).stat().st_mode & 0o077 == 0  # the secret file is private to its owner


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stage=st.sampled_from(["gram", "decrypt", "announce", "update", "x"]), payload=st.binary(max_size=300),
       party=st.sampled_from([KEY_HOLDER_PARTY, 0, 3]), round_idx=st.integers(0, 3))
def test_whatever_the_server_sends_the_key_holder_node_it_decrypts_nothing_for_it(
    ckks_keys: Path, stage: str, payload: bytes, party: int, round_idx: int
) -> None:
    """A deviating server sends the key-holder node any stage, round, party and bytes: an error reply."""
    forget_halves()
    dep = CKKSDeployment(str(ckks_keys))
    grid = _grid(dep, known_updates(N))
    content = write_stage(RecordDict(), StageRecord(stage, round_idx, party, payload))
    (reply,) = list(grid.send_and_receive([grid.create_message(content, "train", KEY_NODE, "g")]))
    assert reply.has_error() and reply.error.code == ERROR_CODE


def test_provisioning_refuses_to_overwrite_and_a_foreign_public_context_is_refused(ckks_keys: Path,
                                                                                  tmp_path: Path) -> None:
    from securefml.flower.provision import MANIFEST, PUBLIC, provision
    from securefml.protocols.ckks_auth import UploadSigner
    from securefml.protocols.ckks_keys import CKKSKeyHolder

    with pytest.raises(ConfigError, match="already holds"):
        provision(ckks_keys, [0, 1], preset="add-only")  # keys are never overwritten
    other = CKKSKeyHolder.generate("add-only").public_context_bytes()
    with pytest.raises(ConfigError, match="does not belong"):  # a public context of another key set
        CKKSKeyHolder.from_secret_context((ckks_keys / SECRET).read_bytes(), other, "add-only")
    holder = CKKSKeyHolder.from_secret_context((ckks_keys / SECRET).read_bytes(), (ckks_keys / PUBLIC).read_bytes(),
                                               "add-only")
    assert holder.fingerprint.hex() == read_manifest(ckks_keys).fingerprint
    with pytest.raises(ConfigError, match="signing key"):
        UploadSigner.from_private_bytes(3, b"short")
    (tmp_path / MANIFEST).write_text('{"version": 99}')
    with pytest.raises(ConfigError, match="version"):
        read_manifest(tmp_path)
    with pytest.raises(ConfigError, match="missing"):
        read_manifest(tmp_path / "nowhere")
