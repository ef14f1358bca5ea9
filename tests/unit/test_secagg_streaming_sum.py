"""The coordinator streams SecAgg+ masked inputs: each one is added into the running sum and
dropped before the next is received, so it holds O(1) full vectors whatever the site count
(issue #13's memory goal). Structural checks (which replies are still alive when the next
site answers), not timing or RSS."""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, Context, Message, RecordDict

from ctfed.client import secagg as site_secagg
from ctfed.common import secagg as sa
from ctfed.common.config import RunConfig, SecAggConfig
from ctfed.common.config import ModelConfig, TrainConfig
from ctfed.common.exchange import ARRAYS_KEY, CONFIG_KEY, RoundInstructions, SiteReply, state_to_record
from ctfed.server.rounds import PARKED_GLOBAL, park_global_state, unpark_global_state
from ctfed.server.secagg import secure_round
from ctfed.simulations.runtime.inprocess import InProcessGrid

NODES = [3, 5, 7, 11, 13]
MASKED = sa.message_type(sa.STAGE_MASKED_INPUT)


def _like() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"blocks.0.weight": torch.randn(40, 30, generator=gen), "cls_token": torch.randn(1, 1, 30, generator=gen)}


def _train(deltas: dict[int, dict[str, torch.Tensor]]):
    def train(msg: Message, context: Context) -> Message:
        node = int(msg.metadata.dst_node_id)
        reply = SiteReply(site_id=f"site-{node}", num_examples=node, loss=1.0)
        content = RecordDict({ARRAYS_KEY: state_to_record(deltas[node]), **reply.to_records()})
        return Message(content=content, reply_to=msg)

    return train


@dataclass
class _AliveCounter:
    """Spies on the sites' masked-input handler: when a site makes its reply, how many
    earlier sites' masked vectors does the coordinator still hold?"""

    alive: list[weakref.ref] = field(default_factory=list)
    held_when_next_made: list[int] = field(default_factory=list)

    def wrap(self, inner):  # noqa: ANN001, ANN202 - a stage handler
        def spy(msg: Message, context: Context) -> Message:
            gc.collect()  # only references count, not garbage awaiting a cycle collection
            self.held_when_next_made.append(sum(ref() is not None for ref in self.alive))
            reply = inner(msg, context)
            self.alive.append(weakref.ref(reply.content[sa.MASKED_KEY][sa.MASKED_ARRAY]))
            return reply

        return spy


@dataclass
class PushPullGrid(InProcessGrid):
    """A grid with Flower's push/pull interface (every real Flower Grid has it): a pushed
    message is answered when it is pulled; ``silent`` nodes never answer."""

    silent: set[int] = field(default_factory=set)
    pulls: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._pushed: dict[str, Message] = {}
        self._count = 0

    def push_messages(self, messages):  # noqa: ANN001, ANN201 - Flower's Grid signature
        ids = []
        for message in messages:
            self._count += 1
            msg_id = f"message-{self._count}"
            self._pushed[msg_id] = message
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201 - Flower's Grid signature
        ids = list(message_ids)
        self.pulls.append(ids)
        replies = []
        for msg_id in ids:
            message = self._pushed.get(msg_id)
            if message is None or int(message.metadata.dst_node_id) in self.silent:
                continue
            del self._pushed[msg_id]
            replies.extend(self.send_and_receive([message]))
        return replies


def _round(grid_type=InProcessGrid, secagg: SecAggConfig | None = None, **grid_kwargs):  # noqa: ANN001, ANN202
    like = _like()
    deltas = {n: {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(n)) * 0.01 for k, v in like.items()} for n in NODES}
    counter = _AliveCounter()
    handlers = site_secagg.stage_handlers(_train(deltas))
    handlers[MASKED] = counter.wrap(handlers[MASKED])
    grid = grid_type(handlers, list(NODES), **grid_kwargs)
    cfg = RunConfig()
    cfg.secagg = secagg or SecAggConfig(num_shares=5)
    cfg.federation.min_sites = 2
    instructions = RoundInstructions(server_round=1, model=ModelConfig(), train=TrainConfig()).to_record()
    messages = [
        Message(RecordDict({ARRAYS_KEY: state_to_record(like), CONFIG_KEY: instructions}), dst_node_id=n, message_type="train")
        for n in NODES
    ]
    result = secure_round(grid, messages, like, cfg, server_round=1)
    return result, deltas, counter, grid, cfg


def _weighted_mean(deltas, nodes, name: str) -> np.ndarray:  # noqa: ANN001
    return sum(n * deltas[n][name].double().numpy() for n in nodes) / sum(nodes)


def test_coordinator_holds_one_masked_vector_at_a_time() -> None:
    result, deltas, counter, _, cfg = _round()
    assert result.mean_delta is not None, result.reason
    # Every site made its masked vector while the coordinator held none of the earlier ones
    # (they are in the running sum); keeping the replies would give 0, 1, 2, 3, 4.
    assert counter.held_when_next_made == [0] * len(NODES)
    bound = sa.aggregation_error_bound(cfg.secagg) + 1e-7
    for name in deltas[NODES[0]]:
        assert np.abs(result.mean_delta[name].double().numpy() - _weighted_mean(deltas, NODES, name)).max() <= bound


