"""The representation monitor of phase 1: the maths on crafted features, the split it reuses,
its config and instructions, and a site's ClientApp round (metrics sent, kept by policy,
skipped without splittable labels, training unchanged)."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType

from ctfed.common.config import (
    ConfigError,
    FeaturePooling,
    FinetuneConfig,
    ModelConfig,
    MonitorConfig,
    SitePolicy,
    TrainConfig,
    load_run_config,
)
from ctfed.common.exchange import (
    LOSS_KEY,
    METRICS_KEY,
    TRAIN_SECONDS_KEY,
    RoundInstructions,
    SiteReply,
)
from ctfed.common.finetune import build_classifier
from ctfed.common.labelled import LabelledScans, NotEvaluableError, SiteSplit, stratified_split
from ctfed.common.metrics import embedding_std, knn_accuracy
from ctfed.common.model import ViTEncoder
from ctfed.common.monitor import (
    KNN_ACCURACY_KEY,
    SECONDS_KEY,
    UNIFORM_STD_KEY,
    cap_split,
    encoder_features,
    feature_monitor,
    monitor_from_metrics,
    monitor_split,
    site_monitor,
    standardize_features,
)
from ctfed.common.preprocess import CachedVolumes
from ctfed.server.collect import round_instructions
from ctfed.server.results import monitor_summary, site_record

from helpers import site_context, train_message, write_random_cache  # tests/helpers.py

TINY = ModelConfig(name="tiny", image_size=32, patch_size=8, hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96)
FINETUNE = FinetuneConfig(label_names=["any"])


# --- the maths on crafted features -------------------------------------------------------------


def test_knn_accuracy_and_spread_on_separable_features() -> None:
    rng = np.random.default_rng(0)
    e1, e2 = np.eye(4)[0], np.eye(4)[1]
    train = np.stack([e1 + 0.05 * rng.standard_normal(4) for _ in range(3)] + [e2 + 0.05 * rng.standard_normal(4) for _ in range(3)])
    train_y = [0, 0, 0, 1, 1, 1]
    # Three scans near each class's direction, labelled as their direction; one near e1 labelled 1.
    test = np.stack([e1, e1 * 2, e2, e2 * 3, e1 + 0.1 * e2])
    test_y = [0, 0, 1, 1, 1]
    result = feature_monitor(train, train_y, test, test_y, k=3)
    assert result.knn_accuracy == pytest.approx(4 / 5)
    assert result.k == 3 and result.scans == 11
    assert result.uniform_std == pytest.approx(0.5)  # 1/sqrt(4)
    # Two clusters on orthogonal axes: about half the spread of the uniform case, far from 0.
    assert 0.3 * result.uniform_std < result.embedding_std < result.uniform_std
    # k larger than the training rows is capped, not an error.
    assert feature_monitor(train[:2], [0, 1], test, test_y, k=5).k == 2


def test_knn_votes_on_features_standardised_with_the_training_split() -> None:
    """Four dimensions carry the label (+-0.5), two carry nuisance of std 10, all sit at an offset
    of 100: raw cosine kNN follows the nuisance, z-scored it follows the label."""
    rng = np.random.default_rng(2)

    def scans(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 2, n)
        signal = (labels[:, None] - 0.5) + 0.05 * rng.standard_normal((n, 4))
        return 100.0 + np.concatenate([signal, 10.0 * rng.standard_normal((n, 2))], axis=1), labels

    train, train_y = scans(40)
    test, test_y = scans(40)
    result = feature_monitor(train, train_y, test, test_y, k=3)
    assert result.knn_accuracy >= 0.9
    assert knn_accuracy(train, train_y, test, test_y, k=3) <= 0.75  # the raw features' vote
    # The statistics are the training rows' only; the spread is the raw features' (collapse check).
    train_z, test_z = standardize_features(train, test)
    assert np.allclose(train_z.mean(0), 0.0, atol=1e-9) and np.allclose(train_z.std(0), 1.0, atol=1e-3)
    assert np.allclose(test_z, (test - train.mean(0)) / np.sqrt(train.var(0) + 1e-5))
    assert result.embedding_std == pytest.approx(embedding_std(np.concatenate([train, test])))


def test_collapsed_features_have_no_spread_and_random_ones_the_uniform_spread() -> None:
    rng = np.random.default_rng(1)
    point = rng.standard_normal(64)
    collapsed = np.stack([point * (1 + 0.1 * i) for i in range(8)])  # one direction, any length
    result = feature_monitor(collapsed[:4], [0, 1, 0, 1], collapsed[4:], [0, 1, 0, 1], k=3)
    assert result.embedding_std == pytest.approx(0.0, abs=1e-9)
    spread = feature_monitor(rng.standard_normal((500, 64)), rng.integers(0, 2, 500), rng.standard_normal((500, 64)), rng.integers(0, 2, 500), k=3)
    assert spread.embedding_std == pytest.approx(spread.uniform_std, rel=0.05)


def test_reply_metrics_round_trip_and_malformed_ones_are_dropped() -> None:
    result = feature_monitor(np.eye(3)[:2], [0, 1], np.eye(3)[:2], [0, 1], k=1)
    metrics = {**result.to_metrics(), SECONDS_KEY: 0.4, LOSS_KEY: 1.0}
    assert monitor_from_metrics(metrics) == result.to_dict()
    record = site_record(SiteReply.from_metrics("site_a", metrics), "aggregated")
    assert record.monitor == result.to_dict() and record.monitor_seconds == 0.4 and record.train_seconds is None
    assert "site_a kNN 1.000" in monitor_summary([record])
    assert monitor_from_metrics({**metrics, KNN_ACCURACY_KEY: math.nan}) is None
    assert monitor_from_metrics({**metrics, KNN_ACCURACY_KEY: "high"}) is None
    assert monitor_from_metrics({**metrics, UNIFORM_STD_KEY: 0}) is None  # the coordinator divides by it
    assert monitor_from_metrics({**metrics, KNN_ACCURACY_KEY: 1.5}) is None
    assert monitor_from_metrics({LOSS_KEY: 1.0}) is None
    assert site_record(SiteReply("site_a", num_examples=1, loss=1.0), "aggregated").monitor is None


# --- the split it reuses -----------------------------------------------------------------------


def labelled_cache(root: Path, labels: list[int | None]) -> Path:
    """A site cache of random 32^3 volumes with label "any" per scan (None: unlabelled)."""
    return write_random_cache(root, labels)


def test_monitor_uses_phase_twos_split_and_caps_it_deterministically(tmp_path: Path) -> None:
    labels = [i % 3 == 0 for i in range(30)]  # 10 positives, 20 negatives
    volumes = CachedVolumes(labelled_cache(tmp_path / "cache", [int(x) for x in labels]))
    split = stratified_split(volumes, ["any"], FINETUNE.test_fraction, FINETUNE.split_seed)
    assert monitor_split(volumes, FINETUNE, max_scans=64) == split  # the held-out scans are phase 2's

    capped = monitor_split(volumes, FINETUNE, max_scans=8)
    assert capped == monitor_split(volumes, FINETUNE, max_scans=8)  # the same scans every round
    assert len(capped.train) + len(capped.test) == 8
    assert set(capped.train) <= set(split.train) and set(capped.test) <= set(split.test)
    for part in (capped.train, capped.test):  # both classes stay in both parts, 2:1 as in the split
        assert [sum(labels[i] for i in part), sum(not labels[i] for i in part)] in ([1, 3], [2, 2], [1, 2], [2, 3])
    assert monitor_split(volumes, FINETUNE, max_scans=4) != capped
    assert cap_split(SiteSplit((0, 1), (2, 3)), {0: 0, 1: 1, 2: 0, 3: 1}, 4, seed=0) == SiteSplit((0, 1), (2, 3))
    with pytest.raises(ValueError, match="one scan of each"):
        cap_split(SiteSplit((0, 1, 4), (2, 3)), {0: 0, 1: 1, 2: 0, 3: 1, 4: 0}, 3, seed=0)


def test_site_monitor_on_a_real_encoder_reads_the_heads_features(tmp_path: Path) -> None:
    volumes = CachedVolumes(labelled_cache(tmp_path / "cache", [0, 1, 0, 1, 1, 0, None]))
    torch.manual_seed(0)
    state = ViTEncoder(TINY).state_dict()
    result = site_monitor(volumes, TINY, state, FINETUNE, knn_k=3, max_scans=64)
    assert result.scans == 6 and result.k == 2  # the unlabelled scan is left out; 2 of 3 per class held out
    assert 0.0 <= result.knn_accuracy <= 1.0 and result.embedding_std > 0
    assert result.uniform_std == pytest.approx(1 / math.sqrt(TINY.hidden_size))
    # Batched features equal the head's features scan by scan, for every pooling.
    scans = LabelledScans(volumes, range(6), ["any"], TINY.image_size)
    for pooling in FeaturePooling:
        classifier = build_classifier(TINY, 1, state, pooling=pooling).eval()
        with torch.no_grad():
            one_by_one = np.stack([classifier.features(scans[i][0][None])[0].numpy() for i in range(6)])
        np.testing.assert_allclose(encoder_features(TINY, state, scans, pooling), one_by_one, rtol=1e-4, atol=1e-5)
    assert site_monitor(volumes, TINY, state, FinetuneConfig(label_names=["any"], pooling=FeaturePooling.cls_mean_patch), 3, 64).uniform_std == pytest.approx(1 / math.sqrt(2 * TINY.hidden_size))
    with pytest.raises(NotEvaluableError, match="at least 2 per class"):
        site_monitor(CachedVolumes(labelled_cache(tmp_path / "few", [0, 1, 1, 1])), TINY, state, FINETUNE, 3, 64)


# --- config and instructions -------------------------------------------------------------------


def test_config_is_validated_and_travels_with_the_recipe() -> None:
    assert load_run_config().monitor == MonitorConfig(enabled=True, knn_k=3, max_scans=64)
    with pytest.raises(ConfigError, match="monitor.knn_k"):
        load_run_config(["monitor.knn_k=0"])
    with pytest.raises(ConfigError, match="monitor.max_scans"):
        load_run_config(["monitor.max_scans=3"])
    with pytest.raises(ConfigError, match="max_scanz"):
        load_run_config(["monitor.max_scanz=3"])
    finetune = FinetuneConfig(label_names=["ich", "any"], test_fraction=0.3, split_seed=7, pooling=FeaturePooling.mean_patch)
    monitor = MonitorConfig(knn_k=5, max_scans=16)
    sent = RoundInstructions(server_round=1, model=ModelConfig(), train=TrainConfig(), monitor=monitor, finetune=finetune)
    assert RoundInstructions.from_record(sent.to_record()).monitor_settings() == (monitor, finetune)
    off = round_instructions(load_run_config(["monitor.enabled=false"]), 1).to_record()
    assert RoundInstructions.from_record(off).monitor_settings() is None and not [k for k in off if k.startswith("finetune.")]
    # A coordinator that does not ask.
    assert RoundInstructions.from_record(replace(sent, monitor=None).to_record()).monitor_settings() is None
    with pytest.raises(ConfigError):
        RoundInstructions.from_record(ConfigRecord({**dict(sent.to_record().items()), "monitor.knn_k": -1}))


# --- a site's phase-1 round --------------------------------------------------------------------


def _train_message(monitor: MonitorConfig, server_round: int = 1) -> Message:
    instructions = RoundInstructions(
        server_round=server_round, model=TINY, train=TrainConfig(local_steps=1, batch_size=2), monitor=monitor,
        finetune=FINETUNE if monitor.enabled else None,
    )
    torch.manual_seed(0)
    return train_message(instructions, ViTEncoder(TINY).state_dict(), MessageType.TRAIN)


def _site(cache: Path, state_dir: Path, policy: SitePolicy) -> Context:
    return site_context(cache, state_dir, policy=policy)


def _monitor_keys(metrics: dict) -> list[str]:
    return sorted(key for key in metrics if key.startswith("monitor-"))


# These rounds come on the plain path: the site answers the monitor there only when its
# policy says the coordinator is trusted (policy.share_monitor_on_plain_path).
PLAIN_PATH_MONITOR = SitePolicy(share_monitor_on_plain_path=True)


def test_site_sends_the_monitor_unless_its_policy_keeps_it(tmp_path: Path) -> None:
    from ctfed.client.app import train
    from ctfed.simulations.runtime.inprocess import InProcessGrid

    InProcessGrid({}, [])  # sets Flower's task identity, which Message() needs outside a Flower process
    cache = labelled_cache(tmp_path / "cache", [0, 1, 0, 1, 1, 0])
    sent = train(_train_message(MonitorConfig()), _site(cache, tmp_path / "a", PLAIN_PATH_MONITOR)).content[METRICS_KEY]
    assert _monitor_keys(sent) == ["monitor-embedding-std", "monitor-k", "monitor-knn-accuracy", "monitor-scans",
                                   "monitor-seconds", "monitor-uniform-std"]
    assert sent["monitor-scans"] == 6 and sent["monitor-k"] == 2 and 0 <= sent["monitor-knn-accuracy"] <= 1
    assert sent["monitor-seconds"] > 0 and sent[TRAIN_SECONDS_KEY] > 0

    kept = train(_train_message(MonitorConfig()), _site(cache, tmp_path / "b", SitePolicy(share_monitor=False))).content[METRICS_KEY]
    off = train(_train_message(MonitorConfig(enabled=False)), _site(cache, tmp_path / "c", PLAIN_PATH_MONITOR)).content[METRICS_KEY]
    # A site's default policy: no monitor on the plain path, whatever the coordinator asks.
    plain = train(_train_message(MonitorConfig()), _site(cache, tmp_path / "d", SitePolicy())).content[METRICS_KEY]
    assert _monitor_keys(kept) == [] and _monitor_keys(off) == [] and _monitor_keys(plain) == []
    # The monitor only reads the received encoder: the round trains exactly as without it.
    assert list(sent["losses"]) == list(kept["losses"]) == list(off["losses"]) == list(plain["losses"])


def test_site_without_splittable_labels_skips_the_monitor_once_and_trains(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ctfed.client import monitor_round
    from ctfed.client.app import train
    from ctfed.simulations.runtime.inprocess import InProcessGrid

    InProcessGrid({}, [])
    monitor_round._skips_logged.discard("site_x")
    cache = labelled_cache(tmp_path / "cache", [1, 1, 1, 0, None, None])  # one negative: no split
    context = _site(cache, tmp_path / "state", PLAIN_PATH_MONITOR)
    with caplog.at_level(logging.INFO, logger="ctfed.client.monitor_round"):
        for server_round in (1, 2):
            reply = train(_train_message(MonitorConfig(), server_round), context)
            assert not reply.has_error()
            assert _monitor_keys(reply.content[METRICS_KEY]) == [] and LOSS_KEY in reply.content[METRICS_KEY]
    skips = [r.getMessage() for r in caplog.records if "no representation monitor" in r.getMessage()]
    assert len(skips) == 1 and "any=0" in skips[0], skips
