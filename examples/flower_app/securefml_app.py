"""securefml as a Flower App (``flwr run``): plaintext protocol, a robust rule, FOMAML clients.

Each SuperNode is started with ``--node-config "partition-id=<i>"`` and runs the meta-learning
ClientApp on client ``i`` of digits-fewshot (generated offline from the seed; a real node reads
its own data).  Multi-stage protocols (SecAgg+, CKKS) need their client half kept between
stages; a SuperNode starts a fresh ClientApp process per message, so this app uses the
single-stage plaintext protocol (``docs/flower.md``, "What runs where").
"""

from __future__ import annotations

from flwr.app import Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from securefml.defenses import make_defense
from securefml.flower import SecureStrategy, StrategyConfig
from securefml.flower.meta_app import MetaAppConfig, MetaNode, meta_client_app
from securefml.flower.records import GLOBAL_KEY, write_vector
from securefml.protocols.plaintext import Plaintext

N_TRAIN = 3
CONFIG = MetaAppConfig(dataset="digits-fewshot", dataset_options=(("n_heldout", 2), ("n_train", N_TRAIN)), seed=0,
                       algorithm="fomaml", inner_steps=2, inner_lr=0.2)
PROTOCOL = Plaintext()

client_app = meta_client_app(CONFIG, PROTOCOL)
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config.get("num-server-rounds", 2))
    node = MetaNode(CONFIG)
    initial = node.layout.flatten(node.learner.init_params()).detach()
    strategy = SecureStrategy(PROTOCOL, make_defense(str(context.run_config.get("defense", "median"))), node.layout,
                              initial, config=StrategyConfig(clients_per_round=N_TRAIN, min_nodes=N_TRAIN,
                                                             server_opt="adam", server_lr=0.005),
                              cohort_fn=lambda _round, ids: ids)
    arrays = write_vector(RecordDict(), GLOBAL_KEY, initial).array_records[GLOBAL_KEY]
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds)
    for rec in strategy.history:
        print(f"securefml round {rec.round}: accepted {rec.accepted} rejected {rec.rejected} "
              f"bytes {rec.bytes_uploaded} norm {rec.update_norm:.4f}", flush=True)
