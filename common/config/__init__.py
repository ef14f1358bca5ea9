"""Structured configuration for every ctfed command, grouped by who owns each section.

Each section is a dataclass registered with Hydra's ConfigStore, so a typo in a key or a
wrong type fails at composition time, and value rules that types cannot express are
checked in ``__post_init__`` (which runs when the composed config is turned into objects).
YAML presets live in ``conf/`` (installed as ``ctfed.conf``).

| module | owner | holds |
|---|---|---|
| ``travel`` | sent to every site | model, preprocess, train (+ augment), finetune, monitor, privacy |
| ``federation`` | the coordinator | federation (rounds, strategy, transport), secagg |
| ``site`` | a hospital | SiteConfig (site.yaml), SitePolicy, NamedSitePolicy |
| ``run`` | the coordinator's run | RunConfig and its cross-section rules |
| ``loading`` | everyone | Hydra composition, saved files, key hints |

Simulation-only sections (synth, simulation, faults, split, compare, sweep) live beside the
simulations, in ``ctfed.simulations.config`` (``SimulationRunConfig`` extends ``RunConfig``).
Every public name of the modules above is importable from ``ctfed.common.config``.
"""

from __future__ import annotations

from ctfed.common.config.errors import (
    ConfigError,
)
from ctfed.common.config.travel import (
    WindowConfig,
    ModelConfig,
    SeriesPerStudy,
    SeriesTieBreak,
    SeriesSelectionConfig,
    PreprocessConfig,
    MIMObjective,
    Precision,
    valid_device_spec,
    AugmentConfig,
    TrainConfig,
    FINETUNE_MODES,
    FeaturePooling,
    FeatureStatistics,
    FinetuneConfig,
    MIN_MONITOR_SCANS,
    MonitorConfig,
    PrivacyMode,
    LocalDPConfig,
    CentralDPConfig,
    DistributedDPConfig,
    PrivacyConfig,
)
from ctfed.common.config.federation import (
    Strategy,
    ROBUST_STRATEGIES,
    Transport,
    FederationConfig,
    SecAggConfig,
)
from ctfed.common.config.site import (
    SITE_ID_RULE,
    PHASES,
    SitePolicy,
    NamedSitePolicy,
    SiteConfig,
)
from ctfed.common.config.run import (
    synthetic_finetune,
    RunConfig,
)
from ctfed.common.config.loading import (
    CONFIG_MODULE,
    RUN_CONFIG_NAME,
    SIMULATION_SECTIONS,
    register_configs,
    load_run_config,
    to_section,
    to_run_config,
    save_run_config,
    read_run_config,
    read_site_config,
)

__all__ = [
    "ConfigError",
    "WindowConfig",
    "ModelConfig",
    "SeriesPerStudy",
    "SeriesTieBreak",
    "SeriesSelectionConfig",
    "PreprocessConfig",
    "MIMObjective",
    "Precision",
    "valid_device_spec",
    "AugmentConfig",
    "TrainConfig",
    "FINETUNE_MODES",
    "FeaturePooling",
    "FeatureStatistics",
    "FinetuneConfig",
    "MIN_MONITOR_SCANS",
    "MonitorConfig",
    "PrivacyMode",
    "LocalDPConfig",
    "CentralDPConfig",
    "DistributedDPConfig",
    "PrivacyConfig",
    "Strategy",
    "ROBUST_STRATEGIES",
    "Transport",
    "FederationConfig",
    "SecAggConfig",
    "SITE_ID_RULE",
    "PHASES",
    "SitePolicy",
    "NamedSitePolicy",
    "SiteConfig",
    "synthetic_finetune",
    "RunConfig",
    "CONFIG_MODULE",
    "RUN_CONFIG_NAME",
    "SIMULATION_SECTIONS",
    "register_configs",
    "load_run_config",
    "to_section",
    "to_run_config",
    "save_run_config",
    "read_run_config",
    "read_site_config",
]
