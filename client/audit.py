"""The site's audit log: one JSON line per message the site sends, hash-chained.

``<state dir>/audit.jsonl`` lets a hospital's IT see exactly what left the site: when, for
which run and round, which tensors (names, shapes, dtypes, L2 norms), the SHA-256 of the
payload, the size, the metrics, and the differential privacy applied (mode, noise
multiplier, clip bound, epsilon after the round). The log only ever sees weights, metrics,
the site id and refusal reasons; no scan, header or file name from the cache reaches it.

Tamper evidence: the chain is keyed. Every line carries ``prev_hmac``, the HMAC-SHA256 of
the previous line's bytes (of a fixed genesis label for the first) under the site's audit
key, so editing, inserting or deleting a line breaks the chain at the next one, and a
rewritten log does not verify without the key. ``audit.jsonl.head`` (rewritten atomically
after each append) holds the line count and the last line's HMAC, itself authenticated
with the key, which exposes a log cut short at its end; a missing or rewritten head is an
error. ``verify_audit_log`` checks all of it. Appends take an exclusive ``flock``, so
concurrent ClientApp processes of one site cannot interleave or fork the chain.

The audit key is HMAC(site secret, "ctfed audit log") with the site secret of the state
folder (``<state dir>/.site_secret``, ``common/privacy.py``: 32 random bytes, mode 0600,
created once): the log must be writable before any cache is opened (a refusal is audited
before the site reads data), and verification needs only the state folder. What the key
does not stop, a copy of an older log *and* its head put back together, is in
docs/security.md.

Secure aggregation's share stages record which nodes' shares went where (``shares``: node
ids only, never a share): whom this site's encrypted shares were addressed to, whose shares
it received and masked with, and whose seed or sk1 shares it revealed at unmasking.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ArrayRecord

from ctfed.common import secagg as sa
from ctfed.common.config import Transport
from ctfed.common.exchange import payload_sha256, record_bytes, transported_values
from ctfed.common.fileio import write_json_atomic
from ctfed.common.privacy import SECRET_FILE, site_secret

AUDIT_FILE = "audit.jsonl"
HEAD_SUFFIX = ".head"
_KEY_LABEL = b"ctfed audit log"
_GENESIS_LABEL = b"ctfed audit log genesis"

# Message kinds.
KIND_TRAIN_REPLY = "train-reply"
KIND_REFUSAL = "refusal"
KIND_SECAGG_PREFIX = "secagg-"  # + the protocol stage, e.g. "secagg-masked_input"

# Every key an entry has; verify_audit_log rejects any other.
ENTRY_KEYS = frozenset(
    {"time", "run_id", "round", "kind", "site", "parameters", "payload_sha256", "bytes", "metrics", "dp", "reason", "prev_hmac"}
)
PARAMETER_KEYS = frozenset({"name", "shape", "dtype", "l2_norm"})
# Optional keys: the float format of a plain-path update (federation.transport), and the
# node ids of a secure-aggregation share stage (name -> list of node ids).
TRANSPORT_FIELD = "transport"
SHARES_FIELD = "shares"
OPTIONAL_KEYS = frozenset({TRANSPORT_FIELD, SHARES_FIELD})


class AuditLogError(ValueError):
    """The audit log was modified, reordered or cut short; the message says where."""


def audit_key(state_dir: Path, create: bool = True) -> bytes:
    """The key of ``state_dir``'s audit chain, from its site secret (created once if ``create``)."""
    if not create and not (state_dir / SECRET_FILE).is_file():
        raise AuditLogError(f"no site secret {state_dir / SECRET_FILE}: the audit log cannot be verified without it")
    return hmac.new(site_secret(state_dir), _KEY_LABEL, hashlib.sha256).digest()


def _mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def genesis_mac(key: bytes) -> str:
    """What the first line's ``prev_hmac`` is."""
    return _mac(key, _GENESIS_LABEL)


def _head_mac(key: bytes, lines: int, last: str) -> str:
    return _mac(key, f"head\x1f{lines}\x1f{last}".encode())


