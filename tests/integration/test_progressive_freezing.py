"""Progressive freezing: schedule, requires_grad and eval modes, LR groups, payload, training."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from ctfed.common.checkpoint import save_checkpoint

from ctfed.common.config import ConfigError, FeaturePooling, FinetuneConfig, ModelConfig
from ctfed.common.finetune import (
    CLASSIFIER_KIND_SUFFIX,
    STANDARDIZER_PREFIX,
    Classifier,
    Finetuner,
    FreezingSchedule,
    build_classifier,
    load_classifier,
    param_groups,
    state_nbytes,
    trainable_blocks,
    trainable_state,
)

TINY = ModelConfig()
# Four blocks so that three can unfreeze above the never-trained first block.
DEEP = ModelConfig(num_layers=4, dropout=0.1)


class Bright(Dataset):
    """Binary task a linear head can learn: label 1 volumes are brighter."""

    def __init__(self, count: int = 16, seed: int = 0, cfg: ModelConfig = TINY) -> None:
        generator = torch.Generator().manual_seed(seed)
        size = cfg.image_size
        self.labels = torch.arange(count) % 2
        noise = torch.rand(count, cfg.in_channels, size, size, size, generator=generator)
        self.volumes = 0.5 * noise + 0.5 * self.labels.view(-1, 1, 1, 1, 1).float()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.volumes[index], self.labels[index]


def _trainable(model: Classifier) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_schedule_unfreezes_top_blocks_at_fractions() -> None:
    schedule = FreezingSchedule(num_blocks=4)
    assert schedule.trainable_blocks(0.9, stage=0) == ()
    assert schedule.trainable_blocks(0.05, stage=1) == ()
    assert schedule.trainable_blocks(0.1, stage=1) == (3,)
    assert schedule.trainable_blocks(0.3, stage=1) == (3, 2)
    assert schedule.trainable_blocks(0.59, stage=1) == (3, 2)
    assert schedule.trainable_blocks(1.0, stage=1) == (3, 2, 1)
    # The first block never unfreezes, however many fractions are configured.
    assert trainable_blocks(1.0, 1, num_blocks=2) == (1,)
    assert trainable_blocks(1.0, 1, num_blocks=12, fractions=[0.0, 0.5]) == (11, 10)
    with pytest.raises(ValueError, match="stage"):
        schedule.trainable_blocks(0.5, stage=2)


def test_requires_grad_follows_schedule_and_stem_never_trains() -> None:
    model = build_classifier(DEEP, 2)
    assert _trainable(model) == {"head.weight", "head.bias"}
    schedule = FreezingSchedule(model.num_blocks)
    for progress in (0.0, 0.1, 0.3, 0.6, 1.0):
        blocks = schedule.trainable_blocks(progress, stage=1)
        model.set_trainable(blocks)
        names = _trainable(model)
        for b in range(model.num_blocks):
            in_block = {n for n in names if n.startswith(f"encoder.blocks.{b}.")}
            assert bool(in_block) == (b in blocks)
        stem_and_first = ("encoder.patch_embedding", "encoder.cls_token", "encoder.blocks.0.")
        assert not any(n.startswith(stem_and_first) for n in names)
        assert not any("mask_token" in n or "norm_cross_attn" in n for n in names)
        assert ("encoder.norm.weight" in names) == (3 in blocks)
    model.set_trainable(range(4), stem=True)
    names = _trainable(model)
    assert "encoder.patch_embedding.patch_embeddings.weight" in names and "encoder.cls_token.token" in names
    assert not any("mask_token" in n or "norm_cross_attn" in n or "position_embeddings" in n for n in names)


def test_frozen_modules_stay_in_eval_mode_while_training() -> None:
    model = build_classifier(DEEP, 1)
    model.set_trainable((3,))
    model.train()
    assert model.training and model.head.training
    assert model.encoder.blocks[3].training
    assert not any(m.training for m in model.encoder.blocks[0].modules())
    assert not model.encoder.patch_embedding.dropout.training
    # Dropout is 0.1: a frozen block must behave deterministically in train mode.
    x = torch.randn(2, 1 + model.encoder.num_patches, DEEP.hidden_size)
    block = model.encoder.blocks[1]
    assert torch.equal(block(x), block(x))
    model.eval()
    assert not model.encoder.blocks[3].training


def test_param_groups_have_discriminative_lrs() -> None:
    cfg = FinetuneConfig()
    model = build_classifier(DEEP, 1)
    groups = param_groups(model, cfg, include_backbone=False)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("head", 1e-3), ("block3", 5e-4), ("block2", 2.5e-4), ("block1", 1e-4)
    ]
    assert any(p is model.encoder.norm.weight for p in groups[1]["params"])
    full = param_groups(model, cfg, include_backbone=True)
    assert full[-1]["name"] == "backbone" and full[-1]["lr"] == cfg.backbone_lr
    in_groups = {id(p) for g in full for p in g["params"]}
    assert in_groups == {id(p) for n, p in model.named_parameters() if n in
                         {f"encoder.{t}" for t in model.tunable_names} | {"head.weight", "head.bias"}}


def test_trainable_state_shrinks_when_more_is_frozen() -> None:
    model = build_classifier(DEEP, 3)
    sizes = []
    for blocks in ((3, 2, 1), (3, 2), (3,), ()):
        model.set_trainable(blocks)
        state = trainable_state(model)
        assert set(state) == _trainable(model)
        sizes.append(state_nbytes(state))
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
    assert sizes[-1] == (DEEP.hidden_size + 1) * 3 * 4  # float32 head only


def test_progressive_finetune_reduces_loss_on_separable_task() -> None:
    cfg = FinetuneConfig(probe_steps=10, stage_steps=20, batch_size=4, head_lr=1e-2, seed=0)
    tuner = Finetuner(build_classifier(TINY, 1, seed=0), cfg, Bright())
    result = tuner.fit()
    assert len(result.losses) == 30
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first
    # Head only during the probe, then block 1 joins at 10% of stage 1 (TINY has 2 blocks).
    assert len(set(result.trainable_params[:10])) == 1
    assert result.trainable_params[10] == result.trainable_params[0]
    assert result.trainable_params[12] > result.trainable_params[0]
    probs, labels = tuner.predict(Bright(8, seed=1))
    assert probs.shape == labels.shape == (8, 1)
    assert ((probs > 0.5) == (labels > 0.5)).mean() >= 0.75


def test_pooling_picks_the_tokens_the_head_reads() -> None:
    torch.manual_seed(0)
    volumes = Bright(3).volumes
    heads = {pooling: build_classifier(TINY, 2, seed=0, pooling=pooling).eval() for pooling in FeaturePooling}
    tokens = heads[FeaturePooling.cls].encoder(volumes)  # same seed: the same encoder in every classifier
    with torch.no_grad():
        assert torch.allclose(heads[FeaturePooling.cls].features(volumes), tokens[:, 0], atol=1e-6)
        assert torch.allclose(heads[FeaturePooling.mean_patch].features(volumes), tokens[:, 1:].mean(1), atol=1e-6)
        both = heads[FeaturePooling.cls_mean_patch].features(volumes)
        assert both.shape == (3, 2 * TINY.hidden_size)
        assert torch.allclose(both, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1), atol=1e-6)
    assert heads[FeaturePooling.cls_mean_patch].head.in_features == 2 * TINY.hidden_size
    assert heads[FeaturePooling.cls_mean_patch](volumes).shape == (3, 2)
    # Mean pooling trains like CLS does (the separable task is learnt).
    cfg = FinetuneConfig(probe_steps=10, stage_steps=20, batch_size=4, head_lr=1e-2, seed=0, pooling=FeaturePooling.mean_patch)
    tuner = Finetuner(build_classifier(TINY, 1, seed=0, pooling=cfg.pooling), cfg, Bright())
    losses = tuner.fit().losses
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])


def test_modes_differ_as_expected() -> None:
    pretrained = build_classifier(TINY, 1, seed=0).encoder.state_dict()
    changed = {}
    for mode in ("linear_probe", "progressive", "full"):
        model = build_classifier(TINY, 1, encoder_state=pretrained)
        cfg = FinetuneConfig(mode=mode, probe_steps=2, stage_steps=4, batch_size=4)
        Finetuner(model, cfg, Bright(8)).fit()
        after = model.encoder.state_dict()
        changed[mode] = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks") else "")
                         for k in after if not torch.equal(after[k], pretrained[k])}
    assert changed["linear_probe"] == set()
    assert changed["progressive"] == {"blocks.1", "norm"}
    assert changed["full"] == {"patch_embedding", "cls_token", "blocks.0", "blocks.1", "norm"}


def test_from_scratch_is_a_fresh_encoder() -> None:
    pretrained = {k: v + 1 for k, v in build_classifier(TINY, 1, seed=0).encoder.state_dict().items()}
    loaded = build_classifier(TINY, 1, encoder_state=pretrained)
    assert torch.equal(loaded.encoder.norm.weight, pretrained["norm.weight"])
    scratch = build_classifier(TINY, 1, seed=1)
    assert not torch.equal(scratch.encoder.blocks[0].mlp.linear1.weight,
                           build_classifier(TINY, 1, seed=0).encoder.blocks[0].mlp.linear1.weight)
    with pytest.raises(ValueError, match="encoder state"):
        build_classifier(TINY, 1, encoder_state={"norm.weight": torch.ones(3)})


def test_label_shape_and_config_errors() -> None:
    cfg = FinetuneConfig(label_names=["a", "b"], probe_steps=1, stage_steps=0)
    with pytest.raises(ValueError, match="labels must have shape"):
        Finetuner(build_classifier(TINY, 2), cfg, Bright(4)).fit()
    with pytest.raises(ValueError, match="outputs"):
        Finetuner(build_classifier(TINY, 1), cfg, Bright(4))
    with pytest.raises(ConfigError, match="block_lrs"):
        FinetuneConfig(block_lrs=[1e-4])
    with pytest.raises(ConfigError, match="unfreeze_fractions"):
        FinetuneConfig(unfreeze_fractions=[0.6, 0.3, 0.1])
    with pytest.raises(ConfigError, match="mode"):
        FinetuneConfig(mode="partial")
    with pytest.raises(ConfigError, match="label_names"):
        FinetuneConfig(label_names=["a", "a"])


def _linear_probe(offset: float) -> tuple[Finetuner, list[float]]:
    """A 30-step linear probe at the recipe's head LR (1e-3) on features shifted by ``offset``
    (the final LayerNorm's bias: every feature dimension moves by it)."""
    cfg = FinetuneConfig(mode="linear_probe", probe_steps=30, stage_steps=0, batch_size=4, seed=0)
    assert cfg.head_lr == 1e-3
    model = build_classifier(TINY, 1, seed=0)
    with torch.no_grad():
        model.encoder.norm.bias += offset
    tuner = Finetuner(model, cfg, Bright(16))
    return tuner, tuner.fit().losses


def test_head_learns_despite_a_feature_offset_of_100() -> None:
    """On raw features (before standardisation) this probe stayed at chance (held-out accuracy
    0.5, first losses about 7.5 with the offset); standardised, the offset is gone exactly."""
    shifted, losses = _linear_probe(100.0)
    plain, plain_losses = _linear_probe(0.0)
    assert sum(losses[-5:]) / 5 < 0.5
    probs, labels = shifted.predict(Bright(16, seed=1))
    assert ((probs > 0.5) == (labels > 0.5)).mean() >= 0.9
    assert losses == pytest.approx(plain_losses, abs=1e-4)
    assert probs == pytest.approx(plain.predict(Bright(16, seed=1))[0], abs=1e-4)


def test_feature_statistics_come_from_the_training_scans_and_never_train() -> None:
    dataset = Bright(8)
    pretrained = build_classifier(TINY, 1, seed=0).encoder.state_dict()
    model = build_classifier(TINY, 1, encoder_state=pretrained)
    assert not model.standardizer.fitted
    with torch.no_grad():
        expected = build_classifier(TINY, 1, encoder_state=pretrained).eval().features(dataset.volumes)
    # Mode full: every encoder weight changes, the statistics stay those of the starting encoder.
    tuner = Finetuner(model, FinetuneConfig(mode="full", probe_steps=2, stage_steps=4, batch_size=4), dataset)
    tuner.fit()
    assert not torch.equal(model.encoder.norm.weight, pretrained["norm.weight"])
    assert model.standardizer.count.item() == 8
    assert torch.allclose(model.standardizer.mean, expected.mean(0), atol=1e-6)
    assert torch.allclose(model.standardizer.std, (expected.var(0, correction=0) + 1e-5).sqrt(), atol=1e-6)
    # Buffers: never trainable, so never in a phase-2 reply or an optimizer group.
    assert not any(name.startswith(STANDARDIZER_PREFIX) for name, _ in model.named_parameters())
    model.set_trainable(range(model.num_blocks), stem=True)
    assert not any(name.startswith(STANDARDIZER_PREFIX) for name in trainable_state(model))
    with pytest.raises(ValueError, match="standardiser"):
        model.standardizer.fit(torch.full((2, TINY.hidden_size), float("nan")))


def test_load_classifier_reproduces_the_outputs_exactly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = build_classifier(TINY, 2, seed=3, pooling=FeaturePooling.mean_patch)
    cfg = FinetuneConfig(label_names=["a", "b"], probe_steps=2, stage_steps=2, batch_size=4, pooling=FeaturePooling.mean_patch)

    class TwoTasks(Bright):
        def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            volume, label = super().__getitem__(index)
            return volume, torch.stack([label, 1 - label]).float()

    tuner = Finetuner(model, cfg, TwoTasks(8))
    tuner.fit()
    weights = save_checkpoint(
        tmp_path / "classifier", model.state_dict(), TINY, kind=f"local-{CLASSIFIER_KIND_SUFFIX}",
        label_names=["a", "b"], pooling=FeaturePooling.mean_patch.value,
    )
    loaded, card = load_classifier(weights)
    assert loaded.standardizer.fitted and card["label_names"] == ["a", "b"]
    volumes = Bright(4, seed=5).volumes
    with torch.no_grad():
        assert torch.equal(loaded.eval()(volumes), model.eval()(volumes))

    # A checkpoint saved before the standardiser existed still loads; its head reads raw features.
    old = {k: v for k, v in model.state_dict().items() if not k.startswith(STANDARDIZER_PREFIX)}
    weights = save_checkpoint(tmp_path / "old", old, TINY, kind=f"local-{CLASSIFIER_KIND_SUFFIX}",
                              label_names=["a", "b"], pooling=FeaturePooling.mean_patch.value)
    loaded, _ = load_classifier(weights)
    assert not loaded.standardizer.fitted
    with torch.no_grad():
        assert torch.equal(loaded.eval()(volumes), model.head(model.features(volumes)))

    # A classifier without statistics (a federation's global one) says how to get them.
    unfitted = build_classifier(TINY, 1)
    weights = save_checkpoint(tmp_path / "global", unfitted.state_dict(), TINY, kind=f"global-{CLASSIFIER_KIND_SUFFIX}",
                              label_names=["a"], pooling="cls")
    with caplog.at_level(logging.WARNING):
        load_classifier(weights)
    assert "fit_standardizer" in caplog.text


def _inputs_seen(flip_lr_prob: float, steps: int = 12) -> tuple[Bright, list[torch.Tensor]]:
    """The volumes a full fine-tune fed its classifier at each step (not the standardiser's
    fit), one per batch of one."""
    data = Bright(count=4)
    classifier = build_classifier(TINY, 1, None, seed=0)
    seen: list[torch.Tensor] = []
    cfg = FinetuneConfig(mode="full", probe_steps=0, stage_steps=steps, batch_size=1, flip_lr_prob=flip_lr_prob)
    finetuner = Finetuner(classifier, cfg, data)
    classifier.fit_standardizer(data)  # fitted here, so fit() is the only forward left to record
    classifier.register_forward_pre_hook(lambda module, args: seen.append(args[0][0].clone()) if module.training else None)
    finetuner.fit()
    return data, seen[-steps:]


def test_training_volumes_are_flipped_left_right_only_and_as_often_as_configured() -> None:
    data, never = _inputs_seen(0.0)
    originals = list(data.volumes)
    assert all(any(torch.equal(x, v) for v in originals) for x in never)
    _, always = _inputs_seen(1.0)
    # Flipped along x (the last axis) only: not any volume itself, nor flipped along z or y.
    assert all(any(torch.equal(x, v.flip(-1)) for v in originals) for x in always)
    assert not any(torch.equal(x, v) or torch.equal(x, v.flip(-2)) for x in always for v in originals)
    _, half = _inputs_seen(0.5, steps=40)
    flipped = sum(any(torch.equal(x, v.flip(-1)) for v in originals) for x in half)
    assert 8 <= flipped <= 32  # binomial(40, 0.5): outside this once in ~10^4
    assert all(torch.equal(a, b) for a, b in zip(half, _inputs_seen(0.5, steps=40)[1]))  # seeded
    with pytest.raises(ConfigError, match="flip_lr_prob"):
        FinetuneConfig(flip_lr_prob=1.5)


@pytest.mark.parametrize("mode", ["linear_probe", "progressive"])
def test_head_only_steps_on_features_computed_once_train_the_same_head(mode: str) -> None:
    """The head-only phases read each scan's frozen features from a cache: the same losses and
    weights as running the encoder at every step, with and without flips."""
    data = Bright(count=10)
    results = []
    for cached in (True, False):
        classifier = build_classifier(TINY, 1, None, seed=3)
        finetuner = Finetuner(classifier, FinetuneConfig(mode=mode, probe_steps=15, stage_steps=10, batch_size=3), data)
        finetuner.cache_head_only_features = cached
        calls = []
        classifier.encoder.register_forward_hook(lambda *args: calls.append(1))
        results.append((finetuner.fit().losses, classifier.state_dict(), len(calls)))
    (cached_losses, cached_state, cached_calls), (losses, state, calls) = results
    assert cached_losses == pytest.approx(losses, rel=1e-5, abs=1e-6)
    assert all(torch.allclose(cached_state[k], state[k], atol=1e-6) for k in state)
    assert cached_calls < calls  # the encoder ran fewer times


def test_a_short_head_only_phase_on_many_scans_runs_the_encoder_per_step_instead() -> None:
    """Caching costs a forward per scan (two with flips): a phase of fewer volumes than that
    (a phase-2 round of a few steps at a large site) runs the encoder per step, as before."""
    data = Bright(count=10)
    classifier = build_classifier(TINY, 1, None, seed=3)
    finetuner = Finetuner(classifier, FinetuneConfig(mode="linear_probe", probe_steps=0, stage_steps=3, batch_size=2), data)
    calls = []
    classifier.encoder.register_forward_hook(lambda *args: calls.append(1))
    finetuner.fit()
    assert len(calls) == 10 // 2 + 3  # the standardiser's fit (5 batches of 2), then one per step
