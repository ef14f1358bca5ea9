"""The coordinator and the sites in two processes, for measuring the coordinator's own memory.

``ctfed bench`` runs SecAgg+ in one process (``simulations/runtime/inprocess.py``), where the sites'
deltas and masking share the coordinator's RSS. Here the sites' real stage handlers run in a
spawned process (``serve_sites``) and the coordinator's real round code in another, behind
``PipeGrid``: Flower's push/pull interface over a pipe. A pushed message is answered when
the coordinator pulls it, as a Flower grid pulls a reply once it is there. Arrays travel as
their raw bytes (``send_bytes``), so receiving a reply costs its size once, as after
Flower's own inflation; everything else is pickled.
"""

from __future__ import annotations

import pickle
from multiprocessing.connection import Connection
from typing import Any, Callable, Iterable

from flwr.app import Array, ArrayRecord, Error, Message, RecordDict

_STOP = "stop"
_PUSH = "push"
_PULL = "pull"


def send_message(conn: Connection, message: Message | None) -> None:
    """One message: a pickled skeleton (metadata we need, non-array records), then each
    array's bytes as its own frame (no pickling copy of the large payloads)."""
    if message is None:
        conn.send(None)
        return
    meta = message.metadata
    head: dict[str, Any] = {
        "dst": int(meta.dst_node_id), "src": int(meta.src_node_id), "type": meta.message_type, "group": meta.group_id,
    }
    arrays: list[bytes] = []
    if message.has_error():
        head["error"] = (message.error.code, message.error.reason)
    else:
        records = []
        for name, record in message.content.items():
            if isinstance(record, ArrayRecord):
                specs = []
                for key, array in record.items():
                    specs.append((key, array.dtype, tuple(array.shape), array.stype))
                    arrays.append(array.data)
                records.append((name, "arrays", specs))
            else:
                records.append((name, "pickled", pickle.dumps(record)))
        head["records"] = records
    conn.send(head)
    for data in arrays:
        conn.send_bytes(data)


def receive_content(conn: Connection) -> dict[str, Any] | None:
    """The other end of ``send_message``: the head, with ``content`` (a RecordDict) or ``error``."""
    head = conn.recv()
    if head is None:
        return None
    if "records" in head:
        content = RecordDict()
        for name, kind, payload in head.pop("records"):
            if kind == "arrays":
                content[name] = ArrayRecord(
                    {key: Array(dtype, shape, stype, conn.recv_bytes()) for key, dtype, shape, stype in payload}
                )
            else:
                content[name] = pickle.loads(payload)  # noqa: S301 - our own child process
        head["content"] = content
    return head


def serve_sites(conn: Connection, make_handlers: Callable[[], tuple[dict, list[int]]]) -> None:
    """The sites' side: ``make_handlers()`` -> (stage handlers, node ids) of an InProcessGrid;
    answers each pushed message when it is pulled, until told to stop."""
    from ctfed.simulations.runtime.inprocess import InProcessGrid

    handlers, node_ids = make_handlers()
    grid = InProcessGrid(handlers, node_ids)
    pending: dict[str, Message] = {}
    while True:
        request = conn.recv()
        if request[0] == _STOP:
            slowest: dict[str, float] = {}
            for (_, kind), seconds in grid.seconds_by_node_type.items():
                slowest[kind] = max(slowest.get(kind, 0.0), seconds)
            conn.send(slowest)
            return
        if request[0] == _PUSH:
            msg_id = request[1]
            head = receive_content(conn)
            assert head is not None and "content" in head
            pending[msg_id] = Message(head["content"], dst_node_id=head["dst"], message_type=head["type"], group_id=head["group"])
            continue
        message = pending.pop(request[1], None)
        reply = next(iter(grid.send_and_receive([message])), None) if message is not None else None
        del message
        send_message(conn, reply)
        del reply


class PipeGrid:
    """Flower's push/pull Grid interface to ``serve_sites`` in another process."""

    def __init__(self, conn: Connection, node_ids: list[int]) -> None:
        self.conn = conn
        self.node_ids = node_ids
        self._pushed: dict[str, Message] = {}
        self._count = 0

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            self._count += 1
            msg_id = f"pipe-{self._count}"
            self.conn.send((_PUSH, msg_id))
            send_message(self.conn, message)
            # What a reply needs of it (its metadata), not its content: a Flower grid keeps no
            # copy of what it pushed either.
            meta = message.metadata
            self._pushed[msg_id] = Message(RecordDict(), dst_node_id=meta.dst_node_id, message_type=meta.message_type, group_id=meta.group_id)
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = []
        for msg_id in message_ids:
            self.conn.send((_PULL, msg_id))
            head = receive_content(self.conn)
            original = self._pushed.pop(msg_id)
            if head is None:
                continue
            if "error" in head:
                code, reason = head["error"]
                replies.append(Message(Error(code=code, reason=reason), reply_to=original))
            else:
                replies.append(Message(head["content"], reply_to=original))
            del head
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def stop(self) -> dict[str, float]:
        """Ends the sites' process; returns the slowest site's seconds in each stage."""
        self.conn.send((_STOP,))
        return dict(self.conn.recv())
