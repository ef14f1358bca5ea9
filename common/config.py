"""Structured configuration for every ctfed command.

Each section is a dataclass registered with Hydra's ConfigStore, so a typo in a key or a
wrong type fails at composition time, and value rules that types cannot express are
checked in ``__post_init__`` (which runs when the composed config is turned into objects).
YAML presets live in ``conf/`` (installed as ``ctfed.conf``).
"""

from __future__ import annotations

import difflib
import enum
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_MODULE = "ctfed.conf"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what to change."""


class Strategy(str, enum.Enum):
    """Aggregation strategies the coordinator offers."""

    FEDAVG = "fedavg"


@dataclass
class WindowConfig:
    """A CT display window mapped to one input channel in [0, 1]."""

    name: str = "brain"
    level: float = 40.0
    width: float = 80.0

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ConfigError(f"window '{self.name}': width must be > 0, got {self.width}")


def _fm_ct_windows() -> list[WindowConfig]:
    return [
        WindowConfig("brain", 40.0, 80.0),
        WindowConfig("subdural", 80.0, 200.0),
        WindowConfig("bone", 600.0, 2800.0),
    ]


@dataclass
class ModelConfig:
    """3D ViT encoder and DINO projection head sizes."""

    name: str = "tiny"
    image_size: int = 32
    patch_size: int = 8
    in_channels: int = 3
    hidden_size: int = 48
    num_layers: int = 2
    num_heads: int = 3
    mlp_dim: int = 96
    dropout: float = 0.0
    head_hidden: int = 64
    head_bottleneck: int = 32
    head_prototypes: int = 128

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.image_size ({self.image_size}) must be a multiple of "
                f"model.patch_size ({self.patch_size})"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_heads ({self.num_heads})"
            )
        # MONAI's 3D sin-cos position embedding splits the width over 3 axes x (sin, cos).
        if self.hidden_size % 6:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by 6 "
                "(3D sin-cos position embedding)"
            )
        for name in ("num_layers", "mlp_dim", "head_hidden", "head_bottleneck", "head_prototypes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be > 0")

    @property
    def tokens_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class PreprocessConfig:
    """How a HU volume becomes a cached, training-ready tensor (defaults: FM-CT)."""

    spacing_mm: float = 1.0
    # Voxels above this HU define the head's bounding box (foreground crop).
    foreground_hu: float = 0.0
    output_size: int = 32
    windows: list[WindowConfig] = field(default_factory=_fm_ct_windows)
    # Gantry-tilted stacks: "resample" them onto an orthogonal grid, or "reject".
    gantry_tilt: str = "resample"
    workers: int = 1

    def __post_init__(self) -> None:
        if self.spacing_mm <= 0:
            raise ConfigError("preprocess.spacing_mm must be > 0")
        if self.output_size < 8:
            raise ConfigError("preprocess.output_size must be >= 8")
        if self.gantry_tilt not in ("resample", "reject"):
            raise ConfigError("preprocess.gantry_tilt must be 'resample' or 'reject'")
        if not self.windows:
            raise ConfigError("preprocess.windows must list at least one window")
        if self.workers < 1:
            raise ConfigError("preprocess.workers must be >= 1")


@dataclass
class TrainConfig:
    """Local self-supervised training at a site (one federated round)."""

    local_steps: int = 4
    batch_size: int = 2
    lr: float = 5e-4
    weight_decay: float = 0.04
    grad_clip: float = 3.0
    teacher_momentum: float = 0.994
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    global_crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    local_crop_scale: list[float] = field(default_factory=lambda: [0.2, 0.5])
    num_local_crops: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ConfigError("train.local_steps must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("train.batch_size must be >= 1")
        if self.lr <= 0:
            raise ConfigError("train.lr must be > 0")
        if not 0.0 <= self.teacher_momentum <= 1.0:
            raise ConfigError("train.teacher_momentum must be in [0, 1]")
        for name in ("global_crop_scale", "local_crop_scale"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
                raise ConfigError(f"train.{name} must be [low, high] with 0 < low <= high <= 1")
        if self.num_local_crops < 0:
            raise ConfigError("train.num_local_crops must be >= 0")


@dataclass
class FederationConfig:
    """Rounds and aggregation run by the coordinator."""

    rounds: int = 2
    strategy: Strategy = Strategy.FEDAVG
    fraction_train: float = 1.0
    min_sites: int = 2
    # Seconds the coordinator waits for site replies in one round.
    round_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError("federation.rounds must be >= 1")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError("federation.fraction_train must be in (0, 1]")
        if self.min_sites < 1:
            raise ConfigError("federation.min_sites must be >= 1")


@dataclass
class SynthConfig:
    """Synthetic hospitals for simulations and demos."""

    sites: int = 3
    scans_per_site: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sites < 1 or self.scans_per_site < 1:
            raise ConfigError("synth.sites and synth.scans_per_site must be >= 1")


@dataclass
class SimulationConfig:
    """Flower simulation engine resources."""

    # Folder holding one prepared cache per site (``<dir>/<site>/manifest.json``).
    # Empty: synthesise ``synth.sites`` hospitals and prepare them inside the run folder.
    data_dir: str = ""
    client_cpus: float = 1.0
    # Seconds to wait for the whole federation before giving up.
    timeout_s: float = 3600.0


@dataclass
class RunConfig:
    """Everything one ``ctfed simulate`` run needs; written to the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    # Parent folder for run folders; each run gets ``<output_dir>/<run_name>``.
    output_dir: str = "runs"
    run_name: str = ""

    def __post_init__(self) -> None:
        if self.preprocess.output_size != self.model.image_size:
            raise ConfigError(
                f"preprocess.output_size ({self.preprocess.output_size}) must equal "
                f"model.image_size ({self.model.image_size}); set both, e.g. "
                f"preprocess.output_size={self.model.image_size}"
            )
        if len(self.preprocess.windows) != self.model.in_channels:
            raise ConfigError(
                f"model.in_channels ({self.model.in_channels}) must equal the number of "
                f"preprocess.windows ({len(self.preprocess.windows)})"
            )