def test_flower_grids_are_pulled_one_reply_at_a_time_and_silent_sites_time_out() -> None:
    silent = NODES[-1]
    result, deltas, counter, grid, cfg = _round(
        PushPullGrid, secagg=SecAggConfig(num_shares=5, stage_timeout_s=0.3)
    )
    assert result.mean_delta is not None and all(len(ids) == 1 for ids in grid.pulls)
    assert counter.held_when_next_made == [0] * len(NODES)

    # A site silent after training: push/pull waits stage_timeout_s for it, then drops it.
    class Silent(PushPullGrid):
        def push_messages(self, messages):  # noqa: ANN001, ANN201
            messages = list(messages)
            if any(m.metadata.message_type == sa.message_type(sa.STAGE_SHARE_KEYS) for m in messages):
                self.silent.add(silent)
            return super().push_messages(messages)

    result, deltas, _, grid, cfg = _round(Silent, secagg=SecAggConfig(num_shares=5, stage_timeout_s=0.3))
    statuses = {record.site: record.status for record in result.sites}
    assert statuses[f"site-{silent}"] == "dropped", statuses
    assert result.mean_delta is not None, result.reason
    kept = [n for n in NODES if n != silent]
    for name in deltas[NODES[0]]:
        error = np.abs(result.mean_delta[name].double().numpy() - _weighted_mean(deltas, kept, name)).max()
        assert error <= sa.aggregation_error_bound(cfg.secagg) + 1e-7


def test_array_view_reads_in_place_and_rejects_what_it_cannot_read() -> None:
    values = np.arange(10, dtype=np.uint64) * (2**61)
    array = Array(values)
    view = sa.array_view(array)
    np.testing.assert_array_equal(view, values)
    assert not view.flags.owndata and not view.flags.writeable  # a view of the received bytes
    truncated = Array(array.dtype, array.shape, array.stype, array.data[:-8])
    with pytest.raises(ValueError, match="header says"):
        sa.array_view(truncated)
    with pytest.raises(ValueError, match="C-order"):
        sa.array_view(Array(np.asfortranarray(np.ones((3, 4)))))


def test_chunked_decode_and_norm_match_the_whole_vector(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SecAggConfig(clipping_range=0.5, quantization_range=2**20, modulus_bits=64)
    rng = np.random.default_rng(1)
    signed = rng.integers(-(2**30), 2**30, size=1001, dtype=np.int64)
    signed[-1] = 7  # the total weight
    monkeypatch.setattr(sa, "_CHUNK_VALUES", 64)  # many chunks and a ragged last one
    mean, weight = sa.decode_mean(signed.view(np.uint64), cfg)
    expected = signed[:-1].astype(np.float64) * sa.quantization_step(0.5, 2**20) / 7
    assert weight == 7 and mean.dtype == np.float32
    np.testing.assert_allclose(mean, expected, rtol=1e-6)
    assert sa.vector_norm(mean) == pytest.approx(float(np.linalg.norm(mean.astype(np.float64))), rel=1e-12)
    like = {"a": torch.zeros(10, 50), "b": torch.zeros(500)}
    views = sa.unflatten_state(mean, like, copy=False)
    assert views["a"].data_ptr() == mean.ctypes.data  # no second copy of the state
    np.testing.assert_array_equal(views["b"].numpy(), mean[500:])



def test_the_round_frees_the_serialised_global_encoder_once_pushed_and_runs_on_a_parked_one(tmp_path: Path) -> None:
    """run_pretraining hands the round its train messages and parks the global encoder on disk
    (server/rounds.py): by the masked-input stage no copy of the serialised encoder is alive,
    and the round aggregates against the parked (file-mapped) state."""
    like = _like()
    deltas = {n: {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(n)) * 0.01 for k, v in like.items()} for n in NODES}
    record = state_to_record(like)
    serialised = weakref.ref(record["blocks.0.weight"])
    alive_when_masking: list[bool] = []
    handlers = site_secagg.stage_handlers(_train(deltas))
    inner = handlers[MASKED]

    def spy(msg: Message, context: Context) -> Message:
        gc.collect()
        alive_when_masking.append(serialised() is not None)
        return inner(msg, context)

    handlers[MASKED] = spy
    cfg = RunConfig()
    cfg.secagg = SecAggConfig(num_shares=5)
    cfg.federation.min_sites = 2
    instructions = RoundInstructions(server_round=1, model=ModelConfig(), train=TrainConfig()).to_record()
    messages = [Message(RecordDict({ARRAYS_KEY: record, CONFIG_KEY: instructions}), dst_node_id=n, message_type="train") for n in NODES]
    del record  # as run_pretraining drops its arrays
    parked = park_global_state(tmp_path, like)
    assert (tmp_path / PARKED_GLOBAL).is_file() and all(torch.equal(parked[k], like[k]) for k in like)
    result = secure_round(PushPullGrid(handlers, list(NODES)), messages, parked, cfg, server_round=1)
    assert result.mean_delta is not None, result.reason
    assert messages == []  # the round owned them
    assert alive_when_masking == [False] * len(NODES)
    bound = sa.aggregation_error_bound(cfg.secagg) + 1e-7
    for name in like:
        assert np.abs(result.mean_delta[name].double().numpy() - _weighted_mean(deltas, NODES, name)).max() <= bound
    # Not aggregated: the parked tensors come back as copies in memory, and the file goes.
    back = unpark_global_state(tmp_path, dict(parked), parked)
    assert not (tmp_path / PARKED_GLOBAL).exists()
    assert all(torch.equal(back[k], like[k]) and back[k] is not parked[k] for k in like)
