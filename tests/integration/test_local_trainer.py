"""LocalTrainer: one site's rounds, what it sends, what it keeps."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import Dataset

from ctfed.client.train import CENTER_KEY, DECODER_PREFIX, IBOT_CENTER_KEY, LocalTrainer, NonFiniteLossError
from ctfed.common.config import AugmentConfig, ConfigError, MIMObjective, ModelConfig, TrainConfig

from helpers import MODEL, Volumes, tiny_trainer as _trainer  # tests/helpers.py (tests/ is on sys.path)


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trains_student_and_emas_teacher() -> None:
    trainer = _trainer()
    start = trainer.encoder_state()
    trainer.set_global_encoder(start)
    result = trainer.train_round(0)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    assert result.num_examples == 2 * trainer.train_cfg.batch_size
    assert result.seconds > 0
    assert 0 < result.data_seconds < result.seconds
    after = trainer.encoder_state()
    assert not _states_equal(start, after)
    assert trainer.encoder_state().keys() == trainer.student.encoder.state_dict().keys()
    teacher = dict(trainer.teacher.encoder.state_dict())
    changed = [k for k in after if not torch.equal(after[k], teacher[k])]
    assert changed, "teacher must lag behind the student when momentum < 1"
    # The teacher moved from the start, but only by (1 - momentum) of the way.
    assert any(not torch.equal(teacher[k], start[k]) for k in changed)


def test_rounds_are_reproducible_and_differ_between_rounds() -> None:
    first, second = _trainer(seed=3), _trainer(seed=3)
    assert first.train_round(0).losses == second.train_round(0).losses
    assert _states_equal(first.encoder_state(), second.encoder_state())
    other = _trainer(seed=3)
    assert other.train_round(1).losses != _trainer(seed=3).train_round(0).losses


def test_sites_share_head_initialisation_but_not_crops() -> None:
    a, b = _trainer(seed=0), _trainer(seed=1)
    assert _states_equal(a.student.head.state_dict(), b.student.head.state_dict())
    assert a.train_round(0).losses != b.train_round(0).losses


def test_local_state_round_trips_into_a_fresh_trainer() -> None:
    trainer = _trainer()
    trainer.train_round(0)
    state = trainer.local_state()
    assert CENTER_KEY in state and state[CENTER_KEY].abs().sum() > 0
    assert any(k.startswith("optimizer.") for k in state)
    assert not any(k.startswith("encoder.") for k in state)  # the student encoder travels, not stays

    fresh = _trainer()
    fresh.load_local_state(state)
    assert _states_equal(fresh.local_state(), state)

    # A fresh trainer that loaded both halves continues exactly like the original one
    # (both receive the same "global" encoder, as the ClientApp does every round).
    global_state = trainer.encoder_state()
    fresh.set_global_encoder(global_state)
    trainer.set_global_encoder(global_state)
    assert fresh.train_round(1).losses == pytest.approx(trainer.train_round(1).losses, rel=1e-5)


def test_load_local_state_rejects_foreign_state() -> None:
    trainer = _trainer()
    state = trainer.local_state()
    with pytest.raises(ValueError, match="unknown keys"):
        trainer.load_local_state({**state, "something.else": torch.zeros(1)})
    with pytest.raises(ValueError, match="centre"):
        trainer.load_local_state({**state, CENTER_KEY: torch.zeros(1, 3)})


def test_set_global_encoder_loads_exactly_and_teacher_policy() -> None:
    donor = _trainer(seed=5)
    donor.train_round(0)
    global_state = donor.encoder_state()

    reset = _trainer()
    reset.train_round(0)
    reset.set_global_encoder(global_state)
    assert _states_equal(reset.encoder_state(), global_state)
    assert _states_equal(dict(reset.teacher.encoder.state_dict()), global_state)

    keep = _trainer(teacher_on_new_global="keep")
    keep.set_global_encoder(donor.encoder_state())  # the first global encoder seeds the teacher
    keep.train_round(0)
    teacher_before = {k: v.clone() for k, v in keep.teacher.encoder.state_dict().items()}
    keep.set_global_encoder(global_state)
    assert _states_equal(keep.encoder_state(), global_state)
    assert _states_equal(dict(keep.teacher.encoder.state_dict()), teacher_before)

    with pytest.raises(ValueError, match="global encoder"):
        reset.set_global_encoder({k: v for k, v in global_state.items() if k != "norm.weight"})


def test_non_finite_loss_is_a_clear_error() -> None:
    trainer = _trainer()
    with torch.no_grad():
        trainer.student.head.last_layer.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="round 0, local step 0"):
        trainer.train_round(0)


def test_train_config_validates_teacher_policy() -> None:
    with pytest.raises(ConfigError, match="teacher_on_new_global"):
        TrainConfig(teacher_on_new_global="average")


def test_mim_round_trains_mask_token_and_reports_both_losses() -> None:
    trainer = _trainer(mim_weight=1.0)
    token = trainer.student.encoder.mask_token.token
    assert token.requires_grad
    before = token.detach().clone()
    grads: list[torch.Tensor] = []
    token.register_hook(lambda grad: grads.append(grad.detach().clone()))
    result = trainer.train_round(0)
    assert len(result.mim_losses) == len(result.dino_losses) == len(result.losses) == 2
    assert all(math.isfinite(x) for x in result.losses + result.mim_losses + result.dino_losses)
    assert result.losses == pytest.approx([d + m for d, m in zip(result.dino_losses, result.mim_losses)], rel=1e-5)
    assert any(g.abs().sum() > 0 for g in grads), "masked tokens must send gradient to the mask token"
    assert not torch.equal(token.detach(), before)
    assert trainer.local_state()[IBOT_CENTER_KEY].abs().sum() > 0


def test_mim_off_is_plain_dino_with_a_frozen_mask_token() -> None:
    trainer = _trainer(mim_weight=0.0)
    before = trainer.student.encoder.mask_token.token.detach().clone()
    assert not trainer.student.encoder.mask_token.token.requires_grad
    result = trainer.train_round(0)
    assert result.mim_losses == [] and result.losses == result.dino_losses
    assert torch.equal(trainer.student.encoder.mask_token.token, before)
    # The DINO part of a MIM run sees the same crops, but masking changes the student's input.
    assert _trainer(mim_weight=1.0).train_round(0).dino_losses != result.dino_losses


def test_loss_weights_scale_the_parts() -> None:
    result = _trainer(dino_weight=0.5, mim_weight=2.0).train_round(0)
    expected = [0.5 * d + 2.0 * m for d, m in zip(result.dino_losses, result.mim_losses)]
    assert result.losses == pytest.approx(expected, rel=1e-5)


def test_last_layer_stays_fixed_for_the_first_steps() -> None:
    # 3 of the 6-step horizon (local_steps 2 x schedule_rounds 3): rounds 0 and 1 overlap it.
    trainer = _trainer(freeze_last_layer_fraction=0.5)
    weight = trainer.student.head.last_layer.weight
    start = weight.detach().clone()
    mlp_start = trainer.student.head.mlp[0].weight.detach().clone()
    trainer.train_round(0)
    assert torch.equal(weight, start)
    assert not torch.equal(trainer.student.head.mlp[0].weight, mlp_start)
    trainer.train_round(1)  # global steps 2 (frozen) and 3 (free)
    assert not torch.equal(weight, start)


def test_teacher_temperature_warms_up_over_global_steps() -> None:
    # 4 of the 6-step horizon.
    trainer = _trainer(teacher_temp=0.04, teacher_temp_warmup=0.02, teacher_temp_warmup_fraction=4 / 6)
    temps = []
    for step in range(6):
        trainer._apply_schedules(step)
        assert trainer.ibot_loss.teacher_temp == trainer.loss_fn.teacher_temp
        temps.append(trainer.loss_fn.teacher_temp)
    assert temps == pytest.approx([0.02, 0.025, 0.03, 0.035, 0.04, 0.04])
    off = _trainer(teacher_temp_warmup_fraction=0.0)
    off._apply_schedules(0)
    assert off.loss_fn.teacher_temp == pytest.approx(0.07)


def test_mim_local_state_round_trips_and_requires_ibot_centre() -> None:
    trainer = _trainer()
    trainer.train_round(0)
    state = trainer.local_state()
    assert "optimizer.encoder.mask_token.token.exp_avg" in state
    fresh = _trainer()
    fresh.load_local_state(state)
    assert _states_equal(fresh.local_state(), state)
    with pytest.raises(ValueError, match="missing keys"):
        fresh.load_local_state({k: v for k, v in state.items() if k != IBOT_CENTER_KEY})


def test_mae_objective_reconstructs_masked_patches_with_a_local_decoder() -> None:
    trainer = _trainer(mim_objective=MIMObjective.mae)
    decoder = trainer.student.decoder
    assert decoder is not None and trainer.teacher.decoder is None  # no EMA decoder
    decoder_start = {k: v.clone() for k, v in decoder.state_dict().items()}
    teacher_start = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    # MAE drops the masked patches: the encoder's mask token (iBOT's) is frozen and unused.
    assert not trainer.student.encoder.mask_token.token.requires_grad
    result = trainer.train_round(0)
    assert len(result.mim_losses) == len(result.dino_losses) == 2
    assert result.losses == pytest.approx([d + m for d, m in zip(result.dino_losses, result.mim_losses)], rel=1e-5)
    # Standardised patches: predicting nothing scores about 1; an untrained decoder is near it.
    assert all(0.3 < m < 3.0 for m in result.mim_losses)
    assert not _states_equal(decoder.state_dict(), decoder_start)
    assert not _states_equal(trainer.teacher.state_dict(), teacher_start)  # the EMA still runs
    # The decoder stays at the site: not in what is sent, in what is kept, and it round-trips.
    assert not any("decoder" in key for key in trainer.encoder_state())
    state = trainer.local_state()
    assert any(key.startswith(DECODER_PREFIX) for key in state)
    fresh = _trainer(mim_objective=MIMObjective.mae)
    fresh.load_local_state(state)
    assert _states_equal(fresh.local_state(), state)
    with pytest.raises(ValueError, match="mim_objective"):
        _trainer().load_local_state(state)
    with pytest.raises(ValueError, match="mim_objective"):
        fresh.load_local_state(_trainer().local_state())


class Ramps(Dataset):
    """Linear intensity ramps in random directions: a masked patch's normalised voxels are
    predictable from the visible ones (the same ramp), unlike noise."""

    def __init__(self, count: int = 6, seed: int = 0, size: int = MODEL.image_size) -> None:
        generator = torch.Generator().manual_seed(seed)
        grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, size)] * 3, indexing="ij"))
        ramps = []
        for _ in range(count):
            ramp = (torch.randn(3, 1, 1, 1, generator=generator) * grid).sum(0)
            ramps.append(((ramp - ramp.min()) / (ramp.max() - ramp.min())).expand(MODEL.in_channels, -1, -1, -1))
        self.volumes = torch.stack(ramps)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.volumes[index]


def test_mae_reconstruction_improves_with_training() -> None:
    # Views off: this measures the reconstruction of the ramps themselves (per-channel window
    # jitter and noise are unpredictable by design, and 30 steps do not average them out).
    no_views = AugmentConfig(flip_lr_prob=0.0, affine_prob=0.0, window_prob=0.0, noise_prob=0.0, blur_prob=0.0)
    trainer = LocalTrainer(
        MODEL,
        TrainConfig(local_steps=15, schedule_rounds=3, lr=4e-3, lr_reference_batch=2, dino_weight=0.0,
                    mim_objective=MIMObjective.mae, augment=no_views),
        Ramps(),
        seed=0,
    )
    first = trainer.train_round(0).mim_losses
    trainer.train_round(1)
    last = trainer.train_round(2).mim_losses
    assert sum(last) / len(last) < 0.95 * sum(first) / len(first)


def test_mae_alone_makes_no_local_crops_and_never_runs_the_teacher() -> None:
    def teacher_calls(**train: object) -> tuple[int, int]:
        trainer = _trainer(mim_objective=MIMObjective.mae, num_local_crops=2, **train)
        calls = []
        forward = trainer.teacher.forward
        trainer.teacher.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)  # type: ignore[method-assign]
        trainer.train_round(0)
        return trainer.multicrop.num_crops, len(calls)

    # With DINO on, every step runs the teacher on the global crops; MAE alone needs neither
    # the teacher nor the local crops that only DINO reads.
    assert teacher_calls(dino_weight=1.0) == (4, 2)
    assert teacher_calls(dino_weight=0.0) == (2, 0)


def test_train_config_validates_mim_fields() -> None:
    with pytest.raises(ConfigError, match="mask_ratio"):
        TrainConfig(mask_ratio=[0.5, 0.1])
    with pytest.raises(ConfigError, match="mask_probability"):
        TrainConfig(mask_probability=1.5)
    with pytest.raises(ConfigError, match="both 0"):
        TrainConfig(dino_weight=0.0, mim_weight=0.0)
    with pytest.raises(ConfigError, match="mim_weight"):
        TrainConfig(mim_weight=-1.0)
    with pytest.raises(ConfigError, match="decoder_hidden"):
        ModelConfig(decoder_hidden=50)
    with pytest.raises(ConfigError, match="decoder_layers"):
        ModelConfig(decoder_layers=0)


def test_cache_larger_than_model_input_trains() -> None:
    """A site's 48^3 cache feeds a 32^3 model: crops are resized to the model's input."""
    cfg = TrainConfig(local_steps=1, schedule_rounds=1)
    trainer = LocalTrainer(MODEL, cfg, Volumes(count=2, size=48), seed=0)
    result = trainer.train_round(0)
    assert all(math.isfinite(x) for x in result.losses)


@pytest.mark.parametrize("mim_weight", [0.0, 1.0])
def test_koleo_adds_its_weighted_term_to_the_loss(mim_weight: float) -> None:
    plain = _trainer(mim_weight=mim_weight).train_round(0)
    assert plain.koleo_losses == []
    result = _trainer(mim_weight=mim_weight, koleo_weight=0.1, batch_size=3).train_round(0)
    assert len(result.koleo_losses) == 2 and all(math.isfinite(k) for k in result.koleo_losses)
    mims = result.mim_losses or [0.0] * 2
    expected = [d + mim_weight * m + 0.1 * k for d, m, k in zip(result.dino_losses, mims, result.koleo_losses)]
    assert result.losses == pytest.approx(expected, rel=1e-5)


def test_koleo_is_refused_with_batch_of_one_and_under_local_dp() -> None:
    from ctfed.common.config import LocalDPConfig, load_run_config

    with pytest.raises(ConfigError, match="batch_size >= 2"):
        TrainConfig(koleo_weight=0.1, batch_size=1)
    with pytest.raises(ConfigError, match="koleo_weight must be >= 0"):
        TrainConfig(koleo_weight=-1.0)
    with pytest.raises(ConfigError, match="koleo_weight > 0 is not available with local DP-SGD"):
        load_run_config(["train.koleo_weight=0.1", "privacy.mode=local"])
    cfg = TrainConfig(local_steps=1, koleo_weight=0.1)
    with pytest.raises(ValueError, match="no per-volume gradient"):
        LocalTrainer(MODEL, cfg, Volumes(), dp=LocalDPConfig())


def test_lr_scales_with_the_batch_and_warms_up_by_default() -> None:
    """DINO's linear scaling rule and warm-ups are on by default: at a site's small batch an
    unscaled, cold-started 5e-4 reaches the teacher's input-independent target in a few steps."""
    cfg = TrainConfig(local_steps=10, schedule_rounds=10, batch_size=4)
    trainer = LocalTrainer(MODEL, cfg, Volumes(), seed=0)
    assert cfg.scaled_lr == pytest.approx(5e-4 * 4 / 256)
    warmup = cfg.fraction_steps(cfg.warmup_fraction)
    assert warmup == 10
    lrs = [trainer.lr_schedule(step) for step in range(100)]
    assert lrs[0] == 0.0 and lrs[warmup] == pytest.approx(cfg.scaled_lr) == max(lrs)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1 : warmup + 1]))
    assert trainer.freeze_last_layer_steps == 1
    temps = [trainer.teacher_temp_schedule(step) for step in (0, 15, 30, 99)]
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07])
    trainer._apply_schedules(warmup)
    assert [group["lr"] for group in trainer.optimizer.param_groups] == pytest.approx([cfg.scaled_lr] * 2)


def test_a_cache_unlike_the_models_inputs_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    class OtherWindows(Volumes):
        channel_stats = {"mean": [0.9, 0.25, 0.2], "std": [0.05, 0.3, 0.19], "volumes": 5}

    with caplog.at_level("WARNING", logger="ctfed.client.train"):
        LocalTrainer(MODEL, TrainConfig(), Volumes(), seed=0)
    assert "does not look like" not in caplog.text
    with caplog.at_level("WARNING", logger="ctfed.client.train"):
        LocalTrainer(MODEL, TrainConfig(), OtherWindows(), seed=0)
    assert "does not look like" in caplog.text and "channel 0" in caplog.text and "channel 1" not in caplog.text
