"""A Flower ``Grid`` that calls ClientApps in this process: for tests and same-run benchmarks.

It is not an engine: it delivers each message to a ``ClientApp`` object synchronously, with one
Flower ``Context`` per node, so a strategy, its mods and Flower's own workflows can be timed
on the same input without the simulation runtime's start-up (Ray) in the measurement.  A node
listed in ``offline`` never answers (a dropout, as a message that times out).  The real runs go
through ``flwr.simulation.run_simulation`` (``securefml.flower.engine``) or a deployment.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping

from flwr.app import DEFAULT_TTL, Context, Message, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run

__all__ = ["LocalGrid"]

SUPERLINK = 0


class LocalGrid(Grid):
    """Deliver messages to ``ClientApp`` objects in this process, one ``Context`` per node.

    Parameters
    ----------
    apps:
        Node id -> the ClientApp that node runs.
    node_config:
        Node id -> its node config (e.g. ``{"partition-id": 3}``).
    offline:
        ``offline(node_id, message) -> bool``: True when that node does not answer that message.
    run_id:
        The run id the messages carry.
    """

    def __init__(
        self,
        apps: Mapping[int, ClientApp],
        node_config: Mapping[int, Mapping[str, bool | float | int | str]],
        *,
        offline: Callable[[int, Message], bool] | None = None,
        run_id: int = 1,
    ) -> None:
        self.apps = dict(apps)
        self.contexts = {
            n: Context(run_id=run_id, node_id=n, node_config=dict(node_config.get(n, {})), state=RecordDict(),
                       run_config={})
            for n in self.apps
        }
        self.offline = offline
        self._run = Run.create_empty(run_id)
        self._ids = itertools.count(1)
        self._replies: dict[str, Message] = {}
        self.bytes_to_nodes = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        meta = Metadata(run_id=self._run.run_id, message_id="", src_node_id=SUPERLINK, dst_node_id=dst_node_id,
                        reply_to_message_id="", group_id=group_id, created_at=time.time(), ttl=ttl or DEFAULT_TTL,
                        message_type=message_type, src_task_id=0, dst_task_id=0)
        return make_message(meta, content)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.apps)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid  # what the SuperLink assigns on push
            msg.metadata.created_at = time.time()
            ids.append(mid)
            node = msg.metadata.dst_node_id
            if node not in self.apps or (self.offline is not None and self.offline(node, msg)):
                continue
            reply = self.apps[node](msg, self.contexts[node])
            reply.metadata.__dict__["_message_id"] = f"r{mid}"
            self._replies[mid] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))
