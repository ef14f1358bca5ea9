"""A site the SuperLink has lost (missed heartbeats) is recorded as dropped, by name.

For such a site the SuperLink answers the coordinator's message itself, with Flower's
NODE_UNAVAILABLE error under the SuperLink's own node id (made here by Flower's own
constructor). Read by its sender, that reply names an unknown "node-1" that failed, and the
real site later looks like a timeout after federation.round_timeout_s (#14 point 10)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from flwr.app import Message, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from ctfed.common.config import ModelConfig, RunConfig, SecAggConfig, TrainConfig
from ctfed.common.exchange import ARRAYS_KEY, CONFIG_KEY, STATUS_AGGREGATED, STATUS_DROPPED, RoundInstructions, SiteReply, state_to_record
from ctfed.client import secagg as site_secagg
from ctfed.server.collect import missing_records, vet_replies
from ctfed.server.replies import destinations
from ctfed.server.secagg import secure_round
from ctfed.simulations.runtime.inprocess import InProcessGrid

NODES = [3, 5, 7, 11, 13]
LOST = 7


def _like() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(6)}


def _train(msg: Message, context) -> Message:  # noqa: ANN001 - a Flower handler
    node = int(msg.metadata.dst_node_id)
    reply = SiteReply(site_id=f"site-{node}", num_examples=4, loss=1.0)
    content = RecordDict({ARRAYS_KEY: state_to_record({"w": torch.full((6,), 0.01 * node)}), **reply.to_records()})
    return Message(content=content, reply_to=msg)


@dataclass
class LosingGrid(InProcessGrid):
    """Flower's push/pull, with ids set on push as Flower's grids set them; a message to a
    ``lost`` node is answered by the SuperLink's own NODE_UNAVAILABLE error."""

    lost: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._pushed: dict[str, Message] = {}

    def push_messages(self, messages):  # noqa: ANN001, ANN201 - Flower's Grid signature
        ids = []
        for message in messages:
            msg_id = f"message-{len(self._pushed) + 1}-{message.metadata.dst_node_id}"
            message.metadata.__dict__["_message_id"] = msg_id
            self._pushed[msg_id] = message
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201 - Flower's Grid signature
        replies = []
        for msg_id in message_ids:
            message = self._pushed.pop(msg_id)
            if int(message.metadata.dst_node_id) in self.lost:
                replies.append(create_message_error_unavailable_res_message(message.metadata, "node_unavail"))
            else:
                replies.extend(super().send_and_receive([message]))
        return replies

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201 - Flower's Grid signature
        return self.pull_messages(self.push_messages(list(messages)))


def _messages(like: dict[str, torch.Tensor]) -> list[Message]:
    instructions = RoundInstructions(server_round=1, model=ModelConfig(), train=TrainConfig()).to_record()
    return [
        Message(RecordDict({ARRAYS_KEY: state_to_record(like), CONFIG_KEY: instructions}), dst_node_id=n, message_type="train")
        for n in NODES
    ]


def test_a_lost_site_is_recorded_as_dropped_by_name_in_a_plain_round() -> None:
    grid = LosingGrid({"train": _train}, list(NODES), lost={LOST})
    like, known = _like(), {n: f"site-{n}" for n in NODES}
    messages = _messages(like)
    replies = list(grid.send_and_receive(messages))
    assert int(replies[NODES.index(LOST)].metadata.src_node_id) not in NODES  # the SuperLink's own id

    accepted, records = vet_replies(replies, like, 1e3, known, sent_to=destinations(messages))
    by_site = {record.site: record for record in records}
    assert set(by_site) == {f"site-{n}" for n in NODES}, "a reply was named after its sender, not its site"
    assert by_site[f"site-{LOST}"].status == STATUS_DROPPED and "lost" in by_site[f"site-{LOST}"].reason
    assert len(accepted) == len(NODES) - 1
    assert missing_records(messages, replies, known) == [], "the lost site was also counted as a timeout"


def test_a_site_lost_during_secure_aggregation_is_dropped_by_name_and_the_rest_aggregate() -> None:
    handlers = site_secagg.stage_handlers(_train)
    grid = LosingGrid(handlers, list(NODES), lost={LOST})
    cfg = RunConfig()
    cfg.secagg = SecAggConfig(num_shares=5, stage_timeout_s=5.0)
    cfg.federation.min_sites = 2
    like = _like()
    result = secure_round(grid, _messages(like), like, cfg, 1, {n: f"site-{n}" for n in NODES})
    by_site = {record.site: record for record in result.sites}
    assert set(by_site) == {f"site-{n}" for n in NODES}
    assert by_site[f"site-{LOST}"].status == STATUS_DROPPED and "lost" in by_site[f"site-{LOST}"].reason
    assert all(by_site[f"site-{n}"].status == STATUS_AGGREGATED for n in NODES if n != LOST)
    assert result.mean_delta is not None
    expected = sum(0.01 * n for n in NODES if n != LOST) / (len(NODES) - 1)
    assert torch.allclose(result.mean_delta["w"], torch.full((6,), expected), atol=1e-4)