def register_configs() -> None:
    """Make the schemas known to Hydra (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)


T = TypeVar("T")


def _valid_keys_hint(message: str, schema: Any) -> str:
    """Name the valid keys of the config node a bad key was aimed at."""
    import re

    match = re.search(r"(?:override|Key) '([\w.]+)'", message)
    if match is None:
        return ""
    parts = match.group(1).split(".")
    node: Any = schema
    path: list[str] = []
    for part in parts:
        names = [f.name for f in fields(node)] if is_dataclass(node) else []
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1)
            where = ".".join(path) or "the top level"
            hint = f"\nValid keys at {where}: {', '.join(names)}"
            if close:
                hint += f"\nDid you mean '{'.'.join(path + [close[0]])}'?"
            return hint
        default = next(f for f in fields(node) if f.name == part)
        node = default.default_factory() if callable(default.default_factory) else default.default  # type: ignore[misc]
        path.append(part)
    return ""


def load_run_config(overrides: Sequence[str] = (), config_name: str = "simulate") -> RunConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides and validate it.

    Raises ConfigError with the valid keys when an override names an unknown key.
    """
    register_configs()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        message = str(err).strip()
        raise ConfigError(f"invalid configuration: {message}{_valid_keys_hint(message, RunConfig())}") from None
    return to_run_config(cfg)


def to_run_config(cfg: DictConfig | dict) -> RunConfig:
    """Validate a composed or saved config and turn it into a RunConfig."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        message = str(err).strip()
        raise ConfigError(f"invalid configuration: {message}{_valid_keys_hint(message, RunConfig())}") from None
    assert isinstance(obj, RunConfig)
    return obj


def save_run_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def read_run_config(path: Path) -> RunConfig:
    if not path.is_file():
        raise ConfigError(f"run config file not found: {path}")
    return to_run_config(OmegaConf.load(path))
