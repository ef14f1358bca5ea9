"""Starting, health-checking and stopping Flower's own processes (SuperLink, SuperNode, CLI).

The simulation engine (``simulations/runtime/engine.py``) and the deployment commands
(``ctfed server``, ``ctfed site``) launch the same Flower executables in the same way:
from this interpreter's environment, offline, in their own process group so that a
SuperLink and every ServerApp/ClientApp process it spawned stop together. One copy of that
logic lives here so both sides shut down the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from ctfed.common.fileio import write_text_atomic

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ProcessError(RuntimeError):
    """A Flower process could not be found, started or reached."""


def flower_tool(name: str, error: type[Exception] = ProcessError) -> str:
    """Flower's executable ``name`` from the same environment as this interpreter.

    Flower's processes launch each other by name, so using the copy next to
    ``sys.executable`` keeps every process on one Flower version.
    """
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise error(f"'{name}' not found; is flwr[simulation] installed in this environment?")
    return found


def _load_prctl():  # noqa: ANN202 - a ctypes function, or None off Linux
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once in the parent: the child between fork and exec should only make the call.
_PRCTL = _load_prctl()


def die_with_parent_hook(signum: int = signal.SIGTERM):  # noqa: ANN201 - a preexec_fn, or None
    """A ``preexec_fn`` that makes the child get ``signum`` when this process dies (Linux).

    ``ctfed server`` and ``ctfed site`` start the SuperLink / SuperNode in a process group
    of their own (so Ctrl-C stops it with all it spawned); without this, a SIGKILLed
    wrapper (OOM killer, ``kill -9``, a closed SSH session's hard kill) would leave that
    group running on its port. SIGTERM lets Flower shut its children down cleanly. The
    signal follows the thread that starts the child, so call ``Popen`` from a thread that
    lives as long as the child should (here: the main thread). None off Linux.
    """
    if _PRCTL is None:
        return None
    parent = os.getpid()

    def hook() -> None:
        _PRCTL(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call: no signal will come
            os._exit(1)

    return hook


def port_holder(port: int) -> str | None:
    """Who listens on TCP ``port`` on this machine: ``pid N (command line)``, or a note that
    another user's process does; None when nobody listens (Linux ``/proc``)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text(encoding="utf-8").splitlines()[1:]:
                fields = line.split()
                # local_address is HEX_IP:HEX_PORT; state 0A is LISTEN.
                if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        pid = fd_dir.parent.name
                        cmdline = (fd_dir.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                        return f"pid {pid} ({cmdline[:200]})"
    return "a process of another user (not visible to this one)"


def require_free_port(host: str, port: int, what: str) -> None:
    """Raise ProcessError in one line, naming the holder, if ``host:port`` cannot be bound.

    Checked before a Flower process starts, because Flower would start, print that it is
    ready, and only then fail deep in its log with uvicorn's "address already in use".
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As servers bind: a port left in TIME_WAIT by a stopped process is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise ProcessError(f"cannot listen on {host}:{port} for {what}: {err.strerror}") from None
            holder = port_holder(port) or "another process"
            raise ProcessError(
                f"port {port} is already in use by {holder}; stop it or choose another port for {what}"
            ) from None


def free_port() -> int:
    """A loopback port nobody listens on right now (ask the OS, never hard-code one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def offline_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: private home, no telemetry, no update checks."""
    env = os.environ.copy()
    # Flower's processes launch each other by name (flower-superexec, flwr-simulation).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DEDUP_LOGS": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def wait_healthy(
    port: int,
    process: subprocess.Popen,
    log_file: Path,
    *,
    host: str = "127.0.0.1",
    ca_file: Path | None = None,
    what: str = "the SuperLink",
    timeout_s: float = STARTUP_TIMEOUT_S,
    error: type[Exception] = ProcessError,
) -> None:
    """Poll the SuperLink's ``/health`` on ``host`` (loopback by default) until it answers 200.

    With ``ca_file`` the check goes over HTTPS and verifies the server certificate against
    that CA, so a certificate without a 127.0.0.1 SAN fails here, not in the first site.
    Raises ``error`` if the process exits or the deadline passes.
    """
    scheme, context = "http", None
    if ca_file is not None:
        scheme, context = "https", ssl.create_default_context(cafile=str(ca_file))
    url = f"{scheme}://{host}:{port}/health"
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise error(f"{what} exited with code {process.returncode}; see {log_file}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as response:
                if response.status == 200:
                    return
        except OSError as err:
            # urlopen wraps the TLS error in a URLError; waiting longer will not fix a
            # certificate the CA does not vouch for.
            cause = getattr(err, "reason", err)
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise error(f"{what} on {url} presents a certificate that does not verify: {cause.verify_message}") from None
            last_error = str(err)
        time.sleep(0.3)
    detail = f" (last error: {last_error})" if last_error else ""
    raise error(f"{what} did not become ready in {timeout_s:.0f} s{detail}; see {log_file}")


def probe_superlink(address: str, ca_file: Path | None, timeout_s: float = 10.0) -> str:
    """Connect once to the SuperLink at ``host:port``: TCP, the TLS handshake verified
    against ``ca_file`` (None: plain HTTP) for that host name, then ``/health``.

    Returns a one-line description of what answered; raises ProcessError naming what is
    wrong (nothing listening, no answer, a certificate the CA does not vouch for or that
    does not name the host, something that is not a SuperLink). One bounded attempt.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    scheme, context = "http", None
    if ca_file is not None:
        scheme, context = "https", ssl.create_default_context(cafile=str(ca_file))
    url = f"{scheme}://{address}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as response:
            status = response.status
    except urllib.error.HTTPError as err:
        raise ProcessError(f"{address} answers over verified TLS but /health says HTTP {err.code}: not a SuperLink?") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)  # urlopen wraps socket and TLS errors in URLError
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise ProcessError(
                f"the TLS certificate of {address} does not verify against {ca_file}: {reason.verify_message} "
                "(a CA certificate from another coordinator, or a server certificate without this host name)"
            ) from None
        if isinstance(reason, ssl.SSLError):
            raise ProcessError(f"the TLS handshake with {address} failed ({reason}): is it a SuperLink with TLS?") from None
        if isinstance(reason, ConnectionRefusedError):
            raise ProcessError(f"nothing listens on {address} (connection refused): a wrong port, or the SuperLink is not running") from None
        if isinstance(reason, socket.gaierror):
            raise ProcessError(f"cannot resolve the host name '{host}' of {address}: {reason.strerror}") from None
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise ProcessError(f"no answer from {address} within {timeout_s:.0f} s: a firewall, or a wrong host or port") from None
        raise ProcessError(f"cannot reach {address}: {reason}") from None
    if status != 200:
        raise ProcessError(f"{address} answered /health with HTTP {status}: not a ready SuperLink")
    tls = f"TLS verified against {ca_file}" if ca_file is not None else "no TLS"
    return f"SuperLink answering on {address} ({tls})"


def descendant_pids(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_process_group(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM a process started with ``start_new_session=True`` and its children; SIGKILL if slow.

    Flower's SuperLink and SuperNode spawn ``flower-superexec``, which spawns the app
    processes, some in sessions of their own (they watch their parent and exit with it).
    We signal the whole group, then sweep any descendant that outlived the grace period,
    so nothing is left behind. Returns the exit code.
    """
    descendants = descendant_pids(process.pid)
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # The leader may be gone while processes it spawned still run.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while descendants and time.monotonic() < deadline:
        descendants = [pid for pid in descendants if Path(f"/proc/{pid}").exists() and not _is_zombie(pid)]
        time.sleep(0.2)
    for pid in descendants:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return process.returncode


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def run_in_foreground(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> int:
    """Wait for a long-running Flower process; Ctrl-C or SIGTERM stops its whole group.

    Used by ``ctfed server`` and ``ctfed site``: the operator's signal is forwarded as a
    SIGTERM to the group so Flower can deregister and shut down cleanly. Returns the
    process's exit code, or 128 + the signal number when the operator stopped it.
    """
    received: list[int] = []

    def _forward(signum: int, _frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _forward)
    try:
        return process.wait()
    except KeyboardInterrupt:
        stop_process_group(process, timeout_s)
        return 128 + (received[0] if received else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if process.poll() is None:
            stop_process_group(process, timeout_s)


def write_connection(
    flwr_home: Path,
    name: str,
    address: str,
    *,
    root_certificates: Path | None = None,
) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one default SuperLink connection.

    Without ``root_certificates`` the connection is plain HTTP (``insecure = true``);
    with it, HTTPS verified against that CA (Flower requires an absolute path).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [f'[superlink]\ndefault = "{name}"\n', f"[superlink.{name}]", f'address = "{address}"']
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{root_certificates.resolve()}"')
    write_text_atomic(flwr_home / "config.toml", "\n".join(lines) + "\n")


def start_logged(command: list[str], env: dict[str, str], log_file: Path, *, echo: bool) -> subprocess.Popen:
    """Start ``command`` in its own process group, its output appended to ``log_file``.

    With ``echo`` the output is also shown on this console (the operator's foreground
    view); without, it only goes to the file (tests, background use). The own process
    group lets ``stop_process_group`` take every child down with it, and the child gets
    SIGTERM if this process dies without stopping it (``die_with_parent_hook``).
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log = log_file.open("ab")
    hook = die_with_parent_hook()
    if not echo:
        try:
            return subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=hook,
            )
        finally:
            log.close()  # the child holds its own copy of the descriptor
    process = subprocess.Popen(
        command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=hook,
    )

    def _copy() -> None:
        assert process.stdout is not None
        with log:
            for line in iter(process.stdout.readline, b""):
                log.write(line)
                log.flush()
                sys.stdout.buffer.write(line)
                sys.stdout.flush()

    threading.Thread(target=_copy, name=f"log-{Path(command[0]).name}", daemon=True).start()
    return process


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far in MB, for capacity planning.

    Linux's VmHWM is the peak of this address space since exec; ``ru_maxrss`` (the fallback
    elsewhere) would carry over the peak of the process that forked this one."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0  # KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
