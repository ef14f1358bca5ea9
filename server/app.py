"""The coordinator's Flower ServerApp.

``ctfed simulate`` passes a resolved run config file and a run folder through the run
config; ``flwr run .`` without them uses the built-in defaults (conf/run.yaml).
``num-server-rounds`` and ``local-steps`` in ``[tool.flwr.app.config]`` override
``federation.rounds`` and ``train.local_steps`` of the defaults (0: keep them); with a
``run-config-file`` that file is the one source of truth, and a value that contradicts it
is an error naming both.

``app`` reads the coordinator's root, ``RunConfig``: a file with the simulation's sections
(``ctfed simulate --show-config``, results.json written before the configs were split) is
read without them (common/config/loading.py ``SIMULATION_SECTIONS``). A simulation submits
its own ServerApp built by ``make_server_app`` with its root (simulations/runtime/flower_app.py), so
that results.json records the simulation sections it ran with and a resume restores them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable, TypeVar

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ctfed.common.config import RUN_CONFIG_NAME, ConfigError, RunConfig, load_run_config, read_run_config
from ctfed.common.exchange import RUN_DIR_KEY
from ctfed.common.logs import console_logging
from ctfed.server.results import FederationStopped
from ctfed.server.rounds import run_federation
from ctfed.server.run_folder import run_log

RUN_CONFIG_FILE_KEY = "run-config-file"
RESUME_KEY = "resume"
# With ``resume``: accept a submitted config that differs from the run's saved one in more
# than the round counts (the changes are recorded in results.json ``resumes``).
RESUME_OVERRIDE_KEY = "resume-override"
ROUNDS_KEY = "num-server-rounds"
LOCAL_STEPS_KEY = "local-steps"
# Run-config keys that set a config value, and the value they set.
SHORTHAND_KEYS = {ROUNDS_KEY: "federation.rounds", LOCAL_STEPS_KEY: "train.local_steps"}

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=RunConfig)


def _shorthand_values(run_config: dict) -> dict[str, int]:
    """The non-zero ``num-server-rounds`` / ``local-steps`` of the run config, by config key."""
    values = {}
    for key, dotted in SHORTHAND_KEYS.items():
        raw = run_config.get(key, 0)
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            raise ConfigError(f"run config {key}={raw!r} must be a whole number >= 0 (0: the config's {dotted})")
        if raw:
            values[dotted] = raw
    return values


def config_from_context(
    context: Context, schema: type[R] = RunConfig, config_name: str = RUN_CONFIG_NAME  # type: ignore[assignment]
) -> tuple[R, Path]:
    """The run's config as ``schema`` (from ``run-config-file``, else ``conf/<config_name>.yaml``
    with the shorthand keys) and its run folder."""
    run_config = dict(context.run_config)
    config_file = str(run_config.get(RUN_CONFIG_FILE_KEY, ""))
    shorthands = _shorthand_values(run_config)
    if config_file:
        cfg = read_run_config(Path(config_file), schema)
        current = {"federation.rounds": cfg.federation.rounds, "train.local_steps": cfg.train.local_steps}
        conflicts = [
            f"{key}={shorthands[dotted]} but {dotted}={current[dotted]} in {config_file}"
            for key, dotted in SHORTHAND_KEYS.items()
            if dotted in shorthands and shorthands[dotted] != current[dotted]
        ]
        if conflicts:
            raise ConfigError(
                "conflicting run config: " + "; ".join(conflicts)
                + f". With {RUN_CONFIG_FILE_KEY} the file decides: set the value there and leave "
                + " and ".join(SHORTHAND_KEYS) + " out (or equal to it)"
            )
    else:
        cfg = load_run_config([f"{dotted}={value}" for dotted, value in shorthands.items()], config_name, schema)
    run_dir = str(run_config.get(RUN_DIR_KEY, ""))
    if not run_dir:
        run_dir = str(Path(cfg.output_dir).resolve() / time.strftime("flwr-run-%Y%m%d-%H%M%S"))
    return cfg, Path(run_dir)


def serve(
    grid: Grid,
    context: Context,
    schema: type[RunConfig] = RunConfig,
    config_name: str = RUN_CONFIG_NAME,
    before_rounds: Callable[[Grid, RunConfig], None] | None = None,
    write_log: bool = True,
) -> None:
    """The ServerApp's body: resolve the config as ``schema`` and run (or resume) the federation;
    ``before_rounds`` (a simulation's site warm-up) runs before the first round, with the
    resolved config, once a resume's checks have passed. With ``write_log`` the run's log
    lines also go to the run folder's federation.log (server/run_folder.py)."""
    console_logging()
    cfg, run_dir = config_from_context(context, schema, config_name)
    resume = bool(context.run_config.get(RESUME_KEY, False))
    override = bool(context.run_config.get(RESUME_OVERRIDE_KEY, False))
    if override and not resume:
        raise ConfigError(f"{RESUME_OVERRIDE_KEY}=true applies to a resume; set {RESUME_KEY}=true with it")
    with run_log(run_dir) if write_log else contextlib.nullcontext():
        logger.info("%s run folder %s", "resuming the" if resume else "starting a", run_dir)
        try:
            # A run that stops early (FederationStopped) raises out of here: Flower then marks it
            # failed with the reason, and results.json holds status "failed" and the reason.
            recorder = run_federation(
                grid, cfg, run_dir, resume=resume, override_config=override, before_rounds=before_rounds
            )
        except FederationStopped:
            raise  # run_federation logged why
        except Exception as err:  # logged for the run folder's log, then Flower's to report
            logger.error("the run ended with an error: %s: %s", type(err).__name__, err)
            raise
        logger.info("results: %s", recorder.results_path)


def make_server_app(
    schema: type[RunConfig] = RunConfig,
    config_name: str = RUN_CONFIG_NAME,
    before_rounds: Callable[[Grid, RunConfig], None] | None = None,
    write_log: bool = True,
) -> ServerApp:
    """A ServerApp that reads its run config as ``schema`` (a root extending RunConfig), and
    calls ``before_rounds`` (if any) before the first round; ``write_log``: see ``serve``."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, context, schema, config_name, before_rounds, write_log)

    return server_app


def main(grid: Grid, context: Context) -> None:
    """The coordinator's ServerApp main (``app``): the RunConfig root."""
    serve(grid, context)


app = make_server_app()
