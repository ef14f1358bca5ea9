"""What a site's reply lets leave it (issue #12 point 10), against the real site handlers.

Each test hand-writes the coordinator's messages to ``client/app.py``'s ``train`` (and the
secure path's stage (a)) and checks what the reply carries: the per-metric table of
docs/security.md against the reply contract (e), phase 2 under DP (d), exact counts under DP
(b), the data summary's ranges (a), and the representation monitor as a label oracle (c).
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from ctfed.client import secagg as site_secagg
from ctfed.client.app import train as client_train
from ctfed.client.secagg import ROSTER_KEY, SIGNING_KEY_KEY
from ctfed.common import secagg as sa
from ctfed.common.certs import ensure_federation_signing_keys
from ctfed.common.checkpoint import state_digest
from ctfed.common.config import (
    CentralDPConfig,
    FinetuneConfig,
    LocalDPConfig,
    ModelConfig,
    MonitorConfig,
    PrivacyConfig,
    PrivacyMode,
    SitePolicy,
    TrainConfig,
)
from ctfed.common.data_summary import POSITIVE_PREFIX, SLICES_KEYS, SPACING_KEYS, site_data_metrics
from ctfed.common.exchange import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EVAL_METRIC_PREFIX,
    FINETUNE_PHASE,
    LOSS_FIRST_KEY,
    LOSS_KEY,
    LOSSES_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    SITE_KEY,
    RoundInstructions,
    SiteReply,
    state_to_record,
)
from ctfed.common.finetune import FederatedFreezingSchedule, build_classifier
from ctfed.common.metrics import METRICS, OPERATING_POINT_METRIC
from ctfed.common.model import ViTEncoder
from ctfed.common.monitor import MonitorResult
from ctfed.common.monitor import SECONDS_KEY as MONITOR_SECONDS_KEY
from ctfed.common.preprocess import MANIFEST, CachedVolumes

from helpers import site_context, train_message, write_random_cache  # tests/helpers.py

TINY = ModelConfig(name="tiny", image_size=32, patch_size=8, hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96)
FINETUNE = FinetuneConfig(label_names=["any"], batch_size=2, eval_n_boot=5)
ONE_STEP = TrainConfig(local_steps=1, batch_size=2, num_local_crops=1)
SITE = "hospital-a"
LABELS = [0, 1, 0, 1, 1, 0]
SECURITY_DOC = Path(__file__).parents[2] / "docs" / "security.md"


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity: None) -> None:
    """Every message here is built outside a SuperNode (tests/conftest.py)."""


def _cache(root: Path, labels: list[int | None], slices: list[int] | None = None,
           spacings: list[list[float]] | None = None) -> Path:
    """Random volumes the tiny model trains on, one study per scan, with slice counts and spacings."""
    write_random_cache(root, labels)
    manifest = json.loads((root / MANIFEST).read_text())
    for index, entry in enumerate(manifest["series"]):
        entry["study_key"] = f"study{index:02d}"
        entry["slice_count"] = (slices or [40 + index for index in range(len(labels))])[index]
        entry["spacing_zyx_mm"] = (spacings or [[5.0, 0.45, 0.45]] * len(labels))[index]
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def _context(cache: Path, state: Path, policy: SitePolicy | None = None) -> Context:
    roster, keys = ensure_federation_signing_keys(state.parent / "secagg-keys", [SITE])
    return site_context(
        cache, state, SITE, policy=policy or SitePolicy(), run_id=5, **{SIGNING_KEY_KEY: str(keys[SITE]), ROSTER_KEY: str(roster)}
    )


def _encoder(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return ViTEncoder(TINY).state_dict()


def _phase_one(server_round: int = 1, privacy: PrivacyConfig | None = None, train: TrainConfig = ONE_STEP,
               monitor: bool = True) -> RoundInstructions:
    return RoundInstructions(
        server_round=server_round, model=TINY, train=train, privacy=privacy or PrivacyConfig(),
        monitor=MonitorConfig() if monitor else None, finetune=FINETUNE if monitor else None,
    )


def _sent(reply: Message) -> dict[str, Any]:
    assert not reply.has_error(), reply.error.reason
    return dict(reply.content[METRICS_KEY])


def _monitor_keys(metrics: dict[str, Any]) -> list[str]:
    return sorted(key for key in metrics if key.startswith("monitor-"))


# -- (e) the per-metric table ---------------------------------------------------------------


def _table_keys() -> set[str]:
    section = SECURITY_DOC.read_text().split("### What each reply value reveals", 1)[1].split("\n## ", 1)[0]
    keys: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            keys |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return keys


def _row_of(key: str) -> str:
    """The table's name for a concrete key (a label column, a task, a metric are placeholders)."""
    if key.startswith(POSITIVE_PREFIX):
        return POSITIVE_PREFIX + "<label>"
    if key.startswith(EVAL_METRIC_PREFIX):
        _task, metric, *bound = key[len(EVAL_METRIC_PREFIX):].split("/")
        if metric == OPERATING_POINT_METRIC:
            return f"{EVAL_METRIC_PREFIX}<task>/{OPERATING_POINT_METRIC}"
        assert metric in METRICS, key
        return f"{EVAL_METRIC_PREFIX}<task>/<metric>" + "".join(f"/{b}" for b in bound)
    return key


