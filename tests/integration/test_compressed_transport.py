"""Compressed transport: float16/bfloat16 plain-path updates and the 32-bit SecAgg+ modulus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from ctfed.client.audit import AUDIT_FILE, verify_audit_log
from ctfed.common.config import ConfigError, SecAggConfig, Transport
from ctfed.simulations.config import load_simulation_config
from ctfed.common.exchange import (
    ARRAYS_KEY,
    CONFIG_KEY,
    NUM_EXAMPLES_KEY,
    SERVER_ROUND_KEY,
    STATUS_AGGREGATED,
    STATUS_REJECTED,
    RoundInstructions,
    SiteReply,
    encode_update,
    state_to_record,
)
from ctfed.common.preprocess import FORMAT, MANIFEST
from ctfed.server.collect import build_strategy, collect_round, round_instructions, vet_replies
from ctfed.simulations.runtime.inprocess import InProcessGrid
from ctfed.simulations.bench.transport_bench import run_inprocess, secagg_32bit_overrides

NODES = [1, 2, 3]
EXAMPLES = {1: 3, 2: 5, 3: 8}
# Relative rounding of one value cast to the format (half an ulp of its mantissa).
UNIT_ROUNDOFF = {Transport.float32: 0.0, Transport.float16: 2.0**-11, Transport.bfloat16: 2.0**-8}


def _like() -> dict[str, torch.Tensor]:
    return {"blocks.0.weight": torch.zeros(48, 96), "blocks.0.bias": torch.zeros(96)}


def _deltas() -> dict[int, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return {
        node: {name: torch.randn(t.shape, generator=generator) * 10.0 ** -node for name, t in _like().items()}
        for node in NODES
    }


def _site(deltas: dict[int, dict[str, torch.Tensor]], send_as: dict[int, object] | None = None):
    """A site stub that replies its delta encoded in the round's transport (or ``send_as[node]``)."""

    def train(msg: Message, context: object) -> Message:
        node = msg.metadata.dst_node_id
        wanted = (send_as or {}).get(node) or RoundInstructions.from_record(msg.content[CONFIG_KEY]).transport
        update = wanted(deltas[node]) if callable(wanted) else encode_update(deltas[node], wanted)
        reply = SiteReply(f"site-{node}", num_examples=EXAMPLES[node], loss=1.0, loss_first=1.0, losses=(1.0,))
        content = RecordDict({ARRAYS_KEY: update, **reply.to_records()})
        return Message(content=content, reply_to=msg)

    return train


def _plain_round(transport: Transport, send_as: dict[int, object] | None = None):
    cfg = load_simulation_config(["secagg.enabled=false", f"federation.transport={transport.value}"])
    grid = InProcessGrid({"train": _site(_deltas(), send_as)}, NODES)
    strategy = build_strategy(cfg)
    instructions = round_instructions(cfg, 1).to_record()
    messages = list(strategy.configure_train(1, state_to_record(_like()), instructions, grid))
    return collect_round(grid, messages, _like(), cfg, strategy, 1, {}, None)


@pytest.mark.parametrize("transport", [Transport.float16, Transport.bfloat16])
def test_compressed_aggregate_equals_fp32_within_the_formats_rounding(transport: Transport) -> None:
    reference = _plain_round(Transport.float32)
    compressed = _plain_round(transport)
    assert reference.mean_delta is not None and compressed.mean_delta is not None
    deltas, total = _deltas(), sum(EXAMPLES.values())
    for name, exact in reference.mean_delta.items():
        got = compressed.mean_delta[name]
        assert got.dtype == torch.float32  # upcast before aggregation
        # Each site's values move by at most one unit roundoff of themselves (float16's
        # subnormals: 2**-25 absolute); the weighted mean moves by the weighted mean of that.
        magnitude = sum(deltas[n][name].abs() * EXAMPLES[n] for n in NODES) / total
        bound = magnitude * UNIT_ROUNDOFF[transport] + 2.0**-25 + exact.abs() * 2.0**-23
        assert bool(((got - exact).abs() <= bound).all()), name
        assert not torch.equal(got, exact)  # the cast really happened


