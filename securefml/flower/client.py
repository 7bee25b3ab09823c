"""The client side on Flower: a mod that runs a securefml protocol's client half around a ClientApp.

Like Flower's ``secaggplus_mod``, ``securefml_mod`` wraps the user's own ``ClientApp``: when the
protocol's first stage arrives (a ``train`` message carrying the global model), it calls the
user's training function (the next handler in the chain), takes the update it returns, selects
layers and applies the update hook (user-level DP clipping and noise) on exactly what is sent,
builds the protocol's client half from it and answers the stage with the half's bytes.  Every
later stage is answered by the same half, without calling the user's code.  The raw update never
leaves the node: the reply carries only the protocol's bytes (and the metrics named in
``UploadPolicy.share_metrics``, none by default: under SecAgg+ even the sample count is secret).

What the user's training function returns (a reply ``Message``):

- ``content["securefml.update"]``: an ``ArrayRecord`` with the flat float32 update over the whole
  layout (``securefml.flower.records.write_vector``);
- ``content["securefml.metrics"]``: a ``MetricRecord`` with ``num_examples`` (the aggregation
  weight; 1 when absent) and any metrics.

State between stages: the half lives in this process's memory from one stage to the next,
keyed by run, node and round, and after every stage its state is also written, as versioned
bytes (``securefml.flower.half_state``), into the node's ``Context.state`` under
``HALF_STATE_KEY``.  Flower's simulation runtime keeps a node's ClientApp in one process when
its backend runs one actor (``securefml.flower.engine`` sets that), so the memory copy answers
there; a SuperNode in deployment starts a fresh ClientApp process per message, and that process
rebuilds the half from ``Context.state``.  ``Context.state`` stays on the SuperNode (Flower
never sends it to the SuperLink): the half's secrets (SecAgg+'s X25519 private keys, its mask
seed and the shares it holds) never leave the node.  A half that is in neither place answers
with an error, which the strategy counts as a dropout (see ``docs/flower.md``).

Threat model: the server may deviate arbitrarily; every check of the protocol's client half runs
unchanged (a ``ProtocolError`` from the half stops this client for the round, answered as an
error reply).  The mod also refuses a message addressed to another party or round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from securefml.errors import InvalidUpdateError, MalformedMessageError, ProtocolError, SecureFMLError
from securefml.flower.client_types import ClientHalves, ServiceHost
from securefml.flower.half_state import can_dump, dump_half, load_half
from securefml.flower.records import (
    GLOBAL_KEY,
    METRICS_KEY,
    PROTOCOL_KEY,
    UPDATE_KEY,
    StageRecord,
    metrics_of,
    read_stage,
    read_vector,
    write_stage,
)
from securefml.flower.strategy import HELLO_ACTION, HELLO_KEY
from securefml.protocols.halves import ClientHalf
from securefml.rounds import ClientUpdate, check_finite
from securefml.selection import AllLayers, LayerSelector
from securefml.updates import LayerLayout

__all__ = ["ClientHalves", "ServiceHost", "HALF_STATE_KEY", "node_identity", "securefml_mod", "add_hello",
           "UploadPolicy", "ERROR_CODE",
           "partition_client_id", "forget_halves"]

log = logging.getLogger(__name__)

#: Flower error code of a reply from a client that stopped (the strategy counts it as a dropout).
ERROR_CODE = 4_242

#: (run id, node id, round) -> that node's client half of the round (see the module docstring).
_HALVES: dict[tuple[int, int, int], ClientHalf] = {}
#: ``Context.state`` key of the node's saved client half (a ``ConfigRecord``: round, party, bytes).
HALF_STATE_KEY = "securefml.half"


@dataclass(frozen=True)
class UploadPolicy:
    """What the client does between its training and the protocol.

    Attributes
    ----------
    selector:
        Which layers to upload (``securefml.selection``); every layer by default.
    update_hook:
        ``hook(client_id, full_update) -> full_update`` run last, on exactly what is sent
        (user-level DP: ``securefml.privacy`` clipping and noise).
    share_metrics:
        Names of the training metrics the reply may carry in the clear (none by default).
    """

    selector: LayerSelector | None = None
    update_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    share_metrics: tuple[str, ...] = ()


def partition_client_id(context: Context) -> int:
    """The client id of a SuperNode: its ``partition-id`` node config (simulation and ``--node-config``)."""
    value = context.node_config.get("partition-id")
    if not isinstance(value, int):
        raise MalformedMessageError("this SuperNode has no integer 'partition-id' in its node config", sender=None)
    return value


def forget_halves() -> None:
    """Drop every client half this process holds (tests; a new run)."""
    _HALVES.clear()


# The mod below reaches the registry only through these module-level functions: Flower's Ray
# backend ships the ClientApp to its actor with cloudpickle on every message, which copies the
# globals a nested function names directly, but re-imports a module-level function by name.
def _get_half(key: tuple[int, int, int]) -> ClientHalf | None:
    return _HALVES.get(key)


def _put_half(key: tuple[int, int, int], half: ClientHalf) -> None:
    for old in [k for k in _HALVES if k[:2] == key[:2] and k[2] < key[2]]:  # earlier rounds of this node
        del _HALVES[old]
    _HALVES[key] = half


def add_hello(
    app: ClientApp, *, client_id: Callable[[Context], int] = partition_client_id, services: ServiceHost | None = None
) -> ClientApp:
    """Register the ``query.securefml_hello`` handler: the node tells the strategy its client id.

    Flower routes a message only to a registered function, so the strategy's one-time question
    needs its own handler; ``securefml_mod`` answers the protocol stages of ``train``.
    """

    @app.query(HELLO_ACTION)
    def hello(msg: Message, context: Context) -> Message:
        me = node_identity(context, client_id, services)
        return Message(RecordDict({HELLO_KEY: ConfigRecord({"client": me})}), reply_to=msg)

    return app


def node_identity(context: Context, client_id: Callable[[Context], int], services: ServiceHost | None) -> int:
    """The party id a node announces and answers as: its service party if it hosts one, else its client id."""
    if services is not None:
        party = services.service_party(context)
        if party is not None:
            return int(party)
    return int(client_id(context))


def securefml_mod(
    protocol: ClientHalves,
    layout: LayerLayout,
    *,
    client_id: Callable[[Context], int] = partition_client_id,
    policy: UploadPolicy | None = None,
    services: ServiceHost | None = None,
) -> Mod:
    """A Flower mod that runs ``protocol``'s client half around the wrapped ClientApp.

    Parameters
    ----------
    protocol:
        The protocol the strategy drives, or anything with its ``client_half`` (e.g.
        ``CKKSDeployment``, which loads this node's provisioned key); it builds this node's half.
    layout:
        The model's layer layout.
    client_id:
        This node's securefml client id, from its Flower ``Context``.
    policy:
        Layer selection, update hook and shared metrics (``UploadPolicy``).
    services:
        ``services.service_half(context, round_idx, party, layout)`` builds the half of a
        protocol service party this node hosts (the CKKS key holder's, on the key-holder node
        only); the half then answers every stage addressed to that party in the round.

    Returns
    -------
    Mod
        Register it app-wide, ``ClientApp(mods=[securefml_mod(...)])``, and call ``add_hello(app)``.
    """
    pol = policy or UploadPolicy()
    selector = pol.selector or AllLayers()

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        content = msg.content if msg.has_content() else RecordDict()
        if PROTOCOL_KEY not in content.config_records:
            return call_next(msg, context)
        me = node_identity(context, client_id, services)
        try:
            return _answer(msg, context, call_next, me)
        except SecureFMLError as exc:
            log.warning("client %s stops this round: %s", me, exc)
            return Message(Error(ERROR_CODE, f"{type(exc).__name__}: {exc}"), reply_to=msg)

    def _answer(msg: Message, context: Context, call_next: ClientAppCallable, me: int) -> Message:
        rec = read_stage(msg, sender=None)
        key = (msg.metadata.run_id, msg.metadata.dst_node_id, rec.round_idx)
        shared: dict[str, int | float | list[int] | list[float]] = {}
        half = _get_half(key)
        if half is None and rec.party == me and GLOBAL_KEY not in msg.content.array_records:
            half = _saved_half(context, protocol, layout, rec.round_idx, me)
            if half is not None:
                _put_half(key, half)
        if half is None and services is not None:
            half = services.service_half(context, rec.round_idx, rec.party, layout)
            if half is not None:
                _put_half(key, half)
        if half is not None:
            if half.party != rec.party:
                raise ProtocolError(f"message addressed to party {rec.party}, this node is {half.party}", sender=None)
            if GLOBAL_KEY in msg.content.array_records:
                raise ProtocolError(f"round {rec.round_idx} started twice", sender=None)
        elif rec.party != me:
            raise ProtocolError(f"message addressed to party {rec.party}, this node is {me}", sender=None)
        elif GLOBAL_KEY in msg.content.array_records:  # the first stage: train, then build the half
            reply = call_next(msg, context)
            if reply.has_error():
                return reply
            received = read_vector(msg.content, GLOBAL_KEY, length=layout.numel, sender=None)
            update, metrics = _update_from(reply, me, layout, selector, pol, received)
            shared = {k: v for k, v in metrics.items() if k in pol.share_metrics}
            half = protocol.client_half(rec.round_idx, layout, update)
            _put_half(key, half)
        else:
            raise ProtocolError(f"stage {rec.stage!r} of round {rec.round_idx} without this node's half "
                                "(the ClientApp process did not keep it)", sender=None)
        try:
            payload = half.respond(rec.stage, rec.payload)
        finally:  # the half's state after this stage, for the next process (also after a refusal)
            _save_half(context, half, rec.round_idx, services)
        out = write_stage(RecordDict(), StageRecord(rec.stage, rec.round_idx, rec.party, payload))
        if shared:
            out[METRICS_KEY] = MetricRecord(shared)
        return Message(out, reply_to=msg)

    return mod


def _saved_half(context: Context, protocol: ClientHalves, layout: LayerLayout, round_idx: int,
                party: int) -> ClientHalf | None:
    """The half saved in ``context.state`` for this round and party, or ``None`` if there is none."""
    rec = context.state.config_records.get(HALF_STATE_KEY)
    if rec is None or rec.get("round") != round_idx or rec.get("party") != party:
        return None
    data = rec.get("half")
    if not isinstance(data, bytes):
        raise MalformedMessageError("the node's saved half state is not bytes", sender=None)
    log.debug("node %s: client half of round %d rebuilt from Context.state", party, round_idx)
    return load_half(data, protocol, layout, round_idx=round_idx, party=party)


def _save_half(context: Context, half: ClientHalf, round_idx: int, services: ServiceHost | None) -> None:
    if can_dump(half):
        context.state[HALF_STATE_KEY] = ConfigRecord(
            {"round": int(round_idx), "party": int(half.party), "half": dump_half(half, round_idx=round_idx)})
    elif services is not None:
        services.save_state(context)


def _update_from(
    reply: Message, me: int, layout: LayerLayout, selector: LayerSelector, pol: UploadPolicy,
    global_vector: torch.Tensor,
) -> tuple[ClientUpdate, dict[str, float]]:
    """The ``ClientUpdate`` this node uploads: selection, then the update hook, as the in-process server."""
    full = read_vector(reply.content, UPDATE_KEY, length=layout.numel, sender=me)
    metrics = metrics_of(reply.content)
    weight = float(metrics.get("num_examples", 1.0))
    if not weight > 0:
        raise InvalidUpdateError(f"num_examples must be positive, got {weight}", sender=me)
    layers: Sequence[str] = selector.select(layout, full, global_vector)
    sent = layout.gather(full, layers)
    if pol.update_hook is not None:
        sent = layout.gather(pol.update_hook(me, layout.scatter(sent, layers)), layers)
    check_finite(sent, me)
    return ClientUpdate(me, sent, tuple(layers), weight), metrics
