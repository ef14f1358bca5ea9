"""Writing files so that a crash mid-write never leaves a truncated one behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO


def write_json_atomic(path: Path, payload: Any, indent: int = 2) -> None:
    """Write JSON to a sibling temporary file, then rename it over ``path``."""
    write_text_atomic(path, json.dumps(payload, indent=indent) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write text as UTF-8, whatever the locale, to a sibling temporary file, then rename it
    over ``path`` (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temporary behind
        raise


def write_bytes_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(handle)`` into a sibling temporary file, then rename it over ``path``; on a
    failure (a full disk) the temporary is removed and ``path`` is untouched."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is not None:
            raise
        # numpy reports a short write without an errno or a file ("N requested and M written").
        reason = err.strerror or f"short write ({err}): the disk is full or a file-size limit was reached"
        raise OSError(err.errno, reason, str(path)) from err
