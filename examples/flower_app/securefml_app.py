"""securefml as a Flower App (``flwr run``): plaintext or SecAgg+, a robust rule, FOMAML clients.

Each SuperNode is started with ``--node-config "partition-id=<i>"`` and runs the meta-learning
ClientApp on client ``i`` of digits-fewshot (generated offline from the seed; a real node reads
its own data).  The app's ``protocol`` config picks the protocol the ServerApp drives:
``"plaintext"`` (one stage) with ``clientapp = "securefml_app:client_app"``, or ``"secagg"``
(SecAgg+, five stages) with ``clientapp = "securefml_app:secagg_client_app"``, or ``"ckks"``
(CKKS mean, keys provisioned out of band with ``python -m securefml.flower.provision``, each
machine's copy named by ``$SECUREFML_CKKS_KEYS``) with ``clientapp =
"securefml_app:ckks_client_app"`` and one more SuperNode started with ``--node-config
"securefml-role='key-holder'"``: the key holder, never in the ServerApp's process.  A SuperNode
starts a fresh ClientApp process per message; the SecAgg+ client half survives between stages
as bytes in the node's ``Context.state`` (``securefml.flower.half_state``), which stays on the
node (``docs/flower.md``, "What runs where").
"""

from __future__ import annotations

import os

from flwr.app import Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from securefml.defenses import make_defense
from securefml.flower import SecureStrategy, StrategyConfig
from securefml.flower.ckks_parties import CKKSDeployment
from securefml.flower.meta_app import MetaAppConfig, MetaNode, meta_client_app
from securefml.flower.records import GLOBAL_KEY, write_vector
from securefml.protocols.ckks_params import KEY_HOLDER_PARTY
from securefml.protocols.plaintext import Plaintext
from securefml.protocols.secagg import SecAggPlus

N_TRAIN = 3
#: public bound on a client's weight (its support-set size) for SecAgg+'s ring
MAX_WEIGHT = 1024.0
CONFIG = MetaAppConfig(dataset="digits-fewshot", dataset_options=(("n_heldout", 2), ("n_train", N_TRAIN)), seed=0,
                       algorithm="fomaml", inner_steps=2, inner_lr=0.2)
PROTOCOLS = {"plaintext": Plaintext(), "secagg": SecAggPlus(max_weight=MAX_WEIGHT)}

client_app = meta_client_app(CONFIG, PROTOCOLS["plaintext"])
secagg_client_app = meta_client_app(CONFIG, PROTOCOLS["secagg"])
#: this machine's copy of the provisioned key set (a client's holds its own signing key only)
CKKS_NODE = CKKSDeployment(os.environ.get("SECUREFML_CKKS_KEYS", "keys"))
ckks_client_app = meta_client_app(CONFIG, CKKS_NODE, services=CKKS_NODE)
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config.get("num-server-rounds", 2))
    name = str(context.run_config.get("protocol", "plaintext"))
    services: dict[int, int] = {}
    if name == "ckks":  # the public half only: the key holder is a SuperNode of its own
        protocol = CKKSDeployment(os.environ.get("SECUREFML_CKKS_KEYS", "keys")).server_protocol()
        services = {KEY_HOLDER_PARTY: KEY_HOLDER_PARTY}
    else:
        protocol = PROTOCOLS[name]
    node = MetaNode(CONFIG)
    initial = node.layout.flatten(node.learner.init_params()).detach()
    strategy = SecureStrategy(protocol, make_defense(str(context.run_config.get("defense", "median"))), node.layout,
                              initial, config=StrategyConfig(clients_per_round=N_TRAIN,
                                                             min_nodes=N_TRAIN + len(services),
                                                             server_opt="adam", server_lr=0.005,
                                                             max_weight=MAX_WEIGHT),
                              cohort_fn=lambda _round, ids: ids, service_nodes=services)
    arrays = write_vector(RecordDict(), GLOBAL_KEY, initial).array_records[GLOBAL_KEY]
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds)
    for rec in strategy.history:
        print(f"securefml round {rec.round}: accepted {rec.accepted} rejected {rec.rejected} "
              f"dropped {rec.dropped} stages {rec.stages} bytes {rec.bytes_uploaded} norm {rec.update_norm:.4f}",
              flush=True)