def secagg_share_lists(stage: str, sent: Mapping[str, Any], received: Mapping[str, Any]) -> dict[str, list[int]]:
    """The node ids behind one share stage: ``received`` is the coordinator's protocol payload,
    ``sent`` the site's reply payload. Ids only; never a key, share or ciphertext."""

    def ids(payload: Mapping[str, Any], key: str) -> list[int]:
        return sorted(int(n) for n in payload.get(key, []))

    if stage == sa.STAGE_SHARE_KEYS:
        return {"neighbours": ids(received, sa.K_NODE_IDS), "shares_sent_to": ids(sent, sa.K_DESTINATIONS)}
    if stage == sa.STAGE_MASKED_INPUT:
        # The pairwise masks of the masked input are with exactly these nodes.
        return {"shares_received_from": ids(received, sa.K_SOURCES)}
    if stage == sa.STAGE_CONSISTENCY:
        # The survivor set this site signed; unmasking reveals shares by it, not by the coordinator's lists.
        return {"survivors_signed": ids(received, sa.K_SURVIVORS)}
    if stage == sa.STAGE_UNMASK:
        return {
            "signed_by": ids(received, sa.K_SIGNERS),
            "seed_shares_revealed_for": ids(sent, sa.K_SEED_OWNERS),
            "sk1_shares_revealed_for": ids(sent, sa.K_SK1_OWNERS),
        }
    return {}


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
    """Append-only JSONL log of what a site sends, chained with HMACs under the site's audit key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: bytes | None = None

    @property
    def key(self) -> bytes:
        if self._key is None:  # read (or created) at the first append, not before
            self._key = audit_key(self.path.parent)
        return self._key

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
        shares: Mapping[str, list[int]] | None = None,
    ) -> dict[str, Any]:
        """Write one entry for an outgoing message; returns the entry as written. An update
        sent in a float format (``federation.transport``) records it as ``transport``; a
        share stage of secure aggregation its node-id lists as ``shares``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = self.key
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
            **({} if shares is None else {SHARES_FIELD: {name: [int(n) for n in ids] for name, ids in shares.items()}}),
        }
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                previous = _last_line(handle)
                entry["prev_hmac"] = genesis_mac(key) if previous is None else _mac(key, previous)
                line = json.dumps(entry, sort_keys=True, allow_nan=True).encode()
                handle.seek(0, os.SEEK_END)
                handle.write(line + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
                count = self._count_from_head(previous, key) + 1
                last = _mac(key, line)
                write_json_atomic(self.head_path, {"lines": count, "last_hmac": last, "mac": _head_mac(key, count, last)})
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return entry

    def _count_from_head(self, previous: bytes | None, key: bytes) -> int:
        """Lines before this append: the head's count when it matches the file, else a recount."""
        if previous is None:
            return 0
        try:
            head = json.loads(self.head_path.read_text(encoding="utf-8"))
            if head.get("last_hmac") == _mac(key, previous):
                return int(head["lines"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        with open(self.path, "rb") as handle:
            return sum(1 for _ in handle) - 1


def verify_audit_log(path: Path) -> int:
    """Check the keyed chain and the head file; returns the number of entries.

    Raises AuditLogError naming the first line that does not follow from its predecessor
    under the site's audit key, a line with unexpected keys, a missing or forged head, or a
    log shorter than its head says. Needs the state folder's site secret (never creates it).
    """
    if not path.is_file():
        raise AuditLogError(f"audit log {path} not found")
    key = audit_key(path.parent, create=False)
    expected = genesis_mac(key)
    macs: list[str] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                raise AuditLogError(f"{path}:{number}: incomplete last line")
            line = raw[:-1]
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise AuditLogError(f"{path}:{number}: not JSON ({err})") from None
            if not isinstance(entry, dict) or set(entry) - OPTIONAL_KEYS != ENTRY_KEYS:
                found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                raise AuditLogError(f"{path}:{number}: unexpected entry keys {found}")
            for parameter in entry["parameters"]:
                if set(parameter) != PARAMETER_KEYS:
                    raise AuditLogError(f"{path}:{number}: unexpected parameter keys {sorted(parameter)}")
            shares = entry.get(SHARES_FIELD, {})
            if not isinstance(shares, dict) or not all(
                isinstance(ids, list) and all(isinstance(n, int) for n in ids) for ids in shares.values()
            ):
                raise AuditLogError(f"{path}:{number}: '{SHARES_FIELD}' must map names to lists of node ids")
            if not hmac.compare_digest(str(entry["prev_hmac"]), expected):
                raise AuditLogError(
                    f"{path}:{number}: hash chain broken (the line before it was changed, removed or inserted, "
                    "or the log was written without this site's audit key)"
                )
            expected = _mac(key, line)
            macs.append(expected)
    head_path = path.with_name(path.name + HEAD_SUFFIX)
    if not head_path.is_file():
        raise AuditLogError(f"{path}: its head {head_path.name} is missing, so a cut-short end cannot be ruled out")
    try:
        head = json.loads(head_path.read_text(encoding="utf-8"))
        lines, last, mac = int(head["lines"]), str(head["last_hmac"]), str(head["mac"])
    except (ValueError, KeyError, TypeError) as err:
        raise AuditLogError(f"{head_path}: not an audit head ({err})") from None
    if not hmac.compare_digest(mac, _head_mac(key, lines, last)):
        raise AuditLogError(f"{head_path}: the head was not written with this site's audit key (rewritten?)")
    if lines > len(macs):
        raise AuditLogError(f"{path}: {len(macs)} entries, but its head recorded {lines}: the log was cut short")
    # A head behind the file is a crash between the two writes; it must still match.
    if lines < 1 or not hmac.compare_digest(macs[lines - 1], last):
        raise AuditLogError(f"{path}: entry {lines} does not match the HMAC its head recorded")
    return len(macs)
