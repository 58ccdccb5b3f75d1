"""An in-process Grid: the ServerApp's messages go straight to ClientApp instances in this process.

Fast ServerApp tests without Ray or a SuperLink. Each simulated node keeps its own Context
(``partition-id``/``num-partitions`` as in Flower's simulation, or the given node configs, e.g.
``data-dir`` as on a deployed SuperNode); a ClientApp exception becomes an
error reply, as it does in Flower.
"""

from __future__ import annotations

import time
import uuid
from typing import Iterable, Mapping

from flwr.app import Context, Error, Message, RecordDict
from flwr.app.metadata import Metadata
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    def __init__(
        self,
        app: ClientApp,
        *,
        run_config: Mapping,
        n_nodes: int,
        fail_types: Iterable[str] = (),
        node_configs: list[dict] | None = None,
    ) -> None:
        self.app = app
        # Flower stamps every new Message with the identity of the task that runs it.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        self.fail_types = set(fail_types)
        self.calls: list[str] = []
        self.contexts = {
            1000 + pid: Context(
                run_id=1,
                node_id=1000 + pid,
                node_config=(node_configs[pid] if node_configs else {"partition-id": pid, "num-partitions": n_nodes}),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for pid in range(n_nodes)
        }

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            dst = message.metadata.dst_node_id
            kind = message.metadata.message_type
            self.calls.append(kind)
            incoming = Message(
                content=message.content,
                metadata=Metadata(
                    run_id=1,
                    message_id=uuid.uuid4().hex,
                    src_node_id=0,
                    dst_node_id=dst,
                    reply_to_message_id="",
                    group_id="",
                    created_at=time.time(),
                    ttl=3600.0,
                    message_type=kind,
                ),
            )
            try:
                if kind in self.fail_types:
                    raise RuntimeError(f"injected failure for {kind}")
                reply = self.app(incoming, self.contexts[dst])
            except Exception as exc:  # noqa: BLE001 - Flower turns ClientApp exceptions into error replies too
                reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=incoming)
            replies.append(reply)
        return replies

    # The remaining Grid methods are not used by serforget's ServerApp.
    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError
