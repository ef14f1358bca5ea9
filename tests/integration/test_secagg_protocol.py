"""Secure aggregation: mask PRG, mask cancellation, quantisation bound, the protocol with
dropouts (real stage handlers, in process), and a real Flower simulation with SecAgg on."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import get_origin

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import generate_key_pairs

from ctfed.client import secagg as site_secagg
from ctfed.common import secagg as sa
from ctfed.common.config import ConfigError, RunConfig, SecAggConfig
from ctfed.common.exchange import ARRAYS_KEY, SERVER_ROUND_KEY, SiteReply, state_to_record
from ctfed.server.secagg import secure_round
from ctfed.simulations.runtime.inprocess import InProcessGrid

from helpers import corrupt_field, train_message  # tests/helpers.py

# --- (i) the mask PRG uses the whole secret -----------------------------------------------------


def _same_flower_fold(secret: bytes) -> bytes:
    """Another secret with the same 32-bit fold: Flower XORs the 4-byte words together,
    so XOR-ing one value into two words leaves the fold unchanged."""
    word = int.from_bytes(os.urandom(4), "little") | 1
    out = bytearray(secret)
    for offset in (0, 4):
        value = int.from_bytes(out[offset : offset + 4], "little") ^ word
        out[offset : offset + 4] = value.to_bytes(4, "little")
    return bytes(out)


def test_colliding_flower_seeds_give_different_chacha_masks() -> None:
    first = os.urandom(32)
    second = _same_flower_fold(first)
    assert first != second
    flower_a = pseudo_rand_gen(first, 2**32, [(1000,)])[0]
    flower_b = pseudo_rand_gen(second, 2**32, [(1000,)])[0]
    np.testing.assert_array_equal(flower_a, flower_b)  # Flower's weakness: 2**32 seeds to try
    ours_a = sa.mask_vector(first, 1000, 64, purpose=sa.PURPOSE_SELF, server_round=1)
    ours_b = sa.mask_vector(second, 1000, 64, purpose=sa.PURPOSE_SELF, server_round=1)
    assert np.count_nonzero(ours_a == ours_b) == 0


def test_masks_are_bound_to_round_and_purpose_and_deterministic() -> None:
    secret = os.urandom(32)
    base = sa.mask_vector(secret, 512, 32, purpose=sa.PURPOSE_SELF, server_round=3)
    np.testing.assert_array_equal(base, sa.mask_vector(secret, 512, 32, purpose=sa.PURPOSE_SELF, server_round=3))
    for other in (
        sa.mask_vector(secret, 512, 32, purpose=sa.PURPOSE_SELF, server_round=4),
        sa.mask_vector(secret, 512, 32, purpose=sa.PURPOSE_PAIRWISE, server_round=3),
    ):
        assert np.count_nonzero(base == other) < 5
    # Chunked expansion is one keystream: a longer mask starts with the shorter one.
    long = sa.mask_vector(secret, 3 * 2**20 + 7, 32, purpose=sa.PURPOSE_SELF, server_round=3)
    np.testing.assert_array_equal(long[:512], base)
    # Roughly uniform: the top bit is set about half the time.
    assert 0.49 < np.mean(long >> 31) < 0.51


# --- (ii) pairwise masks cancel ----------------------------------------------------------------


@pytest.mark.parametrize("bits", [32, 64])
def test_pairwise_masks_cancel(bits: int) -> None:
    sk_a, pk_a = generate_key_pairs()
    sk_b, pk_b = generate_key_pairs()
    secret_ab, secret_ba = generate_shared_key(sk_a, pk_b), generate_shared_key(sk_b, pk_a)
    assert secret_ab == secret_ba
    node_a, node_b = 17, 2**60 + 5
    dtype = sa.uint_dtype(bits)
    a, b = np.zeros(10_000, dtype=dtype), np.zeros(10_000, dtype=dtype)
    sa.apply_mask(a, secret_ab, sign=sa.pairwise_sign(node_a, node_b), purpose=sa.PURPOSE_PAIRWISE, server_round=1)
    sa.apply_mask(b, secret_ba, sign=sa.pairwise_sign(node_b, node_a), purpose=sa.PURPOSE_PAIRWISE, server_round=1)
    assert np.count_nonzero(a) > 9_990  # each half alone looks random
    np.testing.assert_array_equal(a + b, np.zeros(10_000, dtype=dtype))


# --- (iii) quantisation ------------------------------------------------------------------------


def test_secure_mean_within_bound_of_plain_weighted_mean() -> None:
    cfg = SecAggConfig(clipping_range=0.05, quantization_range=2**16, modulus_bits=32, max_weight=64, max_sites=16)
    rng = np.random.default_rng(0)
    deltas = [rng.normal(0, 0.01, 50_000).astype(np.float32) for _ in range(5)]
    weights = [sa.site_weight(n, cfg.max_weight) for n in (3, 10, 64, 200, 1)]
    assert weights == [3, 10, 64, 64, 1]
    total = np.zeros(50_001, dtype=np.uint32)
    for index, (delta, weight) in enumerate(zip(deltas, weights)):
        q = sa.quantize(delta, cfg.clipping_range, cfg.quantization_range)
        encoded = sa.encode_weighted(q.values, weight, cfg.modulus_bits)
        sa.apply_mask(encoded, bytes([index]) * 32, sign=1, purpose=sa.PURPOSE_SELF, server_round=1)
        total += encoded
    for index in range(5):
        sa.apply_mask(total, bytes([index]) * 32, sign=-1, purpose=sa.PURPOSE_SELF, server_round=1)
    mean, total_weight = sa.decode_mean(total, cfg)
    assert total_weight == sum(weights)
    clipped = [np.clip(d, -cfg.clipping_range, cfg.clipping_range).astype(np.float64) for d in deltas]
    plain = sum(w * d for w, d in zip(weights, clipped)) / sum(weights)
    error = np.abs(mean.astype(np.float64) - plain)
    bound = sa.aggregation_error_bound(cfg) + sa.float32_rounding(plain)
    assert (error <= bound).all(), float(error.max())
    assert error.max() > 0.05 * sa.aggregation_error_bound(cfg)  # the bound is not vacuous
    assert abs(float(np.mean(mean - plain))) < 0.01 * sa.aggregation_error_bound(cfg)  # unbiased rounding


def test_clipping_is_counted() -> None:
    values = np.array([0.0, 0.5, -2.0, 3.0, 1.0, -1.0], dtype=np.float32)
    q = sa.quantize(values, 1.0, 2**10)
    assert q.clipped == 2
    assert q.values.max() == 2**9 and q.values.min() == -(2**9)


def test_config_rejects_a_sum_that_could_wrap_and_a_weak_threshold() -> None:
    with pytest.raises(ConfigError, match="does not fit"):
        SecAggConfig(modulus_bits=32, quantization_range=2**22, max_weight=1000, max_sites=16)
    SecAggConfig(modulus_bits=32, quantization_range=2**16, max_weight=1000, max_sites=16)
    with pytest.raises(ConfigError, match="more than half"):
        SecAggConfig(num_shares=6, reconstruction_threshold=3)
    # The default threshold is above 2/3 of each round's neighbourhood, never a bare majority.
    assert SecAggConfig().reconstruction_threshold == 0
    assert [sa.round_threshold(0, n) for n in (2, 3, 4, 5, 6, 7)] == [2, 3, 3, 4, 5, 5]
    assert all(3 * sa.round_threshold(0, n) > 2 * n for n in range(2, 40))
    with pytest.raises(ConfigError, match="32 or 64"):
        SecAggConfig(modulus_bits=16)


# --- (iv) the protocol in process, with dropouts ------------------------------------------------


def _global_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"blocks.0.weight": torch.randn(64, 48), "blocks.0.bias": torch.randn(48), "cls_token": torch.randn(1, 1, 48)}


def _site_delta(node_id: int, like: dict[str, torch.Tensor], scale: float = 0.01) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(node_id)
    return {name: torch.randn(t.shape, generator=gen) * scale for name, t in like.items()}


def _fake_local_train(deltas: dict[int, dict[str, torch.Tensor]], examples: dict[int, int]):
    """Stands in for the ClientApp's train handler: replies a fixed delta and metrics."""

    def train(msg: Message, context: Context) -> Message:
        node = msg.metadata.dst_node_id
        reply = SiteReply(f"site-{node}", num_examples=examples[node], loss=1.0, loss_first=2.0, losses=(2.0, 1.0),
                          train_seconds=0.1, data_seconds=0.01)
        content = RecordDict({ARRAYS_KEY: state_to_record(deltas[node]), **reply.to_records()})
        return Message(content=content, reply_to=msg)

    return train


