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
from ctfed.simulations.config import SimulationRunConfig, load_simulation_config, read_simulation_config


def test_defaults_are_the_small_demo_federation() -> None:
    cfg = load_simulation_config()
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


# ---------------------------------------------------------------- configs by owner (issue #15)


def test_the_coordinator_root_declares_no_simulation_section() -> None:
    """common/ owns the run the coordinator reads; the simulation's sections live beside it."""
    from dataclasses import fields

    from ctfed.common.config import SIMULATION_SECTIONS

    cfg = load_run_config()
    assert type(cfg) is RunConfig
    assert not {f.name for f in fields(RunConfig)} & set(SIMULATION_SECTIONS)
    # The names common drops from files it reads are exactly the ones the simulation adds.
    added = tuple(f.name for f in fields(SimulationRunConfig) if f.name not in {g.name for g in fields(RunConfig)})
    assert added == SIMULATION_SECTIONS
    # Same values for every section both roots have: the split changed no default.
    simulated = load_simulation_config()
    assert all(getattr(cfg, f.name) == getattr(simulated, f.name) for f in fields(RunConfig))


def test_the_coordinator_reads_a_simulation_file_without_its_sections(tmp_path: Path) -> None:
    """`ctfed simulate --show-config > run.yaml` is how a coordinator writes its config (README)."""
    simulated = load_simulation_config(["federation.rounds=3", "synth.sites=5", "simulation.faults=[{site:1,kind:crash}]"])
    path = tmp_path / "run.yaml"
    save_run_config(simulated, path)
    cfg = read_run_config(path)
    assert type(cfg) is RunConfig
    assert cfg.federation.rounds == 3 and cfg.model == simulated.model and cfg.train == simulated.train
    assert not hasattr(cfg, "synth")
    # The simulation's own root reads the same file whole.
    assert read_simulation_config(path) == simulated
    # Only the simulation's sections are dropped: any other unknown section is still an error.
    path.write_text(path.read_text() + "federaton:\n  rounds: 9\n")
    with pytest.raises(ConfigError, match="Valid keys at the top level: model, preprocess"):
        read_run_config(path)


def test_one_default_per_knob() -> None:
    """The dataclass is the only default of each knob: the demo preset, the Flower app and the
    ServerApp read it instead of restating it (issue #15: local_steps lived in five places)."""
    import tomllib

    from omegaconf import OmegaConf

    from ctfed.common.config import FederationConfig, TrainConfig
    from ctfed.simulations.config import SynthConfig
    from ctfed.simulations.runtime.flower_app import RUN_CONFIG_DEFAULTS

    root = Path(__file__).parents[2]
    assert not OmegaConf.load(root / "conf" / "preset" / "quick.yaml")  # the demo is the defaults
    for cfg in (load_run_config(), load_simulation_config(), load_simulation_config(["preset=quick"])):
        assert cfg.train.local_steps == TrainConfig().local_steps
        assert cfg.federation.rounds == FederationConfig().rounds
        assert (cfg.federation.min_sites, cfg.federation.fraction_train) == (FederationConfig().min_sites, 1.0)
    assert load_simulation_config().synth == SynthConfig()
    app_config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config["local-steps"] == app_config["num-server-rounds"] == 0  # 0: the config's own
    assert RUN_CONFIG_DEFAULTS["local-steps"] == RUN_CONFIG_DEFAULTS["num-server-rounds"] == 0
    server_app = (root / "server" / "app.py").read_text()
    assert ".get(key, 0)" in server_app and ".get(key, 2)" not in server_app


def test_a_run_folder_written_before_the_split_still_loads_and_resumes(tmp_path: Path) -> None:
    """tests/data/main_run: config.yaml and results.json's ``config`` of a tiny ``ctfed simulate``
    run on main before the split (6ca6326; synth.scans_per_site=2), both with every section."""
    import json
    from dataclasses import fields

    from ctfed.common.config import to_run_config
    from ctfed.server.results import resumed_config, saved_run_config
    from ctfed.simulations.config import to_simulation_config

    data = Path(__file__).parents[1] / "data" / "main_run"
    saved = json.loads((data / "results_config.json").read_text())["config"]
    simulated = to_simulation_config(saved)
    assert simulated == read_simulation_config(data / "config.yaml")
    # Today's defaults resolve to what main resolved: the split moved no default (only the later
    # auto activation checkpointing did, False -> None, so a submission states the old value).
    then = ["synth.scans_per_site=2", "output_dir=runs", "run_name=main", "train.activation_checkpointing=false"]
    assert simulated == load_simulation_config(then)
    # The coordinator's root reads the same record, less the simulation's sections.
    coordinator = to_run_config(saved)
    assert type(coordinator) is RunConfig
    assert all(getattr(coordinator, f.name) == getattr(simulated, f.name) for f in fields(RunConfig))
    # Resume from that results.json, by the simulation and by a coordinator, with more rounds.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"config": saved, "rounds": []}))
    for schema, submitted in (
        (SimulationRunConfig, load_simulation_config([*then, "federation.rounds=4"])),
        (RunConfig, load_run_config(["output_dir=runs", "run_name=main", "train.activation_checkpointing=false", "federation.rounds=4"])),
    ):
        resumed, changes = resumed_config(saved_run_config(run_dir, schema), submitted)
        assert type(resumed) is schema
        assert changes == {"federation.rounds": {"from": 2, "to": 4}}
        assert resumed.federation.rounds == 4 and resumed.train.schedule_rounds == 2
