"""Hydra structured configs: composition, presets, validation and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctfed.common.config import (
    ConfigError,
    MIMObjective,
    RunConfig,
    Strategy,
    load_run_config,
    read_run_config,
    save_run_config,
)


def test_defaults_are_the_small_demo_federation() -> None:
    cfg = load_run_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.model.name == "tiny"
    assert cfg.synth.sites == 3
    assert cfg.preprocess.output_size == cfg.model.image_size
    assert cfg.federation.strategy is Strategy.fedavg


def test_model_preset_and_overrides_compose() -> None:
    cfg = load_run_config(["model=vit_b", "federation.rounds=5", "train.lr=1e-4"])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.patch_size) == (768, 12, 12)
    # The cache size follows the model's input size unless set explicitly.
    assert cfg.preprocess.output_size == 96
    assert cfg.federation.rounds == 5
    assert cfg.train.lr == pytest.approx(1e-4)


def test_typo_in_key_lists_valid_keys_and_suggests_the_closest() -> None:
    with pytest.raises(ConfigError) as info:
        load_run_config(["federation.roundz=3"])
    message = str(info.value)
    assert "roundz" in message
    assert "Valid keys at federation: rounds" in message
    assert "Did you mean 'federation.rounds'?" in message
    assert "+federation" not in message  # Hydra's append advice would add a silently ignored key


def test_typo_in_top_level_section() -> None:
    with pytest.raises(ConfigError, match="Valid keys at the top level: model, preprocess"):
        load_run_config(["modle.hidden_size=12"])


def test_wrong_type_is_reported() -> None:
    with pytest.raises(ConfigError, match="abc"):
        load_run_config(["federation.rounds=abc"])


def test_unknown_preset_lists_available_ones() -> None:
    with pytest.raises(ConfigError, match="vit_b"):
        load_run_config(["model=huge"])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.hidden_size=50", "divisible by model.num_heads"),
        ("model.patch_size=7", "multiple of"),
        ("train.lr=0", "train.lr"),
        ("federation.fraction_train=1.5", "fraction_train"),
        ("preprocess.output_size=24", "smaller than model.image_size"),
        ("train.global_crop_scale=[0.9,0.1]", "global_crop_scale"),
        ("train.mim_objective=mim", "mim_objective"),
        ("model.decoder_heads=5", "decoder_hidden"),
    ],
)
def test_value_rules(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_run_config([override])


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_run_config(["federation.rounds=4", "model=small", "train.mim_objective=mae"])
    assert cfg.train.mim_objective is MIMObjective.mae
    assert (cfg.model.decoder_hidden, cfg.model.decoder_layers) == (192, 2)
    path = tmp_path / "config.yaml"
    save_run_config(cfg, path)
    assert read_run_config(path) == cfg


def test_saved_config_with_unknown_key_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("federation:\n  roundz: 3\n")
    with pytest.raises(ConfigError, match="Valid keys at federation"):
        read_run_config(path)