def _run(node_ids, drop_at=None, secagg=None, deltas=None, examples=None, capture=None, wrap=None):
    like = _global_state()
    deltas = deltas or {n: _site_delta(n, like) for n in node_ids}
    examples = examples or {n: 2 + i for i, n in enumerate(node_ids)}
    cfg = RunConfig()
    cfg.secagg = secagg or SecAggConfig(num_shares=5)
    cfg.federation.min_sites = 2
    handlers = site_secagg.stage_handlers(_fake_local_train(deltas, examples))
    if capture is not None:
        masked_type = sa.message_type(sa.STAGE_MASKED_INPUT)
        inner = handlers[masked_type]

        def spy(msg: Message, context: Context) -> Message:
            reply = inner(msg, context)
            capture[msg.metadata.dst_node_id] = reply.content[sa.MASKED_KEY][sa.MASKED_ARRAY].numpy().copy()
            return reply

        handlers[masked_type] = spy
    if wrap is not None:
        wrap(handlers)
    grid = InProcessGrid(handlers, list(node_ids), drop_at=drop_at or {})  # before Message(): sets identity
    messages = [
        train_message(ConfigRecord({SERVER_ROUND_KEY: 1}), like, node_id=n) for n in node_ids
    ]
    result = secure_round(grid, messages, like, cfg, server_round=1)
    return result, deltas, examples, cfg, grid


