"""The deployment wrappers' processes, for real on 127.0.0.1: a SIGKILLed ``ctfed server`` /
``ctfed site`` takes its SuperLink / SuperNode with it, and a busy port is named up front.

Each wrapper is started as an operator would (``python -m ctfed.common.cli ...``) in a
session of its own, so the test can kill the wrapper alone, as the OOM killer or ``kill -9``
would. Every wait is bounded; whatever survives is killed in ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctfed.client.site_cli import start_supernode
from ctfed.common.certs import generate
from ctfed.common.config import read_site_config
from ctfed.common.processes import ProcessError, descendant_pids, free_port, port_holder, stop_process_group

pytestmark = pytest.mark.slow

READY_TIMEOUT_S = 90.0
DEATH_TIMEOUT_S = 30.0


def _ctfed(args: list[str], output: Path) -> subprocess.Popen:
    with output.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ctfed.common.cli", *args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )


def _wait_for(output: Path, text: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if text in output.read_text(errors="replace"):
            return
        if process.poll() is not None:
            pytest.fail(f"exited with {process.returncode} before '{text}':\n{output.read_text()[-3000:]}")
        time.sleep(0.3)
    pytest.fail(f"no '{text}' within {READY_TIMEOUT_S:.0f} s:\n{output.read_text()[-3000:]}")


def _child_named(process: subprocess.Popen, name: str) -> int:
    for pid in descendant_pids(process.pid):
        with contextlib.suppress(OSError):
            if name in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                return pid
    pytest.fail(f"no {name} process under pid {process.pid}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_dead(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + DEATH_TIMEOUT_S
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    return [pid for pid in pids if _alive(pid)]


def _kill_all(process: subprocess.Popen, pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    stop_process_group(process, timeout_s=5)


def test_killed_server_takes_its_superlink_and_a_busy_port_is_named(tmp_path: Path) -> None:
    port = free_port()
    args = ["server", "--state", str(tmp_path / "coordinator"), "--insecure", "--host", "127.0.0.1", "--port", str(port)]
    server = _ctfed(args, tmp_path / "server.out")
    started: list[int] = []
    try:
        _wait_for(tmp_path / "server.out", "SuperLink ready", server)
        superlink = _child_named(server, "superlink_main")
        started = [superlink, *descendant_pids(superlink)]

        # A second coordinator on the same port: one line naming the holder, nothing started.
        second = _ctfed(args, tmp_path / "second.out")
        assert second.wait(timeout=READY_TIMEOUT_S) == 1
        lines = (tmp_path / "second.out").read_text().strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"ctfed server: port {port} is already in use by pid {superlink} (")
        assert "ctfed.server.superlink_main" in lines[0]
        assert "SuperLink ready" not in lines[0]

        os.kill(server.pid, signal.SIGKILL)  # the wrapper only, no chance to clean up
        server.wait(timeout=10)
        assert not _wait_dead(started), "the SuperLink outlived its killed 'ctfed server'"
        assert port_holder(port) is None
    finally:
        _kill_all(server, started)


def test_killed_site_takes_its_supernode(tmp_path: Path) -> None:
    certs = generate(tmp_path / "certs", ["hospital-a"]).paths
    keys = certs.site("hospital-a")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")  # the SuperNode never gets to read it here
    nobody = free_port()  # no SuperLink: the SuperNode keeps trying to connect
    runtime_port = free_port()
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(
        f"site_id: hospital-a\ndata_path: {cache}\nsuperlink: '127.0.0.1:{nobody}'\n"
        f"ca_cert: {keys.ca_cert}\nprivate_key: {keys.private_key}\nstate_dir: state\nruntime_port: {runtime_port}\n"
    )
    site = _ctfed(["site", "--config", str(site_yaml)], tmp_path / "site.out")
    started: list[int] = []
    try:
        _wait_for(tmp_path / "site.out", "SuperNode connecting", site)
        # Unpinned (no site.trusted_app_hashes): said at start, by ctfed site and in the SuperNode's log.
        assert "WARNING: app not pinned: this site runs any code the coordinator submits" in (tmp_path / "site.out").read_text()
        supernode = _child_named(site, "ctfed.client.supernode_main")
        started = [supernode, *descendant_pids(supernode)]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while port_holder(runtime_port) is None and time.monotonic() < deadline:
            time.sleep(0.3)

        # A second SuperNode on the same Runtime API port is refused before it starts.
        with pytest.raises(ProcessError, match=rf"port {runtime_port} is already in use by pid {supernode} \(.*ctfed.client.supernode_main"):
            start_supernode(read_site_config(site_yaml))

        os.kill(site.pid, signal.SIGKILL)
        site.wait(timeout=10)
        assert not _wait_dead(started), "the SuperNode outlived its killed 'ctfed site'"
    finally:
        _kill_all(site, started)


def test_a_busy_port_names_this_process() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_holder(port) is not None and port_holder(port).startswith(f"pid {os.getpid()} (")
    assert port_holder(port) is None