def _every_field_filled(cache: Path) -> SiteReply:
    """A SiteReply with every field set, so that every key the contract can send appears."""
    aggregates = {
        **site_data_metrics(CachedVolumes(cache)),
        **MonitorResult(knn_accuracy=0.5, embedding_std=0.1, uniform_std=0.1, scans=6, k=2).to_metrics(),
        MONITOR_SECONDS_KEY: 1.0,
    }
    evaluation = {"any": {**{m: {"value": 0.5, "low": 0.4, "high": 0.6} for m in METRICS},
                          OPERATING_POINT_METRIC: {"value": 0.5}}}
    values: dict[str, Any] = {}
    for f in fields(SiteReply):
        kind = str(f.type)
        if f.name == "site_id":
            values[f.name] = SITE
        elif f.name == "losses":
            values[f.name] = (1.0, 2.0)
        elif f.name == "evaluation":
            values[f.name] = evaluation
        elif f.name == "aggregates":
            values[f.name] = aggregates
        elif kind.startswith("int"):
            values[f.name] = 1
        elif kind.startswith("float"):
            values[f.name] = 1.0
        else:
            raise AssertionError(f"SiteReply.{f.name} ({kind}): give this test a value for it, and the table a row")
    return SiteReply(**values)


def test_every_reply_value_has_a_row_in_the_table(tmp_path: Path) -> None:
    """docs/security.md's table lists exactly the keys a reply can carry: those of the
    contract (every SiteReply field set) and those the real site handler sends."""
    cache = _cache(tmp_path / "cache", LABELS)
    full = _every_field_filled(cache)
    records = full.to_records()
    keys = set(records[METRICS_KEY].keys()) | set(records[SITE_KEY].keys())
    real = client_train(train_message(_phase_one(), _encoder()), _context(cache, tmp_path / "state", SitePolicy(min_reported_count=0)))
    assert not real.has_error(), real.error.reason
    keys |= set(real.content[METRICS_KEY].keys()) | set(real.content[SITE_KEY].keys())
    rows = {_row_of(key) for key in keys}
    table = _table_keys()
    assert not rows - table, f"reply keys without a row in docs/security.md: {sorted(rows - table)}"
    assert not table - rows, f"rows in docs/security.md for no reply key: {sorted(table - rows)}"


# -- (d), (b) phase 2 under DP; counts under DP -----------------------------------------------


def _phase_two(privacy: PrivacyConfig) -> tuple[Message, RoundInstructions]:
    model = ModelConfig(name="tiny", image_size=32, patch_size=8, hidden_size=48, num_layers=4, num_heads=3, mlp_dim=96)
    plan = FederatedFreezingSchedule(FINETUNE, model.num_layers, rounds=3, local_steps=2).plan(1)
    state = build_classifier(model, 1, seed=0).state_dict()
    instructions = RoundInstructions(
        server_round=1, model=model, train=TrainConfig(), privacy=privacy, phase=FINETUNE_PHASE, finetune=FINETUNE,
        plan=plan, plan_local_steps=2, full_state=True, base_sha256=state_digest(state),
    )
    content = RecordDict({ARRAYS_KEY: state_to_record(state), CONFIG_KEY: instructions.to_record()})
    return Message(content, dst_node_id=1, message_type="train"), instructions


def test_phase_two_under_dp_sends_no_evaluation_per_step_loss_or_exact_count(tmp_path: Path) -> None:
    cache = _cache(tmp_path / "cache", LABELS)
    central = PrivacyConfig(mode=PrivacyMode.central, central=CentralDPConfig(noise_multiplier=1.0))
    message, instructions = _phase_two(central)
    sent = _sent(client_train(message, _context(cache, tmp_path / "dp")))
    assert not [key for key in sent if key.startswith(EVAL_METRIC_PREFIX)]  # no AUROC, CI or operating point
    assert LOSSES_KEY not in sent and LOSS_FIRST_KEY not in sent and LOSS_KEY in sent
    # What the plan asks for (2 steps x batch 2), not the site's 2 labelled training scans.
    assert sent[NUM_EXAMPLES_KEY] == instructions.plan_local_steps * FINETUNE.batch_size == 4
    # Without DP (and a site that sends small cells too) the round reports all of it: the rule is DP's.
    plain_message, _ = _phase_two(PrivacyConfig())
    plain = _sent(client_train(plain_message, _context(cache, tmp_path / "plain", SitePolicy(min_reported_count=0))))
    assert f"{EVAL_METRIC_PREFIX}any/auroc" in plain and LOSSES_KEY in plain and plain[NUM_EXAMPLES_KEY] == 2