def _plain_mean(nodes, deltas, examples, cfg: RunConfig) -> dict[str, np.ndarray]:
    weights = {n: sa.site_weight(examples[n], cfg.secagg.max_weight) for n in nodes}
    total = sum(weights.values())
    return {
        name: sum(weights[n] * deltas[n][name].double().numpy() for n in nodes) / total for name in deltas[nodes[0]]
    }


def _assert_close_to_plain(result, nodes, deltas, examples, cfg) -> None:
    assert result.mean_delta is not None, result.reason
    plain = _plain_mean(nodes, deltas, examples, cfg)
    bound = sa.aggregation_error_bound(cfg.secagg)
    for name, expected in plain.items():
        error = np.abs(result.mean_delta[name].double().numpy() - expected)
        assert (error <= bound + sa.float32_rounding(expected)).all(), (name, error.max(), bound)


NODES = [101, 7, 2**40 + 3, 55]


def test_protocol_without_dropouts_matches_plain_mean() -> None:
    captured: dict[int, np.ndarray] = {}
    result, deltas, examples, cfg, grid = _run(NODES, capture=captured)
    _assert_close_to_plain(result, NODES, deltas, examples, cfg)
    assert result.total_weight == sum(examples.values())
    assert {s.status for s in result.sites} == {"aggregated"}
    for record in result.sites:
        assert record.bytes_sent > 0 and record.bytes_received > 0 and record.num_examples > 0
    # What the coordinator received from a site looks nothing like its quantised update.
    for node, masked in captured.items():
        delta = sa.flatten_state(deltas[node])
        plain = sa.encode_weighted(sa.quantize(delta, cfg.secagg.clipping_range, cfg.secagg.quantization_range).values,
                                   examples[node], cfg.secagg.modulus_bits)
        assert np.count_nonzero(masked == plain) <= 2
        signed = masked.view(np.int64).astype(np.float64)
        assert np.abs(signed).mean() > 1e3 * np.abs(plain.view(np.int64).astype(np.float64)).mean()
    # Site state is cleared after the round: no delta, keys or seeds linger.
    for context in grid.contexts.values():
        assert sa.STATE_KEY not in context.state and sa.DELTA_STATE_KEY not in context.state


