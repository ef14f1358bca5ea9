"""A site runs only the app bundles it pinned (``site.trusted_app_hashes``), for real.

A TLS SuperLink from ``ctfed server``'s code path and two SuperNodes started as ``ctfed site``
starts them (``start_supernode``: ``ctfed.client.supernode_main``): hospital-a pinned another
release's hash, hospital-b the hash ``ctfed site --app-hash`` computes from this checkout. The
coordinator submits this repository with ``flwr run``. hospital-a never stores or runs it (its
reply is Flower's INVALID_FAB error naming the bundle's hash, it trains nothing, its log names
the hash); hospital-b runs the same submission's round, so the hash a hospital computes from a
checkout is the one ``flwr run`` submits. Processes on 127.0.0.1, stopped in ``finally``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ctfed.client.audit import AUDIT_FILE
from ctfed.client.site_cli import LOG_FILE, RunningSuperNode, app_bundle_hash, start_supernode
from ctfed.common.certs import generate
from ctfed.common.config import load_run_config, read_site_config, save_run_config
from ctfed.common.processes import flower_tool, offline_env, stop_process_group
from ctfed.server.deploy_cli import SuperLinkSettings, list_nodes, register_sites, running_superlink
from helpers import submit_run, tiny_app

# Flower's build uses pathspec's deprecated gitwildmatch patterns; not ours to fix.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")]

APP_DIR = Path(__file__).resolve().parents[2]
REFUSING, RUNNING = "hospital-a", "hospital-b"
ONLINE_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 240.0


def _site_yaml(folder: Path, site_id: str, cache: Path, superlink: str, keys, trusted: str) -> Path:  # noqa: ANN001
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.yaml"
    path.write_text(
        f"site_id: {site_id}\ndata_path: {cache}\nsuperlink: '{superlink}'\nca_cert: {keys.ca_cert}\n"
        f"private_key: {keys.private_key}\nstate_dir: state\ntrusted_app_hashes: ['{trusted}']\n"
    )
    return path


def _leftover_processes(marker: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError, IndexError):
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if marker in text and state != "Z":
                found.append(f"{cmdline.parent.name}: {text[:160]}")
    return found


def test_a_site_never_runs_a_bundle_it_did_not_pin(tmp_path: Path, one_site_cache: Path) -> None:
    marker = str(tmp_path)
    # What the hospital computes from the checkout it reviewed (~10 s: Flower walks the whole
    # tree, .venv included, as 'flwr run' does), meanwhile the SuperLink starts.
    hashing = ThreadPoolExecutor(max_workers=1)
    reviewed_hash = hashing.submit(app_bundle_hash, APP_DIR)
    another_release = hashlib.sha256(b"another ctfed release").hexdigest()
    certs = generate(tmp_path / "certs", [REFUSING, RUNNING]).paths
    unread = tmp_path / "unread-cache"  # hospital-a must never get to read data
    unread.mkdir()
    (unread / "manifest.json").write_text("{}")
    run_dir = tmp_path / "run"
    config_file = tmp_path / "run.yaml"
    save_run_config(
        load_run_config(
            ["secagg.enabled=false", "federation.min_sites=1", "federation.rounds=1", "train.local_steps=1", "monitor.enabled=false"]
        ),
        config_file,
    )
    settings = SuperLinkSettings(state_dir=tmp_path / "coordinator", certs_dir=certs.root, host="127.0.0.1", port=0)
    nodes: list[RunningSuperNode] = []
    try:
        with running_superlink(settings) as link:
            register_sites([certs.site(s).public_key for s in (REFUSING, RUNNING)], link.flwr_home)
            reviewed = reviewed_hash.result()
            hashing.shutdown()
            for site_id, cache, trusted in ((REFUSING, unread, another_release), (RUNNING, one_site_cache, reviewed)):
                yaml = _site_yaml(tmp_path / site_id, site_id, cache, link.local_address, certs.site(site_id), trusted)
                nodes.append(start_supernode(read_site_config(yaml)))
            deadline = time.monotonic() + ONLINE_TIMEOUT_S
            while len([n for n in list_nodes(link.flwr_home) if n["status"] == "online"]) < 2:
                for node in nodes:
                    if node.process.poll() is not None:
                        pytest.fail(f"SuperNode {node.site_id} exited:\n{node.log_file.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"the SuperNodes did not come online in {ONLINE_TIMEOUT_S:.0f} s")
                time.sleep(1.0)

            run_config = f'run-config-file="{config_file}" run-dir="{run_dir}"'
            output = submit_run(APP_DIR, link.connection, link.flwr_home, run_config, RUN_TIMEOUT_S)
    finally:
        with ThreadPoolExecutor() as stopping:  # each waits for its SuperNode's graceful exit: together
            list(stopping.map(stop_process_group, [node.process for node in nodes]))

    refusing_log = (tmp_path / REFUSING / "state" / LOG_FILE).read_text()
    running_log = (tmp_path / RUNNING / "state" / LOG_FILE).read_text()
    # The site names the bundle it refused, by the hash the coordinator's 'flwr run' submitted.
    assert "REFUSED the app bundle of run" in refusing_log and f"sha256 {reviewed} is not among" in refusing_log, refusing_log[-3000:]
    assert "REFUSED" not in running_log and f"app pinned: only bundles with sha256 {reviewed}" in running_log
    # Nothing ran at hospital-a: no ClientApp ever wrote its audit log or took part.
    assert not (tmp_path / REFUSING / "state" / AUDIT_FILE).exists()
    assert (tmp_path / RUNNING / "state" / AUDIT_FILE).is_file()

    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed", output[-5000:]
    (round_1,) = results["rounds"]
    assert round_1["aggregated"] is True
    by_status = {s["status"]: s for s in round_1["sites"]}
    assert sorted(by_status) == ["aggregated", "failed"], round_1["sites"]
    assert by_status["aggregated"]["site"] == RUNNING
    # The coordinator sees Flower's verification error, naming the hash the site refused.
    assert REFUSING not in by_status["failed"]["site"]  # it never ran ctfed's ClientApp to say who it is
    assert f"app bundle sha256 {reviewed} is not among this site's trusted_app_hashes" in by_status["failed"]["reason"]

    deadline = time.monotonic() + 10
    while _leftover_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _leftover_processes(marker)


def test_app_hash_is_the_hash_of_what_flwr_build_writes(tmp_path: Path) -> None:
    """``flwr build`` names its file by the bundle's hash and writes the bundle: both agree with ``--app-hash``."""
    app = tiny_app(tmp_path / "app")
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [flower_tool("flwr"), "build", "--app", str(app)], cwd=out, env=offline_env(tmp_path / "flwr-home"),
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("*.fab")
    digest = app_bundle_hash(app)
    assert hashlib.sha256(built.read_bytes()).hexdigest() == digest
    assert built.name.endswith(f".{digest[:8]}.fab")
