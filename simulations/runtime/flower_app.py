"""The Flower app a simulation submits: a generated folder holding only ``pyproject.toml``.

``flwr run`` needs an app folder. The repository root is one, but an installed ctfed (not
editable) has no repository, and a fault-injection run needs a different ClientApp. Both
components import from the installed ``ctfed`` package, so the generated folder needs no
code of its own; its ``[tool.flwr.app.config]`` keys must match the repository's
pyproject (a test checks that), because ``flwr run`` only accepts keys declared there.

Its ServerApp is the coordinator's (``ctfed.server.app.serve``) over the simulation's root,
``SimulationRunConfig``: the ServerApp reads the config file ``ctfed simulate`` wrote with
every section it holds, so results.json records the simulation it ran (synthetic hospitals,
faults, split, studies) and a resumed simulation gets them back. The repository's app, the
deployed coordinator's, reads ``RunConfig`` and drops those sections instead.
"""

from __future__ import annotations

from pathlib import Path

from flwr.serverapp import Grid

from ctfed.client.policy import SITE_POLICIES_FILE_KEY
from ctfed.client.secagg import SIGNING_KEYS_DIR_KEY
from ctfed.client.site import DATA_DIR_KEY
from ctfed.common.config import RunConfig
from ctfed.common.exchange import RUN_DIR_KEY
from ctfed.common.fileio import write_text_atomic
from ctfed.server.app import (
    LOCAL_STEPS_KEY,
    RESUME_KEY,
    RESUME_OVERRIDE_KEY,
    ROUNDS_KEY,
    RUN_CONFIG_FILE_KEY,
    make_server_app,
)
from ctfed.server.collect import warm_up_sites
from ctfed.simulations.config import SIMULATE_CONFIG_NAME, SimulationRunConfig, register_simulation_configs

SERVER_APP = "ctfed.simulations.runtime.flower_app:server_app"
CLIENT_APP = "ctfed.client.app:app"
FAULTY_CLIENT_APP = "ctfed.simulations.runtime.faults:app"
APP_FOLDER = "app"

register_simulation_configs()


def _warm_up(grid: Grid, cfg: RunConfig) -> None:
    """Start the simulated sites' workers before round 1 (``simulation.warmup_timeout_s``)."""
    assert isinstance(cfg, SimulationRunConfig)
    if cfg.simulation.warmup_timeout_s > 0:
        warm_up_sites(grid, cfg.simulation.warmup_timeout_s)


# No federation.log from the ServerApp: the engine already keeps the whole federation's
# output (sites included) in the run folder's log (simulations/runtime/engine.py).
server_app = make_server_app(SimulationRunConfig, SIMULATE_CONFIG_NAME, before_rounds=_warm_up, write_log=False)

# Defaults of every run-config key the apps read, as in the repository's pyproject.toml.
RUN_CONFIG_DEFAULTS: dict[str, object] = {
    RUN_CONFIG_FILE_KEY: "",
    ROUNDS_KEY: 0,
    LOCAL_STEPS_KEY: 0,
    RUN_DIR_KEY: "",
    RESUME_KEY: False,
    RESUME_OVERRIDE_KEY: False,
    DATA_DIR_KEY: "",
    SITE_POLICIES_FILE_KEY: "",
    SIGNING_KEYS_DIR_KEY: "",
}


def toml_value(value: object) -> str:
    """A scalar as TOML (also the syntax of ``flwr run --run-config``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_app(folder: Path, client_app: str = CLIENT_APP) -> Path:
    """Write the app's ``pyproject.toml`` into ``folder`` and return the folder."""
    config = dict(RUN_CONFIG_DEFAULTS)
    lines = [
        "[project]",
        'name = "ctfed-simulation"',
        'version = "1.0.0"',
        'description = "ctfed federation run by ctfed simulate"',
        'license = "Apache-2.0"',
        "",
        "[tool.flwr.app]",
        'publisher = "ctfed"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{SERVER_APP}"',
        f'clientapp = "{client_app}"',
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {toml_value(value)}" for key, value in config.items()),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "pyproject.toml", "\n".join(lines) + "\n")
    return folder