def test_protocol_with_dropout_after_key_sharing_and_after_masked_input() -> None:
    # 7 sites, all neighbours (threshold 5 > 2*7/3): two may drop out.
    nodes = [11, 22, 33, 44, 55, 66, 77]
    after_keys, after_masked = 22, 44
    drop_at = {after_keys: sa.message_type(sa.STAGE_MASKED_INPUT), after_masked: sa.message_type(sa.STAGE_UNMASK)}
    result, deltas, examples, cfg, _ = _run(nodes, drop_at=drop_at, secagg=SecAggConfig(num_shares=7))
    included = [n for n in nodes if n != after_keys]  # the site dropped at unmask had sent its input
    _assert_close_to_plain(result, included, deltas, examples, cfg)
    status = {s.site: s.status for s in result.sites}
    assert status == {f"site-{n}": "dropped" if n == after_keys else "aggregated" for n in nodes}
    assert "unmask" in {s.site: s.reason for s in result.sites}["site-44"]


def test_protocol_with_dropouts_at_training_and_share_keys_and_a_failing_site() -> None:
    nodes = [1, 2, 3, 4, 5, 6, 7]
    like = _global_state()
    deltas = {n: _site_delta(n, like) for n in nodes}
    deltas[7] = {name: t.clone().fill_(float("nan")) for name, t in deltas[7].items()}  # refused locally
    drop_at = {1: "train.secagg_train", 2: sa.message_type(sa.STAGE_SHARE_KEYS)}
    result, deltas, examples, cfg, _ = _run(nodes, drop_at=drop_at, deltas=deltas, secagg=SecAggConfig(num_shares=5))
    _assert_close_to_plain(result, [3, 4, 5, 6], deltas, examples, cfg)
    status = {s.site: (s.status, s.reason) for s in result.sites}
    # A site that fails or stays silent in stage (a) never told us its site id.
    assert status["node-7"][0] == "failed" and "NaN" in status["node-7"][1]
    assert status["node-1"][0] == "dropped" and status["site-2"][0] == "dropped"


def test_too_many_dropouts_leave_the_round_unaggregated_without_crashing() -> None:
    nodes = [1, 2, 3, 4]
    drop_at = {n: sa.message_type(sa.STAGE_UNMASK) for n in (2, 3)}
    result, *_ = _run(nodes, drop_at=drop_at, secagg=SecAggConfig(num_shares=5))
    assert result.mean_delta is None
    assert "live neighbours" in result.reason or "shares" in result.reason
    assert {s.status for s in result.sites} <= {"not-aggregated", "dropped"}


def test_clipped_values_are_warned_about_and_recorded(caplog: pytest.LogCaptureFixture) -> None:
    like = _global_state()
    deltas = {n: _site_delta(n, like) for n in NODES}
    deltas[7]["blocks.0.bias"][:5] = 10.0  # far outside clipping_range
    with caplog.at_level(logging.WARNING, logger="ctfed.client.secagg"):
        result, *_ = _run(NODES, deltas=deltas)
    assert result.mean_delta is not None
    assert {s.site: s.clipped_values for s in result.sites}["site-7"] == 5
    assert any("5 of" in r.getMessage() and "clipped" in r.getMessage() for r in caplog.records)


HOSTILE = 7


def _hostile_reply(stage: str, field: str, how: str):
    """Wraps ``stage``'s handler so that node HOSTILE's reply lacks ``field`` or has it retyped."""

    def wrap(handlers: dict) -> None:
        inner = handlers[sa.message_type(stage)]

        def handler(msg: Message, context: Context) -> Message:
            reply = inner(msg, context)
            if msg.metadata.dst_node_id != HOSTILE:
                return reply
            payload = dict(reply.content[sa.PROTOCOL_KEY].items())
            corrupt_field(payload, field, sa.REPLY_FIELDS[stage][field], how)
            return Message(RecordDict({**dict(reply.content.items()), sa.PROTOCOL_KEY: ConfigRecord(payload)}), reply_to=msg)

        handlers[sa.message_type(stage)] = handler

    return wrap


_HOSTILE_CASES = [
    (stage, field, how) for stage, fields in sa.REPLY_FIELDS.items() for field in fields for how in ("missing", "retyped")
]


