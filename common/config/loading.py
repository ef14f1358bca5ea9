"""Loading, saving and validating configs: Hydra composition, saved files, key hints."""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ctfed.common.config.errors import ConfigError
from ctfed.common.config.run import RunConfig
from ctfed.common.config.site import SiteConfig
from ctfed.common.config.travel import ModelConfig
from ctfed.common.fileio import write_text_atomic

CONFIG_MODULE = "ctfed.conf"
# The coordinator's root: conf/run.yaml over RunConfig. `ctfed simulate` composes its own
# (conf/simulate.yaml over ctfed.simulations.config.SimulationRunConfig).
RUN_CONFIG_NAME = "run"

# Sections of ``ctfed simulate``'s root (ctfed.simulations.config.SimulationRunConfig), named
# here, not imported (common never imports simulations), for one reason: files a coordinator
# reads carry them. ``ctfed simulate --show-config`` is how docs/deploy.md tells a coordinator to
# write its run.yaml, and every results.json written before the split records them. A root
# that does not declare them drops them (logged) instead of refusing the file; any other
# unknown key is still an error. tests/unit/test_config_loading.py keeps this list equal to that root's.
SIMULATION_SECTIONS = ("synth", "simulation", "split", "compare", "sweep", "label_efficiency")

logger = logging.getLogger(__name__)


def register_configs() -> None:
    """Make the schemas known to Hydra (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)


T = TypeVar("T")
# A run root: RunConfig or a root that extends it (the simulation's).
R = TypeVar("R", bound=RunConfig)


def _valid_keys_hint(message: str, schema: Any) -> str:
    """Name the valid keys of the config node a bad key was aimed at."""
    match = (
        re.search(r"full_key: ([\w.]+)", message)
        or re.search(r"override '([\w.]+)'", message)
        or re.search(r"Key '([\w.]+)'", message)
    )
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


def _describe_hydra_error(err: Exception, schema: type[RunConfig]) -> str:
    # Hydra's advice to append with '+' would silently add an ignored key: drop it.
    lines = [line for line in str(err).strip().splitlines() if "To append to your config" not in line]
    cause = err.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in lines:
        lines.append(str(cause).strip().splitlines()[0])
    message = "\n".join(lines)
    return f"invalid configuration: {message}{_valid_keys_hint(message, schema())}"


def load_run_config(
    overrides: Sequence[str] = (), config_name: str = RUN_CONFIG_NAME, schema: type[R] = RunConfig  # type: ignore[assignment]
) -> R:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides and validate it as ``schema``.

    The default is the coordinator's root (conf/run.yaml: the structured defaults, tiny
    model); ``ctfed.simulations.config.load_simulation_config`` composes the simulation's.
    Raises ConfigError with the valid keys when an override names an unknown key.
    """
    register_configs()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_describe_hydra_error(err, schema)) from None
    return to_run_config(cfg, schema)


def to_section(schema: type[T], values: DictConfig | dict) -> T:
    """Validate plain values against a config dataclass (types, unknown keys, rules)."""
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as err:
        message = str(err).strip()
        raise ConfigError(f"invalid configuration: {message}{_valid_keys_hint(message, schema())}") from None
    assert isinstance(obj, schema)
    return obj


def to_run_config(cfg: DictConfig | dict, schema: type[R] = RunConfig) -> R:  # type: ignore[assignment]
    """Validate a composed or saved config and turn it into ``schema`` (default: RunConfig).

    Simulation sections the schema does not declare are dropped (``SIMULATION_SECTIONS``).
    """
    return to_section(schema, _without_undeclared_simulation_sections(cfg, schema))


def _without_undeclared_simulation_sections(cfg: DictConfig | dict, schema: type[RunConfig]) -> DictConfig | dict:
    declared = {f.name for f in fields(schema)}
    dropped = [name for name in SIMULATION_SECTIONS if name in cfg and name not in declared]
    if not dropped:
        return cfg
    logger.info("run config: ignoring the simulation sections %s (ctfed simulate's; this run does not read them)",
                ", ".join(dropped))
    kept = [key for key in cfg.keys() if key not in dropped]
    if isinstance(cfg, DictConfig):
        return OmegaConf.masked_copy(cfg, kept)
    return {key: cfg[key] for key in kept}


def save_run_config(cfg: RunConfig, path: Path) -> None:
    """Write ``cfg`` (any run root) as YAML, atomically."""
    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def read_run_config(path: Path, schema: type[R] = RunConfig) -> R:  # type: ignore[assignment]
    """A saved run config file (``save_run_config``, ``ctfed simulate --show-config``) as ``schema``."""
    if not path.is_file():
        raise ConfigError(f"run config file not found: {path}")
    return to_run_config(OmegaConf.load(path), schema)


def read_site_config(path: Path, overrides: Sequence[str] = ()) -> SiteConfig:
    """Load a site YAML with ``key=value`` overrides, validate it and resolve its paths."""
    if not path.is_file():
        raise ConfigError(f"site config file not found: {path}")
    try:
        values = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid configuration in {path}: {err}") from None
    cfg = to_section(SiteConfig, values)
    cfg.resolve_paths(path.resolve().parent)
    return cfg
