"""The site's audit log: one JSON line per message the site sends, hash-chained.

``<state dir>/audit.jsonl`` lets a hospital's IT see exactly what left the site: when, for
which run and round, which tensors (names, shapes, dtypes, L2 norms), the SHA-256 of the
payload, the size, the metrics, and the differential privacy applied (mode, noise
multiplier, clip bound, epsilon after the round). The log only ever sees weights, metrics,
the site id and refusal reasons; no scan, header or file name from the cache reaches it.

Tamper evidence: every line carries ``prev_sha256``, the SHA-256 of the previous line's
bytes (64 zeros for the first), so editing, inserting or deleting a line breaks the chain
at the next one. ``audit.jsonl.head`` (rewritten atomically after each append) holds the
line count and the last line's hash, which also exposes a log cut short at its end.
``verify_audit_log`` checks both. Appends take an exclusive ``flock``, so concurrent
ClientApp processes of one site cannot interleave or fork the chain.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ArrayRecord

from ctfed.common.config import Transport
from ctfed.common.exchange import payload_sha256, record_bytes, transported_values
from ctfed.common.fileio import write_json_atomic

AUDIT_FILE = "audit.jsonl"
HEAD_SUFFIX = ".head"
GENESIS_HASH = "0" * 64

# Message kinds.
KIND_TRAIN_REPLY = "train-reply"
KIND_REFUSAL = "refusal"
KIND_SECAGG_PREFIX = "secagg-"  # + the protocol stage, e.g. "secagg-masked_input"

# Every key an entry may have; verify_audit_log rejects any other.
ENTRY_KEYS = frozenset(
    {"time", "run_id", "round", "kind", "site", "parameters", "payload_sha256", "bytes", "metrics", "dp", "reason", "prev_sha256"}
)
PARAMETER_KEYS = frozenset({"name", "shape", "dtype", "l2_norm"})
# The one optional key: the float format of a plain-path update (federation.transport).
TRANSPORT_FIELD = "transport"


class AuditLogError(ValueError):
    """The audit log was modified, reordered or cut short; the message says where."""


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _last_line(handle: Any) -> bytes | None:
    """The file's last complete line (without its newline), reading backwards in blocks."""
    handle.seek(0, os.SEEK_END)
    end = handle.tell()
    if end == 0:
        return None
    block = 65536
    data = b""
    position = end
    while position > 0:
        step = min(block, position)
        position -= step
        handle.seek(position)
        data = handle.read(step) + data
        body = data[:-1] if data.endswith(b"\n") else data
        if b"\n" in body:
            return body.rsplit(b"\n", 1)[1]
    return data[:-1] if data.endswith(b"\n") else data


def describe_arrays(arrays: ArrayRecord | None, transport: Transport | None = None) -> list[dict[str, Any]]:
    """Name, shape, dtype and L2 norm of every tensor in a record. With a ``transport``
    (an update in that float format), the dtype is the format and the norm that of the
    values it carries (bfloat16 travels as int16 bit patterns)."""
    if arrays is None:
        return []
    if transport is not None:
        values = transported_values(arrays, transport)
        return [
            {"name": name, "shape": list(t.shape), "dtype": transport.value, "l2_norm": float(t.double().pow(2).sum().sqrt())}
            for name, t in values.items()
        ]
    described = []
    for name, tensor in arrays.to_torch_state_dict().items():
        norm = float(tensor.detach().double().pow(2).sum().sqrt()) if tensor.is_floating_point() else None
        described.append({"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."), "l2_norm": norm})
    return described


class AuditLog:
    """Append-only, hash-chained JSONL log of what a site sends."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def head_path(self) -> Path:
        return self.path.with_name(self.path.name + HEAD_SUFFIX)

    def append(
        self,
        *,
        kind: str,
        run_id: int | str,
        server_round: int,
        site_id: str,
        arrays: ArrayRecord | None = None,
        metrics: Mapping[str, Any] | None = None,
        dp: Mapping[str, Any] | None = None,
        reason: str = "",
        transport: Transport | None = None,
    ) -> dict[str, Any]:
        """Write one entry for an outgoing message; returns the entry as written. An update
        sent in a float format (``federation.transport``) records it as ``transport``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry: dict[str, Any] = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "run_id": str(run_id),
            "round": int(server_round),
            "kind": kind,
            "site": site_id,
            "parameters": describe_arrays(arrays, transport),
            "payload_sha256": payload_sha256(arrays, metrics),
            "bytes": record_bytes(arrays) if arrays is not None else 0,
            "metrics": dict(metrics or {}),
            "dp": dict(dp or {}),
            "reason": reason,
            **({} if transport is None else {TRANSPORT_FIELD: transport.value}),
        }
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                previous = _last_line(handle)
                entry["prev_sha256"] = GENESIS_HASH if previous is None else _line_hash(previous)
                line = json.dumps(entry, sort_keys=True, allow_nan=True).encode()
                handle.seek(0, os.SEEK_END)
                handle.write(line + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
                count = self._count_from_head(previous)
                write_json_atomic(self.head_path, {"lines": count + 1, "last_sha256": _line_hash(line)})
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return entry

    def _count_from_head(self, previous: bytes | None) -> int:
        """Lines before this append: the head's count when it matches the file, else a recount."""
        if previous is None:
            return 0
        try:
            head = json.loads(self.head_path.read_text(encoding="utf-8"))
            if head.get("last_sha256") == _line_hash(previous):
                return int(head["lines"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        with open(self.path, "rb") as handle:
            return sum(1 for _ in handle) - 1


def verify_audit_log(path: Path) -> int:
    """Check the chain (and the head file, if present); returns the number of entries.

    Raises AuditLogError naming the first line that does not follow from its predecessor,
    a line with unexpected keys, or a log shorter than its head says.
    """
    if not path.is_file():
        raise AuditLogError(f"audit log {path} not found")
    expected = GENESIS_HASH
    hashes: list[str] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                raise AuditLogError(f"{path}:{number}: incomplete last line")
            line = raw[:-1]
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise AuditLogError(f"{path}:{number}: not JSON ({err})") from None
            if not isinstance(entry, dict) or set(entry) - {TRANSPORT_FIELD} != ENTRY_KEYS:
                found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                raise AuditLogError(f"{path}:{number}: unexpected entry keys {found}")
            for parameter in entry["parameters"]:
                if set(parameter) != PARAMETER_KEYS:
                    raise AuditLogError(f"{path}:{number}: unexpected parameter keys {sorted(parameter)}")
            if entry["prev_sha256"] != expected:
                raise AuditLogError(
                    f"{path}:{number}: hash chain broken (the line before it was changed, removed or inserted)"
                )
            expected = _line_hash(line)
            hashes.append(expected)
    head_path = path.with_name(path.name + HEAD_SUFFIX)
    if head_path.is_file():
        head = json.loads(head_path.read_text(encoding="utf-8"))
        lines, last = int(head["lines"]), str(head["last_sha256"])
        if lines > len(hashes):
            raise AuditLogError(f"{path}: {len(hashes)} entries, but its head recorded {lines}: the log was cut short")
        # A head behind the file is a crash between the two writes; it must still match.
        if lines > 0 and hashes[lines - 1] != last:
            raise AuditLogError(f"{path}: entry {lines} does not match the hash its head recorded")
    return len(hashes)
