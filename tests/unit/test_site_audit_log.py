"""The site audit log: one entry per outgoing message, hash-chained, nothing but weights and numbers."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord

from ctfed.client.audit import (
    AUDIT_FILE,
    ENTRY_KEYS,
    HEAD_SUFFIX,
    KIND_REFUSAL,
    KIND_TRAIN_REPLY,
    PARAMETER_KEYS,
    AuditLog,
    AuditLogError,
    audit_key,
    genesis_mac,
    secagg_share_lists,
    verify_audit_log,
)
from ctfed.common import secagg as sa
from ctfed.common.privacy import SECRET_FILE
from ctfed.common.exchange import payload_sha256, record_bytes


def _arrays(seed: int) -> ArrayRecord:
    generator = torch.Generator().manual_seed(seed)
    return ArrayRecord({"blocks.0.weight": torch.randn(4, 3, generator=generator), "norm.bias": torch.ones(3)})


def _write(path: Path, entries: int = 4) -> AuditLog:
    log = AuditLog(path)
    for index in range(entries):
        if index == 2:
            log.append(kind=KIND_REFUSAL, run_id=9, server_round=index + 1, site_id="hospital-a", reason="site hospital-a refuses: policy")
        else:
            log.append(
                kind=KIND_TRAIN_REPLY, run_id=9, server_round=index + 1, site_id="hospital-a", arrays=_arrays(index),
                metrics={"loss": 1.5, "dp-epsilon": 0.5 * (index + 1)},
                dp={"mode": "local", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "epsilon_after": 0.5 * (index + 1)},
            )
    return log


def test_entries_describe_what_was_sent(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE
    _write(path, entries=2)
    lines = path.read_text().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert set(first) == ENTRY_KEYS
    key = audit_key(tmp_path)
    assert first["prev_hmac"] == genesis_mac(key)
    assert first["time"].endswith("+00:00")  # UTC
    assert (first["run_id"], first["round"], first["kind"], first["site"]) == ("9", 1, KIND_TRAIN_REPLY, "hospital-a")
    arrays = _arrays(0)
    described = {p["name"]: p for p in first["parameters"]}
    assert set(described) == {"blocks.0.weight", "norm.bias"}
    assert all(set(p) == PARAMETER_KEYS for p in first["parameters"])
    assert described["blocks.0.weight"]["shape"] == [4, 3]
    weight = arrays.to_torch_state_dict()["blocks.0.weight"]
    assert described["blocks.0.weight"]["l2_norm"] == pytest.approx(float(weight.norm()))
    assert first["payload_sha256"] == payload_sha256(arrays, first["metrics"])
    assert first["bytes"] == record_bytes(arrays)
    assert first["dp"]["epsilon_after"] == 0.5
    import hashlib
    import hmac

    assert second["prev_hmac"] == hmac.new(key, lines[0].encode(), hashlib.sha256).hexdigest()
    # The key is the state folder's own site secret, private to the site's user.
    assert (tmp_path / SECRET_FILE).stat().st_mode & 0o077 == 0


def test_chain_verifies_and_detects_edits_deletions_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE
    _write(path, entries=4)
    assert verify_audit_log(path) == 4
    original = path.read_text().splitlines(keepends=True)

    edited = json.loads(original[1])
    edited["parameters"][0]["l2_norm"] = 0.0
    path.write_text("".join([original[0], json.dumps(edited, sort_keys=True) + "\n", *original[2:]]))
    with pytest.raises(AuditLogError, match=":3: hash chain broken"):
        verify_audit_log(path)

    path.write_text("".join([original[0], *original[2:]]))  # a middle line removed
    with pytest.raises(AuditLogError, match="hash chain broken"):
        verify_audit_log(path)

    path.write_text("".join(original[:3]))  # the last line cut off
    with pytest.raises(AuditLogError, match="cut short"):
        verify_audit_log(path)

    smuggled = json.loads(original[0])
    smuggled["patient_name"] = "DOE^JANE"
    path.write_text(json.dumps(smuggled, sort_keys=True) + "\n")
    with pytest.raises(AuditLogError, match="unexpected entry keys"):
        verify_audit_log(path)


def _rewrite_chain(path: Path, lines: list[str], key: bytes) -> None:
    """What an attacker without the site secret can do: rebuild the chain with plain SHA-256
    (the scheme before the chain was keyed) or with a key of its own."""
    import hashlib
    import hmac

    previous = None
    out = []
    for raw in lines:
        entry = json.loads(raw)
        entry["prev_hmac"] = (
            genesis_mac(key) if previous is None else hmac.new(key, previous, hashlib.sha256).hexdigest()
        )
        line = json.dumps(entry, sort_keys=True).encode()
        out.append(line)
        previous = line
    path.write_bytes(b"".join(line + b"\n" for line in out))


def test_a_cut_or_rewritten_log_does_not_verify_without_the_site_secret(tmp_path: Path) -> None:
    """The attacks of issue #12 point 13: cut the tail and delete or rewrite the head; rewrite
    the whole chain consistently. Each one verified before the chain was keyed."""
    path = tmp_path / AUDIT_FILE
    _write(path, entries=4)
    original = path.read_text().splitlines(keepends=True)
    head = path.with_name(path.name + HEAD_SUFFIX)
    original_head = head.read_text()

    path.write_text("".join(original[:2]))  # the last two entries cut off ...
    head.unlink()  # ... and the head that would show it deleted
    with pytest.raises(AuditLogError, match="head audit.jsonl.head is missing"):
        verify_audit_log(path)

    # ... or the head rewritten to match the shorter log (its fields are plain to see).
    kept = json.loads(original[1])
    head.write_text(json.dumps({**json.loads(original_head), "lines": 2, "last_hmac": kept["prev_hmac"]}))
    with pytest.raises(AuditLogError, match="not written with this site's audit key"):
        verify_audit_log(path)

    # A whole log rewritten (an entry's norms edited) and chained again under another key.
    edited = [original[0], json.dumps({**json.loads(original[1]), "bytes": 0}) + "\n", *original[2:]]
    forged_key = b"\x00" * 32
    _rewrite_chain(path, edited, forged_key)
    head.write_text(original_head)
    with pytest.raises(AuditLogError, match=":1: hash chain broken"):
        verify_audit_log(path)

    # Without the site secret there is nothing to verify against (and it is not created).
    path.write_text("".join(original))
    (tmp_path / SECRET_FILE).unlink()
    with pytest.raises(AuditLogError, match="no site secret"):
        verify_audit_log(path)
    assert not (tmp_path / SECRET_FILE).exists()


def test_share_stages_record_node_ids_only() -> None:
    assert secagg_share_lists(sa.STAGE_SHARE_KEYS, {sa.K_DESTINATIONS: [7, 3]}, {sa.K_NODE_IDS: [3, 5, 7]}) == {
        "neighbours": [3, 5, 7], "shares_sent_to": [3, 7],
    }
    assert secagg_share_lists(sa.STAGE_MASKED_INPUT, {}, {sa.K_SOURCES: [7, 3], sa.K_CIPHERTEXTS: [b"x", b"y"]}) == {
        "shares_received_from": [3, 7],
    }
    assert secagg_share_lists(sa.STAGE_CONSISTENCY, {sa.K_SIGNATURE: b"sig"}, {sa.K_SURVIVORS: [5, 3]}) == {
        "survivors_signed": [3, 5],
    }
    unmask = secagg_share_lists(
        sa.STAGE_UNMASK, {sa.K_SEED_OWNERS: [3, 5], sa.K_SEED_SHARES: [b"s", b"t"], sa.K_SK1_OWNERS: [7]},
        {sa.K_SIGNERS: [5, 3], sa.K_SIGNATURES: [b"a", b"b"]},
    )
    assert unmask == {"signed_by": [3, 5], "seed_shares_revealed_for": [3, 5], "sk1_shares_revealed_for": [7]}


def test_appends_continue_the_chain_across_log_objects(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE
    _write(path, entries=2)
    AuditLog(path).append(kind=KIND_REFUSAL, run_id=10, server_round=1, site_id="hospital-a", reason="x")
    assert verify_audit_log(path) == 3


def _append_many(path: str, worker: int) -> None:
    log = AuditLog(Path(path))
    for index in range(15):
        log.append(kind=KIND_TRAIN_REPLY, run_id=worker, server_round=index, site_id="s", arrays=_arrays(index))


def test_concurrent_appenders_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(path), worker)) for worker in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert verify_audit_log(path) == 45


def test_log_holds_no_cache_or_dicom_identifiers(tmp_path: Path) -> None:
    """Only the site id, numbers and tensor names reach the log, whatever the cache holds."""
    path = tmp_path / AUDIT_FILE
    _write(path, entries=4)
    text = path.read_text()
    for entry in map(json.loads, text.splitlines()):
        assert set(entry) == ENTRY_KEYS
        assert all(isinstance(v, (int, float, list)) for v in entry["metrics"].values())
    for forbidden in ("PatientName", "DOE^", "StudyInstanceUID", ".dcm", ".npy", "manifest"):
        assert forbidden not in text


def test_site_cli_verifies_the_audit_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ctfed.common.cli import main

    config = tmp_path / "site.yaml"
    config.write_text(
        "site_id: hospital-a\ndata_path: cache\nsuperlink: 'fl.example.org:8000'\n"
        "ca_cert: keys/ca.crt\nprivate_key: keys/a.key\nstate_dir: state\n"
    )
    log = AuditLog(tmp_path / "state" / AUDIT_FILE)
    for server_round in (1, 2):
        log.append(kind=KIND_REFUSAL, run_id=7, server_round=server_round, site_id="hospital-a", reason="policy")
    assert main(["site", "--config", str(config), "--verify-audit"]) == 0
    assert "intact, 2 outgoing messages" in capsys.readouterr().out

    path = tmp_path / "state" / AUDIT_FILE
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0].replace("policy", "budget") + lines[1])
    assert main(["site", "--config", str(config), "--verify-audit"]) == 1
    assert "audit log BROKEN" in capsys.readouterr().err
