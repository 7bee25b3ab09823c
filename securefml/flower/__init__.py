"""securefml on Flower: a Message-API strategy, a client mod, a meta-learning ClientApp, an engine.

Install with the extra: ``pip install 'securefml[flower]'`` (flwr >= 1.42, < 2; the simulation
runtime needs ``flwr[simulation]``, i.e. Ray).  Nothing in the core library imports this
package.

- ``SecureStrategy`` (``strategy``): drives any securefml protocol's server half over Flower
  messages, stage by stage, and runs the securefml defense on what the protocol reveals.
- ``securefml_mod`` (``client``): wraps a ClientApp; runs the protocol's client half on the
  update the user's training returns (layer selection and DP hook included).
- ``meta_client_app`` (``meta_app``): a ready ClientApp running the securefml meta-learners,
  with personalization in Flower's evaluate round.
- ``engine.run``: ``securefml run --engine flower`` through ``flwr.simulation.run_simulation``.
- ``LocalGrid`` (``local_grid``): calls ClientApps in this process (tests, same-run benchmarks).
- ``CKKSDeployment``, ``PublicCKKS`` (``ckks_parties``) and ``provision`` (``provision``): CKKS
  with the key holder on a SuperNode of its own and keys provisioned out of band.
- ``dump_half`` / ``load_half`` (``half_state``): a client half's state between stages as
  versioned bytes in the node's ``Context.state`` (a SuperNode runs a fresh process per message).

See ``docs/flower.md`` for the deployment recipe and what runs where.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from securefml.flower.ckks_parties import CKKSDeployment, PublicCKKS, forget_parties
    from securefml.flower.client import (
        ERROR_CODE,
        HALF_STATE_KEY,
        UploadPolicy,
        add_hello,
        forget_halves,
        partition_client_id,
        securefml_mod,
    )
    from securefml.flower.half_state import dump_half, load_half
    from securefml.flower.local_grid import LocalGrid
    from securefml.flower.optimizer import ServerOptimizer
    from securefml.flower.provision import provision, provision_in_subprocess
    from securefml.flower.records import StageRecord, read_stage, read_vector, write_stage, write_vector
    from securefml.flower.strategy import FlowerRound, SecureStrategy, StrategyConfig

#: public name -> the module that defines it (loaded on first use, so ``import securefml.flower``
#: works without Flower and the error names the extra to install)
_WHERE = {
    "SecureStrategy": "strategy", "StrategyConfig": "strategy", "FlowerRound": "strategy",
    "securefml_mod": "client", "add_hello": "client", "UploadPolicy": "client",
    "partition_client_id": "client", "forget_halves": "client", "ERROR_CODE": "client",
    "LocalGrid": "local_grid", "ServerOptimizer": "optimizer", "HALF_STATE_KEY": "client",
    "CKKSDeployment": "ckks_parties", "PublicCKKS": "ckks_parties", "forget_parties": "ckks_parties",
    "dump_half": "half_state", "load_half": "half_state",
    "provision": "provision", "provision_in_subprocess": "provision",
    "StageRecord": "records", "read_stage": "records", "write_stage": "records",
    "read_vector": "records", "write_vector": "records",
}

__all__ = [
    "SecureStrategy",
    "StrategyConfig",
    "FlowerRound",
    "securefml_mod",
    "add_hello",
    "UploadPolicy",
    "partition_client_id",
    "forget_halves",
    "ERROR_CODE",
    "LocalGrid",
    "ServerOptimizer",
    "StageRecord",
    "read_stage",
    "write_stage",
    "read_vector",
    "write_vector",
    "HALF_STATE_KEY",
    "CKKSDeployment",
    "PublicCKKS",
    "forget_parties",
    "dump_half",
    "load_half",
    "provision",
    "provision_in_subprocess",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'securefml.flower' has no attribute {name!r}")
    try:
        module = importlib.import_module(f"securefml.flower.{_WHERE[name]}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "flwr":
            raise ImportError("securefml.flower needs Flower: pip install 'securefml[flower]' (flwr>=1.42,<2)") from exc
        raise
    return getattr(module, name)