def test_compressed_updates_are_half_the_bytes_on_the_wire() -> None:
    sizes = {}
    for transport in Transport:
        outcome = _plain_round(transport)
        assert {s.status for s in outcome.sites} == {STATUS_AGGREGATED}
        sizes[transport] = {s.site: s.bytes_received for s in outcome.sites}
    values = sum(t.numel() for t in _like().values())
    for site, fp32 in sizes[Transport.float32].items():
        assert fp32 >= 4 * values
        for transport in (Transport.float16, Transport.bfloat16):
            assert 2 * values <= sizes[transport][site] < 0.55 * fp32


def test_sites_reporting_different_metrics_still_aggregate() -> None:
    """Flower's FedAvg refuses MetricRecords with different keys; sites legitimately differ
    (one sends a representation monitor, another cannot split its labels). The coordinator
    hands the strategy only the weights, and keeps every site's metrics in its record."""
    deltas = _deltas()

    def train(msg: Message, context: object) -> Message:
        node = msg.metadata.dst_node_id
        reply = SiteReply(
            f"site-{node}", num_examples=0 if node == 3 else EXAMPLES[node],  # 0: nothing to weigh by: rejected, not a crash
            loss=1.0, loss_first=1.0, losses=(1.0,), aggregates={"monitor-knn-accuracy": 0.75} if node == 1 else {},
        )
        content = RecordDict({ARRAYS_KEY: encode_update(deltas[node], Transport.float32), **reply.to_records()})
        return Message(content=content, reply_to=msg)

    cfg = load_simulation_config(["secagg.enabled=false"])
    grid = InProcessGrid({"train": train}, NODES)
    strategy = build_strategy(cfg)
    messages = list(strategy.configure_train(1, state_to_record(_like()), ConfigRecord({SERVER_ROUND_KEY: 1}), grid))
    outcome = collect_round(grid, messages, _like(), cfg, strategy, 1, {}, None)
    by_site = {s.site: s for s in outcome.sites}
    assert by_site["site-3"].status == STATUS_REJECTED and NUM_EXAMPLES_KEY in by_site["site-3"].reason
    assert outcome.mean_delta is not None
    total = EXAMPLES[1] + EXAMPLES[2]
    for name, got in outcome.mean_delta.items():
        expected = (deltas[1][name] * EXAMPLES[1] + deltas[2][name] * EXAMPLES[2]) / total
        torch.testing.assert_close(got, expected)


def test_a_site_sending_another_format_or_shape_is_rejected_with_a_reason() -> None:
    def wrong_shape(delta: dict[str, torch.Tensor]):
        return encode_update({**delta, "blocks.0.bias": torch.zeros(95)}, Transport.float16)

    outcome = _plain_round(Transport.float16, send_as={1: Transport.float32, 2: wrong_shape})
    by_site = {s.site: s for s in outcome.sites}
    assert by_site["site-1"].status == STATUS_REJECTED
    assert "arrived as float32; federation.transport=float16 sends float16" in by_site["site-1"].reason
    assert by_site["site-2"].status == STATUS_REJECTED and "shape (95,)" in by_site["site-2"].reason
    assert by_site["site-3"].status == STATUS_AGGREGATED
    # A bfloat16 round's wire format is int16 bit patterns: float16 is not accepted for it.
    reply = _reply_with(encode_update(_deltas()[3], Transport.float16))
    accepted, records = vet_replies([reply], _like(), 1e3, transport=Transport.bfloat16)
    assert not accepted and "arrived as float16" in records[0].reason


def _reply_with(update) -> Message:
    """A site's reply carrying ``update`` (through the in-process Grid, as a real reply)."""
    content = RecordDict({ARRAYS_KEY: update, **SiteReply("site-3", num_examples=1).to_records()})
    grid = InProcessGrid({"train": lambda msg, ctx: Message(content=content, reply_to=msg)}, [3])
    return list(grid.send_and_receive([Message(RecordDict(), dst_node_id=3, message_type="train")]))[0]


def test_transport_and_secagg_32bit_config_rules() -> None:
    with pytest.raises(ConfigError, match="secagg.modulus_bits=32"):
        load_simulation_config(["federation.transport=float16"])  # secure aggregation is on by default
    assert load_simulation_config(["secagg.enabled=false", "federation.transport=bfloat16"]).federation.transport is Transport.bfloat16
    # The defaults (64 sites x weight 4096) leave a 32-bit sum room for 2**13 steps only.
    with pytest.raises(ConfigError, match="largest quantization_range that fits is 8192"):
        SecAggConfig(modulus_bits=32)
    fits = SecAggConfig(modulus_bits=32, quantization_range=2).largest_quantization_range()
    SecAggConfig(modulus_bits=32, quantization_range=fits)
    with pytest.raises(ConfigError):
        SecAggConfig(modulus_bits=32, quantization_range=2 * fits)
    cfg = load_simulation_config(secagg_32bit_overrides(sites=8, max_weight=64))
    assert cfg.secagg.modulus_bits == 32 and cfg.secagg.quantization_range == 2**22
    # The bound holds for max_sites; a simulation with more sites is refused up front.
    with pytest.raises(ConfigError, match="9 simulated sites exceed secagg.max_sites=8"):
        load_simulation_config([*secagg_32bit_overrides(sites=8, max_weight=64), "synth.sites=9"])


def _tiny_caches(root: Path, sites: int = 2, scans: int = 2) -> Path:
    generator = np.random.default_rng(0)
    for site in range(sites):
        folder = root / f"site_{site}"
        folder.mkdir(parents=True)
        series = []
        for index in range(scans):
            np.save(folder / f"v{index}.npy", generator.random((3, 32, 32, 32), dtype=np.float32).astype(np.float16))
            series.append({"key": f"k{site}{index}", "file": f"v{index}.npy", "label": None})
        (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "preprocessing": {}, "series": series}))
    return root


@pytest.mark.slow
def test_real_sites_send_bfloat16_and_audit_what_they_sent(tmp_path: Path) -> None:
    """The real ClientApp and round loop (in process): half the bytes, recorded in the audit log."""
    data = _tiny_caches(tmp_path / "caches")
    overrides = ["secagg.enabled=false", "federation.rounds=1", "train.local_steps=1", "federation.min_sites=2"]
    sent = {}
    for transport in ("float32", "bfloat16"):
        results = run_inprocess(load_simulation_config([*overrides, f"federation.transport={transport}"]), data, tmp_path / transport)
        sites = results["rounds"][0]["sites"]
        assert results["rounds"][0]["aggregated"] and {s["status"] for s in sites} == {STATUS_AGGREGATED}
        sent[transport] = sites[0]["bytes_received"]
    assert 0.45 < sent["bfloat16"] / sent["float32"] < 0.55
    audit = tmp_path / "bfloat16" / "sites" / "site_0" / AUDIT_FILE
    assert verify_audit_log(audit) == 1
    entry = json.loads(audit.read_text().splitlines()[0])
    assert entry["transport"] == "bfloat16" and entry["bytes"] == sent["bfloat16"]
    assert {p["dtype"] for p in entry["parameters"]} == {"bfloat16"}
    # The norms are those of the values sent (not of their int16 bit patterns): the same
    # training in float32 gives the same norms up to bfloat16's rounding.
    fp32_entry = json.loads((tmp_path / "float32" / "sites" / "site_0" / AUDIT_FILE).read_text().splitlines()[0])
    assert "transport" in fp32_entry and {p["dtype"] for p in fp32_entry["parameters"]} == {"float32"}
    fp32_norms = {p["name"]: p["l2_norm"] for p in fp32_entry["parameters"]}
    assert sum(fp32_norms.values()) > 0
    for parameter in entry["parameters"]:
        assert abs(parameter["l2_norm"] - fp32_norms[parameter["name"]]) <= 2.0**-8 * fp32_norms[parameter["name"]] + 1e-12


def test_injected_faults_corrupt_the_values_of_a_compressed_update() -> None:
    from ctfed.simulations.config import FaultKind
    from ctfed.simulations.runtime.faults import _corrupt_update

    for kind, reason in ((FaultKind.huge_update, "exceeds federation.max_update_norm"), (FaultKind.nan_update, "NaN")):
        reply = _reply_with(encode_update(_deltas()[3], Transport.bfloat16))
        _corrupt_update(reply, kind, Transport.bfloat16)
        accepted, records = vet_replies([reply], _like(), 1e3, transport=Transport.bfloat16)
        assert not accepted and reason in records[0].reason