def test_phase_two_keeps_the_evaluation_of_a_task_with_few_held_out_scans_of_a_class(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without DP a coordinator reads a site's held-out AUROC and operating point as a
    label oracle: over two or three held-out positives they say how each scored. The
    default floor (5) keeps a task's evaluation at the site unless its held-out scans hold
    at least that many of each class; the rest of the reply is as before."""
    message, _ = _phase_two(PrivacyConfig())
    small = _cache(tmp_path / "small", LABELS)  # 6 scans: a few held out of each class
    with caplog.at_level("INFO", logger="ctfed.client.finetune_round"):
        kept = _sent(client_train(message, _context(small, tmp_path / "small-state")))
    assert not [key for key in kept if key.startswith(EVAL_METRIC_PREFIX)]
    assert LOSSES_KEY in kept and kept[NUM_EXAMPLES_KEY] == 2
    assert "held-out evaluation kept at the site (fewer than policy.min_reported_count=5" in caplog.text
    large = _cache(tmp_path / "large", [0, 1] * 12)  # 12 held out, 6 of each class
    message, _ = _phase_two(PrivacyConfig())
    sent = _sent(client_train(message, _context(large, tmp_path / "large-state")))
    assert {f"{EVAL_METRIC_PREFIX}any/auroc", f"{EVAL_METRIC_PREFIX}any/{OPERATING_POINT_METRIC}"} <= set(sent)


def test_local_dp_sends_the_planned_count_not_the_sampled_one(tmp_path: Path) -> None:
    """Poisson sampling draws each volume with probability batch/volumes per step: the exact
    count is a sum of per-volume draws. The reply carries steps x batch size, what was asked."""
    cache = _cache(tmp_path / "cache", [None] * 6)
    # 3 steps at rate 2/6: the sampled total equals the planned 6 with probability ~0.2 only
    # (more steps would tell the two apart more surely, at seconds a step).
    train = TrainConfig(local_steps=3, batch_size=2, num_local_crops=1)
    local = PrivacyConfig(mode=PrivacyMode.local, local=LocalDPConfig(noise_multiplier=1.0))
    sent = _sent(client_train(train_message(_phase_one(privacy=local, train=train, monitor=False), _encoder()),
                              _context(cache, tmp_path / "state")))
    assert sent[NUM_EXAMPLES_KEY] == 6 and LOSSES_KEY not in sent


# -- (a) the data summary's ranges -------------------------------------------------------------


def test_ranges_are_coarsened_and_no_end_is_one_scan(tmp_path: Path) -> None:
    """One outlier scan (412 slices, 0.3125 mm pixels) must not be readable off the range."""
    slices = [40, 41, 43, 45, 47, 412]
    spacings = [[5.0, 0.45, 0.45], [5.0, 0.46, 0.46], [4.8, 0.47, 0.47], [5.0, 0.48, 0.48], [5.0, 0.49, 0.49],
                [0.625, 0.3125, 0.3125]]
    cache = _cache(tmp_path / "cache", [None] * 6, slices, spacings)
    message = lambda: train_message(_phase_one(monitor=False), _encoder())  # noqa: E731
    sent = _sent(client_train(message(), _context(cache, tmp_path / "floor")))  # policy default: floor 5
    low, high = sent[SLICES_KEYS[0]], sent[SLICES_KEYS[1]]
    assert high != 412 and high <= 50 and low % 10 == 0 and high % 10 == 0 and low <= high
    for axis in (*sent[SPACING_KEYS[0]], *sent[SPACING_KEYS[1]]):
        assert axis not in (0.3125, 0.625) and abs(axis * 10 - round(axis * 10)) < 1e-6  # 0.1 mm bins
    # A site that sends all (floor 0) sends the exact range.
    exact = _sent(client_train(message(), _context(cache, tmp_path / "all", SitePolicy(min_reported_count=0))))
    assert (exact[SLICES_KEYS[0]], exact[SLICES_KEYS[1]]) == (40, 412)
    assert exact[SPACING_KEYS[0]] == [0.625, 0.3125, 0.3125]


# -- (c) the representation monitor ------------------------------------------------------------

# A site that trusts its coordinator with the monitor on the plain path (ctfed simulate's do).
TRUSTING = SitePolicy(share_monitor_on_plain_path=True)


def test_the_plain_path_sends_no_monitor_unless_the_site_says_so(tmp_path: Path) -> None:
    """On the plain path a site cannot check that the encoder it gets is the one every site
    got: a coordinator sends this site one of its own making and reads the kNN accuracy as a
    label oracle. A site's default policy does not run the monitor there."""
    cache = _cache(tmp_path / "cache", LABELS)
    crafted = {name: torch.randn_like(t) for name, t in _encoder(1).items()}
    sent = _sent(client_train(train_message(_phase_one(1), crafted), _context(cache, tmp_path / "default")))
    assert _monitor_keys(sent) == [] and LOSS_KEY in sent  # the round itself still trains
    trusting = _sent(client_train(train_message(_phase_one(1), crafted), _context(cache, tmp_path / "trusting", TRUSTING)))
    assert _monitor_keys(trusting)


def test_the_monitor_answers_once_per_round(tmp_path: Path) -> None:
    """A coordinator replaying round 1 with a crafted encoder gets no second kNN answer."""
    cache = _cache(tmp_path / "cache", LABELS)
    context = _context(cache, tmp_path / "state", TRUSTING)
    first = _sent(client_train(train_message(_phase_one(1), _encoder(0)), context))
    assert _monitor_keys(first)
    crafted = {name: torch.randn_like(t) for name, t in _encoder(1).items()}
    replay = _sent(client_train(train_message(_phase_one(1), crafted), context))
    assert _monitor_keys(replay) == [] and LOSS_KEY in replay  # the round itself still trains
    assert _monitor_keys(_sent(client_train(train_message(_phase_one(2), _encoder(0)), context)))


def _stage_a(instructions: RoundInstructions) -> Message:
    params = ConfigRecord(
        {sa.P_ROUND: instructions.server_round, sa.P_THRESHOLD: 2, sa.P_CLIPPING: 1.0, sa.P_QUANTIZATION: 2**20,
         sa.P_MODULUS_BITS: 64, sa.P_MAX_WEIGHT: 64, sa.P_MAX_NORM: 1e6}
    )
    content = RecordDict({ARRAYS_KEY: state_to_record(_encoder()), CONFIG_KEY: instructions.to_record(), sa.PARAMS_KEY: params})
    return Message(content, dst_node_id=1, message_type=sa.message_type(sa.STAGE_TRAIN))


def test_the_secure_path_holds_the_monitor_until_unmask(tmp_path: Path) -> None:
    """Stage (a)'s reply carries no label-derived value; a round that stops before the unmask
    stage releases none (the held values go with the abort)."""
    cache = _cache(tmp_path / "cache", LABELS)
    context = _context(cache, tmp_path / "state")
    handlers = site_secagg.stage_handlers(client_train)
    reply = handlers[sa.message_type(sa.STAGE_TRAIN)](_stage_a(_phase_one()), context)
    sent = _sent(reply)
    assert _monitor_keys(sent) == [] and LOSS_KEY in sent
    from ctfed.client.monitor_round import HELD_MONITOR_KEY

    assert sorted(context.state[HELD_MONITOR_KEY].keys()) == _monitor_keys(
        _sent(client_train(train_message(_phase_one(), _encoder()), _context(cache, tmp_path / "plain", TRUSTING)))
    )
    # The coordinator moves on to stage (b) of another round: the site stops, nothing held stays.
    wrong = RecordDict({sa.PROTOCOL_KEY: ConfigRecord({sa.P_ROUND: 7})})
    with pytest.raises(site_secagg.ProtocolViolation):
        handlers[sa.message_type(sa.STAGE_SHARE_KEYS)](Message(wrong, dst_node_id=1, message_type=sa.message_type(sa.STAGE_SHARE_KEYS)), context)
    assert HELD_MONITOR_KEY not in context.state


def test_a_small_monitor_stays_at_the_site(tmp_path: Path) -> None:
    """Four labelled scans (two held out): a kNN accuracy that says how those two are labelled."""
    cache = _cache(tmp_path / "cache", [0, 1, 0, 1])
    message = lambda: train_message(_phase_one(), _encoder())  # noqa: E731
    assert _monitor_keys(_sent(client_train(message(), _context(cache, tmp_path / "floor", TRUSTING)))) == []
    trusting_all = SitePolicy(min_reported_count=0, share_monitor_on_plain_path=True)
    assert _monitor_keys(_sent(client_train(message(), _context(cache, tmp_path / "all", trusting_all))))
