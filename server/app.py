"""The coordinator's Flower ServerApp.

``ctfed simulate`` passes a resolved run config file and a run folder through the run
config; ``flwr run .`` without them uses the built-in defaults (conf/simulate.yaml) with
``num-server-rounds`` and ``local-steps`` from ``[tool.flwr.app.config]``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ctfed.common.config import RunConfig, load_run_config, read_run_config
from ctfed.common.exchange import RUN_DIR_KEY
from ctfed.common.logs import console_logging
from ctfed.server.rounds import run_federation

RUN_CONFIG_FILE_KEY = "run-config-file"
RESUME_KEY = "resume"

logger = logging.getLogger(__name__)

app = ServerApp()


def config_from_context(context: Context) -> tuple[RunConfig, Path]:
    run_config = context.run_config
    config_file = str(run_config.get(RUN_CONFIG_FILE_KEY, ""))
    if config_file:
        cfg = read_run_config(Path(config_file))
    else:
        cfg = load_run_config(
            [
                f"federation.rounds={int(run_config.get('num-server-rounds', 2))}",
                f"train.local_steps={int(run_config.get('local-steps', 2))}",
            ]
        )
    run_dir = str(run_config.get(RUN_DIR_KEY, ""))
    if not run_dir:
        run_dir = str(Path(cfg.output_dir).resolve() / time.strftime("flwr-run-%Y%m%d-%H%M%S"))
    return cfg, Path(run_dir)


@app.main()
def main(grid: Grid, context: Context) -> None:
    console_logging()
    cfg, run_dir = config_from_context(context)
    resume = bool(context.run_config.get(RESUME_KEY, False))
    recorder = run_federation(grid, cfg, run_dir, resume=resume)
    logger.info("results: %s", recorder.results_path)
