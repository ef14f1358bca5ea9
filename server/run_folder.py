"""What the coordinator keeps beside results.json for whoever reads the run folder.

``report.md`` (server/report.py) and ``config.yaml`` (the run's resolved config, the one
results.json records) are rewritten atomically with results.json, so a deployed run
folder reads like a simulated one while the run goes; ``federation.log`` receives the
coordinator's log lines of the run, one flushed line at a time, and a resumed run appends
to it. The coordinator never sees a patient identifier, so none can reach these files.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ctfed.common.config import RunConfig, save_run_config
from ctfed.common.logs import LOG_FORMAT
from ctfed.server.report import CONFIG_NAME, ReportError, write_report

LOG_NAME = "federation.log"
# Flower's own records in the run's log: its warnings and errors only (its INFO lines are
# the SuperLink's bookkeeping, already in the coordinator's console).
FLOWER_LOGGER = "flwr"
FLOWER_LEVEL = logging.WARNING

logger = logging.getLogger(__name__)


def write_config(run_dir: Path, cfg: RunConfig) -> Path:
    """``run_dir/config.yaml``: the run's resolved config (results.json's ``config``), atomically.

    It holds no secret: a run config has no key, certificate or site path (those are in
    each site's own site.yaml, never sent); tests/unit/test_run_folder.py checks it.
    """
    path = run_dir / CONFIG_NAME
    save_run_config(cfg, path)
    return path


def update_report(run_dir: Path, results: dict[str, Any]) -> None:
    """report.md from ``results`` (as just written to results.json).

    A report that cannot be rendered is logged, not raised: results.json is the run's
    record, and ``ctfed report RUN_DIR`` renders the report again at any time.
    """
    try:
        write_report(run_dir, results)
    except ReportError as err:
        logger.error("report.md not updated: %s", err)


def _is_run_record(record: logging.LogRecord) -> bool:
    return not record.name.startswith(FLOWER_LOGGER) or record.levelno >= FLOWER_LEVEL


@contextmanager
def run_log(run_dir: Path) -> Iterator[Path]:
    """Copy ctfed's log records (and Flower's warnings) to ``run_dir/federation.log`` while
    the block runs; appended, so a resumed run continues the file it left."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOG_NAME
    # FileHandler is a StreamHandler: it flushes after every record, so a reader (or a
    # crash) sees each line as soon as it is logged.
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_is_run_record)
    ours = logging.getLogger("ctfed")
    loggers = [ours, logging.getLogger(FLOWER_LOGGER)]
    for target in loggers:
        target.addHandler(handler)
    # The rounds' progress is logged at INFO: the log holds it whatever the console shows.
    level = ours.level
    if ours.getEffectiveLevel() > logging.INFO:
        ours.setLevel(logging.INFO)
    try:
        yield path
    finally:
        ours.setLevel(level)
        for target in loggers:
            target.removeHandler(handler)
        handler.close()
