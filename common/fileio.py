"""Writing files so that a crash mid-write never leaves a truncated one behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, payload: Any, indent: int = 2) -> None:
    """Write JSON to a sibling temporary file, then rename it over ``path``."""
    write_text_atomic(path, json.dumps(payload, indent=indent) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write text as UTF-8, whatever the locale, to a sibling temporary file, then rename it
    over ``path`` (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