@pytest.mark.parametrize(("stage", "field", "how"), _HOSTILE_CASES, ids=[f"{s}-{f}-{h}" for s, f, h in _HOSTILE_CASES])
def test_a_site_with_a_malformed_reply_leaves_the_round_and_the_others_aggregate(stage: str, field: str, how: str) -> None:
    """A hostile (or broken) site answers one stage with a field left out or of another
    type: the coordinator names the field in that site's record and aggregates the others,
    with the site's input in the sum once it was summed (stages d and e)."""
    result, deltas, examples, cfg, _ = _run(NODES, wrap=_hostile_reply(stage, field, how))
    summed = stage in (sa.STAGE_CONSISTENCY, sa.STAGE_UNMASK)
    _assert_close_to_plain(result, NODES if summed else [n for n in NODES if n != HOSTILE], deltas, examples, cfg)
    record = {s.site: s for s in result.sites}[f"site-{HOSTILE}"]
    assert record.status == ("aggregated" if summed else "failed")
    assert f"{stage}: the site's reply" in record.reason and f"'{field}'" in record.reason
    assert {s.status for s in result.sites if s.site != f"site-{HOSTILE}"} == {"aggregated"}


def _empty_payload(stage: str) -> dict:
    """A well-formed payload of ``stage`` for round 1: every field, lists empty, numbers 1."""
    values = {int: 1, float: 1.0, str: "", bytes: b"", bool: False}
    return {name: [] if get_origin(kind) is list else values[kind] for name, kind in sa.REQUEST_FIELDS[stage].items()}


def test_a_site_never_reveals_both_secrets_of_one_neighbour() -> None:
    nodes = [1, 2, 3]
    result, _, _, _, grid = _run(nodes, secagg=SecAggConfig(num_shares=3), drop_at={n: sa.message_type(sa.STAGE_UNMASK) for n in nodes})
    assert result.mean_delta is None  # nobody answered the unmask stage
    context = grid.contexts[1]
    # Survivor and dropped lists are the coordinator's word: the site ignores them and
    # reveals only what the survivor set it signed implies, once enough neighbours signed it.
    request = Message(
        RecordDict({sa.PROTOCOL_KEY: ConfigRecord(
            {sa.P_ROUND: 1, sa.K_SURVIVORS: [1, 2], sa.K_DROPPED: [2], sa.K_SIGNERS: [], sa.K_SIGNATURES: []}
        )}),
        dst_node_id=1, message_type=sa.message_type(sa.STAGE_UNMASK),
    )
    with pytest.raises(site_secagg.ProtocolViolation, match="consistency check failed: 0 valid"):
        site_secagg.handle_unmask(request, context)
    with pytest.raises(site_secagg.ProtocolViolation, match="out of order"):
        site_secagg.handle_share_keys(
            Message(RecordDict({sa.PROTOCOL_KEY: ConfigRecord(_empty_payload(sa.STAGE_SHARE_KEYS))}), dst_node_id=1,
                    message_type=sa.message_type(sa.STAGE_SHARE_KEYS)),
            context,
        )


# --- (v) a real Flower simulation with secure aggregation on ----------------------------------


@pytest.mark.slow
def test_simulation_with_secure_aggregation(tmp_path: Path) -> None:
    from ctfed.common.checkpoint import load_checkpoint
    from ctfed.common.cli import main

    code = main(
        ["simulate", f"output_dir={tmp_path}", "run_name=secagg", "federation.rounds=2", "train.local_steps=2",
         "synth.sites=3", "synth.scans_per_site=2", "secagg.enabled=true"]
    )
    assert code == 0
    run = tmp_path / "secagg"
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["secure_aggregation"] is True
    for record in results["rounds"]:
        assert record["aggregated"] is True and record["secure_aggregation"] is True, record["reason"]
        assert len(record["sites"]) == 3
        for site in record["sites"]:
            assert site["status"] == "aggregated", site
            assert site["num_examples"] > 0 and len(site["losses"]) == 2
            # The masked upload is at least the encoder's values in 64-bit integers.
            assert site["bytes_received"] > record["bytes_sent_per_site"]
            assert site["bytes_sent"] > record["bytes_sent_per_site"]
    initial, _, _ = load_checkpoint(run / "checkpoints" / "global_round_0000.safetensors")
    final, _, _ = load_checkpoint(run / "checkpoints" / "global_round_0002.safetensors")
    assert any(not torch.equal(initial[name], final[name]) for name in initial)
    assert "securely aggregated 3 sites" in (run / "federation.log").read_text()
    from ctfed.server.rounds import PARKED_GLOBAL

    assert not (run / PARKED_GLOBAL).exists()  # parked for each round, removed after it
