"""Which site a reply speaks for, and whether the SuperLink has lost it.

A reply's sender is not always its site: for a node whose heartbeats stopped, the SuperLink
answers the message itself (Flower's NODE_UNAVAILABLE error) under its own node id. Both
collection paths (server/collect.py, server/secagg.py) therefore name a reply by the message
it answers.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from flwr.app import Message
from flwr.common.constant import ErrorCode

LOST_REASON = "the SuperLink lost the site's connection (no heartbeat) before it replied"


def destinations(messages: Iterable[Message]) -> dict[str, int]:
    """{message id: the node it was sent to} of messages a grid has pushed (pushing sets the ids)."""
    return {m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages if m.metadata.message_id}


def replying_node(reply: Message, sent_to: Mapping[str, int]) -> int:
    """The node a reply answers for: the one its message went to (``destinations``). For a
    node it has lost, the SuperLink answers itself (NODE_UNAVAILABLE) under its own id, so
    the sender would name no site and the lost one would later look like a timeout."""
    node = sent_to.get(reply.metadata.reply_to_message_id)
    return int(reply.metadata.src_node_id) if node is None else node


def site_lost(reply: Message) -> bool:
    """Whether ``reply`` is the SuperLink saying it lost the site (missed heartbeats)."""
    return reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE

