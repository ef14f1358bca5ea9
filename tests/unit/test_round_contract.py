"""What travels between coordinator and sites: weights, the typed round contract
(RoundInstructions, SiteReply, one key scheme) and the protocol version both sides check."""

from __future__ import annotations

import json
import math
from dataclasses import fields, is_dataclass, replace
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from ctfed.common.config import ConfigError, FinetuneConfig, ModelConfig, MonitorConfig, RunConfig, TrainConfig, load_run_config
from ctfed.common.exchange import (
    ARRAYS_KEY,
    FINETUNE_PHASE,
    PLAN_BLOCKS_KEY,
    PLAN_STAGE_KEY,
    POLICY_REFUSED_CODE,
    PROTOCOL_VERSION,
    PROTOCOL_VERSION_KEY,
    SERVER_ROUND_KEY,
    SITE_KEY,
    STATUS_FAILED,
    STATUS_REJECTED,
    IncompatibleProtocol,
    RoundInstructions,
    SiteReply,
    UpdateRejected,
    apply_delta,
    record_bytes,
    record_to_state,
    refusing_site,
    state_delta,
    state_to_record,
    update_norm,
)
from ctfed.common.finetune import FederatedFreezingSchedule

from helpers import site_context, train_message  # tests/helpers.py


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4), "steps": torch.tensor(3)}


def test_weights_round_trip_exactly() -> None:
    state = _state()
    back = record_to_state(state_to_record(state), expected=state)
    assert set(back) == set(state)
    for name in state:
        assert torch.equal(back[name], state[name])


def test_bytes_counts_payload() -> None:
    record = state_to_record(_state())
    assert record_bytes(record) >= (12 + 4) * 4 + 8


def test_delta_then_apply_gives_back_the_new_weights() -> None:
    base = {"w": torch.randn(5, 2), "half": torch.randn(3).half()}
    new = {"w": base["w"] + 0.5, "half": (base["half"].float() - 0.25).half()}
    delta = state_delta(new, base)
    assert delta["w"].dtype == torch.float32 and torch.allclose(delta["w"], torch.full((5, 2), 0.5))
    back = apply_delta(base, delta)
    assert back["half"].dtype == torch.float16
    assert torch.allclose(back["w"], new["w"]) and torch.allclose(back["half"].float(), new["half"].float())


def test_update_norm_spans_all_tensors() -> None:
    assert update_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]]), "n": torch.tensor(7)}) == pytest.approx(5.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_update_is_rejected(bad: float) -> None:
    state = _state()
    state["a.bias"][1] = bad
    with pytest.raises(UpdateRejected, match="a.bias"):
        record_to_state(state_to_record(state), expected=_state())


def test_shape_and_name_mismatch_is_rejected() -> None:
    expected = _state()
    wrong_shape = dict(expected, **{"a.bias": torch.zeros(5)})
    with pytest.raises(UpdateRejected, match="shape"):
        record_to_state(state_to_record(wrong_shape), expected=expected)
    extra = dict(expected, **{"b.weight": torch.zeros(1)})
    with pytest.raises(UpdateRejected, match="unexpected"):
        record_to_state(state_to_record(extra), expected=expected)


def _phase_one(server_round: int = 3) -> RoundInstructions:
    return RoundInstructions(
        server_round=server_round,
        model=ModelConfig(hidden_size=96, num_heads=4),
        train=TrainConfig(local_steps=7, lr=1e-3, global_crop_scale=[0.4, 1.0]),
        min_sites=2,
        secure_aggregation=True,
        monitor=MonitorConfig(knn_k=5),
        finetune=FinetuneConfig(label_names=["any"]),
        federation_id="ab" * 16,
    )


def _phase_two() -> RoundInstructions:
    finetune = FinetuneConfig(label_names=["any", "ich"], local_steps=3)
    plan = FederatedFreezingSchedule(finetune, 2, 6, 3).plan(5)
    return RoundInstructions(
        server_round=8, model=ModelConfig(), train=TrainConfig(), phase=FINETUNE_PHASE, finetune=finetune, plan=plan,
        plan_local_steps=3, full_state=True, base_sha256="cd" * 32,
    )


@pytest.mark.parametrize("sent", [_phase_one(), _phase_two()], ids=["phase-1", "phase-2"])
def test_instructions_round_trip(sent: RoundInstructions) -> None:
    record = sent.to_record()
    assert record[PROTOCOL_VERSION_KEY] == PROTOCOL_VERSION and record[SERVER_ROUND_KEY] == sent.server_round
    assert RoundInstructions.from_record(ConfigRecord(dict(record.items()))) == sent


@pytest.mark.parametrize("sent", [_phase_one(), _phase_two()], ids=["phase-1", "phase-2"])
def test_every_dotted_key_is_a_config_path_and_no_other_key_has_a_dot(sent: RoundInstructions) -> None:
    """The one key scheme (common/exchange.py): ``section.field`` is exactly that RunConfig
    field; protocol facts are kebab-case without a dot."""
    cfg = RunConfig()
    for key in sent.to_record():
        if "." not in key:
            assert key == key.lower() and "_" not in key, key
            continue
        node = cfg
        for part in key.split("."):
            assert is_dataclass(node) and part in {f.name for f in fields(node)}, f"{key} is not a config path"
            node = getattr(node, part)


def test_one_builder_makes_both_phases() -> None:
    from ctfed.server.collect import round_instructions

    cfg = load_run_config(["federation.finetune_rounds=2"])
    first = round_instructions(cfg, 1)
    assert (first.phase, first.plan, first.monitor, first.finetune) == ("pretrain", None, cfg.monitor, cfg.finetune)
    plan = FederatedFreezingSchedule(cfg.finetune, cfg.model.num_layers, 2, 4).plan(1)
    second = round_instructions(cfg, cfg.federation.rounds + 1, plan, 4)
    assert (second.phase, second.plan, second.plan_local_steps, second.monitor) == (FINETUNE_PHASE, plan, 4, None)
    assert replace(second, phase=first.phase, server_round=1, plan=None, plan_local_steps=0, monitor=cfg.monitor) == first


def test_instructions_with_unknown_missing_or_invalid_values_are_refused() -> None:
    good = dict(_phase_one().to_record().items())
    for key, value, phrase in [
        ("train.evil", 1, "evil"),
        ("train.local_steps", 0, "local_steps"),
        ("run.phase", "pretrain", "unknown instruction keys ['run.phase']"),  # the old name: another protocol
        ("train.grad_clip", math.nan, "non-finite value for train.grad_clip"),
    ]:
        with pytest.raises(ConfigError, match=phrase.replace("[", r"\[").replace("]", r"\]")):
            RoundInstructions.from_record({**good, key: value})
    with pytest.raises(ConfigError, match="'server-round' is 'three', not an integer"):
        RoundInstructions.from_record({**good, SERVER_ROUND_KEY: "three"})
    with pytest.raises(ConfigError, match="'federation.min_sites' is True, not an integer"):
        RoundInstructions.from_record({**good, "federation.min_sites": True})
    with pytest.raises(ConfigError, match="lack 'server-round'"):
        RoundInstructions.from_record({k: v for k, v in good.items() if k != SERVER_ROUND_KEY})
    for federation_id in ("../../x", "ab" * 17, 12345, "AB" * 16):  # it becomes part of a site's path
        with pytest.raises(ConfigError, match="'federation-id' is .*, not 32 lowercase hex digits"):
            RoundInstructions.from_record({**good, "federation-id": federation_id})
    assert RoundInstructions.from_record({k: v for k, v in good.items() if k != "federation-id"}).federation_id == ""
    phase_two = dict(_phase_two().to_record().items())
    with pytest.raises(ConfigError, match=f"lack '{PLAN_STAGE_KEY}'"):
        RoundInstructions.from_record({k: v for k, v in phase_two.items() if k != PLAN_STAGE_KEY})
    with pytest.raises(ConfigError, match="not a list of integers"):
        RoundInstructions.from_record({**phase_two, PLAN_BLOCKS_KEY: ["top"]})


@pytest.mark.parametrize(("version", "phrase"), [
    (PROTOCOL_VERSION + 1, f"speaks ctfed protocol version {PROTOCOL_VERSION + 1}, this site speaks version {PROTOCOL_VERSION}"),
    (None, f"carries no '{PROTOCOL_VERSION_KEY}'; this site speaks ctfed protocol version {PROTOCOL_VERSION}"),
])
def test_instructions_of_another_protocol_version_are_refused(version: int | None, phrase: str) -> None:
    record = dict(_phase_one().to_record().items())
    record.pop(PROTOCOL_VERSION_KEY)
    if version is not None:
        record[PROTOCOL_VERSION_KEY] = version
    with pytest.raises(IncompatibleProtocol) as refused:
        RoundInstructions.from_record(record)
    assert phrase in str(refused.value)


def _site_context(tmp_path: Path) -> Context:
    from ctfed.simulations.runtime.inprocess import InProcessGrid

    InProcessGrid({}, [])  # sets Flower's task identity, which Message() needs outside a Flower process
    return site_context(tmp_path / "no-cache", tmp_path / "state", "site_v")


def _hand_written(record: dict) -> Message:
    """A coordinator's train message written by hand (no ctfed coordinator code)."""
    return train_message(ConfigRecord(record), {"w": torch.zeros(2)}, MessageType.TRAIN)


@pytest.mark.parametrize("change", ["version+1", "no-version", "no-server-round", "phase-2-no-plan-stage"])
def test_site_refuses_another_protocol_or_a_missing_key_before_reading_data(tmp_path: Path, change: str) -> None:
    """The real ClientApp handler against hand-written messages: a clear refusal (code 4001,
    audited), never a KeyError, and the cache is not opened."""
    from ctfed.client.app import train
    from ctfed.client.audit import AUDIT_FILE, KIND_REFUSAL

    record = dict((_phase_two() if change.startswith("phase-2") else _phase_one()).to_record().items())
    if change == "version+1":
        record[PROTOCOL_VERSION_KEY] = PROTOCOL_VERSION + 1
        phrase = f"speaks ctfed protocol version {PROTOCOL_VERSION + 1}, this site speaks version {PROTOCOL_VERSION}"
    elif change == "no-version":
        del record[PROTOCOL_VERSION_KEY]
        phrase = f"carries no '{PROTOCOL_VERSION_KEY}'"
    elif change == "no-server-round":
        del record[SERVER_ROUND_KEY]
        phrase = f"lack '{SERVER_ROUND_KEY}'"
    else:
        del record[PLAN_STAGE_KEY]
        phrase = f"lack '{PLAN_STAGE_KEY}'"
    context = _site_context(tmp_path)
    reply = train(_hand_written(record), context)
    assert reply.has_error() and reply.error.code == POLICY_REFUSED_CODE
    assert phrase in (reply.error.reason or "") and refusing_site(reply.error.reason or "") == "site_v"
    assert not (tmp_path / "no-cache").exists()
    (entry,) = [json.loads(line) for line in (tmp_path / "state" / AUDIT_FILE).read_text().splitlines()]
    assert entry["kind"] == KIND_REFUSAL and phrase in entry["reason"]
    assert entry["round"] == (0 if change == "no-server-round" else record[SERVER_ROUND_KEY])


def test_reply_round_trip() -> None:
    sent = SiteReply(
        site_id="site_a", num_examples=5, loss=0.5, loss_first=0.9, losses=(0.9, 0.5), train_seconds=1.5,
        data_seconds=0.25, round_seconds=2.0, bytes_sent=1024, peak_rss_mb=300.0, epsilon=1.25, trainable_parameters=77,
        evaluation={"any": {"auroc": {"value": 0.75, "low": 0.5, "high": 1.0}, "operating_point": {"value": 0.4}}},
        aggregates={"data-summary-scans": 5, "monitor-seconds": 0.5},
    )
    content = RecordDict({ARRAYS_KEY: state_to_record({"w": torch.zeros(1)}), **sent.to_records()})
    assert content[SITE_KEY][PROTOCOL_VERSION_KEY] == PROTOCOL_VERSION
    assert SiteReply.from_records(content, fallback_site_id="node-1") == sent
    # Fields left empty are not sent.
    assert set(SiteReply("site_b", num_examples=2).metrics()) == {"num-examples"}


def _reply(version: int | None) -> Message:
    from ctfed.simulations.runtime.inprocess import InProcessGrid

    records = SiteReply("site_v", num_examples=3, loss=1.0).to_records()
    site = dict(records[SITE_KEY].items())
    site.pop(PROTOCOL_VERSION_KEY)
    if version is not None:
        site[PROTOCOL_VERSION_KEY] = version
    content = RecordDict({ARRAYS_KEY: state_to_record({"w": torch.zeros(2)}), **records, SITE_KEY: ConfigRecord(site)})
    grid = InProcessGrid({"train": lambda msg, ctx: Message(content=content, reply_to=msg)}, [4])
    return list(grid.send_and_receive([Message(RecordDict(), dst_node_id=4, message_type="train")]))[0]


@pytest.mark.parametrize("version", [PROTOCOL_VERSION + 1, None], ids=["version+1", "no-version"])
def test_coordinator_rejects_a_reply_of_another_protocol_version(version: int | None) -> None:
    from ctfed.server.collect import vet_replies

    accepted, (record,) = vet_replies([_reply(version)], {"w": torch.zeros(2)}, 1e3)
    assert not accepted and record.status == STATUS_REJECTED
    if version is None:
        assert f"carries no '{PROTOCOL_VERSION_KEY}'; this coordinator speaks ctfed protocol version {PROTOCOL_VERSION}" in record.reason
    else:
        assert f"the site speaks ctfed protocol version {version}, this coordinator speaks version {PROTOCOL_VERSION}" in record.reason
    accepted, (record,) = vet_replies([_reply(PROTOCOL_VERSION)], {"w": torch.zeros(2)}, 1e3)
    assert accepted and record.site == "site_v"


def test_secure_coordinator_drops_a_reply_of_another_protocol_version() -> None:
    """Stage (a) of secure aggregation decodes the reply the same way (server/secagg.py)."""
    from ctfed.client import secagg as site_secagg
    from ctfed.common.config import SecAggConfig
    from ctfed.server.secagg import secure_round
    from ctfed.simulations.runtime.inprocess import InProcessGrid

    nodes, odd = [1, 2, 3, 4], 4

    def local_train(msg: Message, context: Context) -> Message:
        node = int(msg.metadata.dst_node_id)
        records = SiteReply(f"site-{node}", num_examples=2, loss=1.0).to_records()
        if node == odd:
            records[SITE_KEY][PROTOCOL_VERSION_KEY] = PROTOCOL_VERSION + 1
        return Message(content=RecordDict({ARRAYS_KEY: state_to_record({"w": torch.full((2,), 0.01)}), **records}), reply_to=msg)

    grid = InProcessGrid(site_secagg.stage_handlers(local_train), nodes)
    cfg = RunConfig()
    cfg.secagg = SecAggConfig(num_shares=3)
    cfg.federation.min_sites = 2
    like = {"w": torch.zeros(2)}
    messages = [
        train_message(ConfigRecord({SERVER_ROUND_KEY: 1}), like, node_id=n) for n in nodes
    ]
    result = secure_round(grid, messages, like, cfg, server_round=1)
    (dropped,) = [s for s in result.sites if s.status == STATUS_FAILED]
    assert f"the site speaks ctfed protocol version {PROTOCOL_VERSION + 1}" in dropped.reason
