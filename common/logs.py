"""Console logging for ctfed's own loggers, in the CLI and inside Flower's processes.

Flower runs ServerApps and ClientApps in processes it starts; only what reaches their
stdout is streamed back by ``flwr run --stream``, so our loggers need their own handler.
"""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def console_logging(level: int = logging.INFO) -> None:
    """Send ``ctfed.*`` log records to stdout (idempotent)."""
    root = logging.getLogger("ctfed")
    root.setLevel(level)
    if not any(getattr(h, "_ctfed_console", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        handler._ctfed_console = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
