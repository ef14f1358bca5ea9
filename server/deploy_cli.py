"""``ctfed server``: the coordinator's SuperLink for a deployed federation.

Starts ``flower-superlink`` with TLS from ``ctfed certs``, SuperNode authentication on (only
registered site keys may connect), a persistent state database, no runtime dependency
installation (hospital networks are offline) and no telemetry, and keeps it in the
foreground until Ctrl-C/SIGTERM. The state folder also gets a private Flower home with a
connection named ``ctfed``, so the coordinator's own ``flwr`` commands (register a site,
submit a run) reach this SuperLink over verified TLS:

    FLWR_HOME=STATE/flwr-home flwr supernode register certs/sites/hospital-d/hospital-d.pub ctfed
    FLWR_HOME=STATE/flwr-home flwr run . ctfed --stream

In Flower 1.41 registration goes through the Control API (same HTTPS port); there is no
key list file any more (``--auth-list-public-keys`` is rejected).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ctfed.common.certs import SITES_DIR, CertPaths, public_key_file_fingerprint
from ctfed.common.config import ConfigError
from ctfed.common.fileio import write_json_atomic
from ctfed.common.processes import (
    ProcessError,
    flower_tool,
    free_port,
    offline_env,
    require_free_port,
    run_in_foreground,
    start_logged,
    stop_process_group,
    wait_healthy,
    write_connection,
)

logger = logging.getLogger(__name__)

CONNECTION_NAME = "ctfed"
STATE_DB = "state.db"
LOG_FILE = "superlink.log"
CONSOLE_LOG = "superlink.console.log"
FLWR_HOME = "flwr-home"
# Site id -> key fingerprint and node id of every key this coordinator registered: a restart
# skips keys the SuperLink still knows (asking again logs "Public key already in use" errors)
# and ``--sites`` names the nodes, which ``flwr supernode list`` does not.
SITES_FILE = "sites.json"
RUNS_DIR = "runs"  # under the state folder: one folder per submitted run (submit_command)
DEFAULT_PORT = 8000  # Flower's own default, so site configs written for Flower still work
ALREADY_REGISTERED_CODE = "[code: 23]"  # Flower's ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE


@dataclass(frozen=True)
class SuperLinkSettings:
    """How the coordinator's SuperLink is started."""

    state_dir: Path
    certs_dir: Path | None = None
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT  # 0: a free port
    insecure: bool = False

    @property
    def certs(self) -> CertPaths | None:
        return None if self.certs_dir is None else CertPaths(self.certs_dir)


@dataclass(frozen=True)
class RunningSuperLink:
    """A started SuperLink and how to reach it from this machine."""

    process: subprocess.Popen
    port: int
    local_address: str
    flwr_home: Path
    log_file: Path
    connection: str = CONNECTION_NAME


@dataclass(frozen=True)
class Registration:
    """Outcome of registering one site public key."""

    site_id: str
    public_key: Path
    node_id: str | None
    status: str  # "registered" | "already registered"


def _local_host(bind_host: str) -> str:
    """Where this machine reaches a SuperLink bound to ``bind_host``."""
    return "127.0.0.1" if bind_host in ("", "0.0.0.0", "::", "[::]") else bind_host


def superlink_command(settings: SuperLinkSettings, port: int) -> list[str]:
    """The ``flower-superlink`` command line for these settings (TLS and node auth unless insecure)."""
    state = settings.state_dir
    flower_tool("flower-superlink")  # the same installation must provide it (clear error if not)
    # Flower's SuperLink in this interpreter, with site keys named by fingerprint and site
    # instead of PEM in its logs (server/superlink_main.py).
    launcher = [sys.executable, "-m", "ctfed.server.superlink_main"]
    if settings.certs_dir is not None:
        launcher += ["--site-keys", str(CertPaths(settings.certs_dir).root / SITES_DIR)]
    command = [
        *launcher, "--",
        "--host", settings.host,
        "--port", str(port),
        "--database", str(state / STATE_DB),
        "--disable-runtime-dependency-installation",
        "--log-file", str(state / LOG_FILE),
    ]
    if settings.insecure:
        # Flower refuses --enable-supernode-auth without TLS: any SuperNode may join.
        return [*command, "--insecure"]
    certs = settings.certs
    assert certs is not None
    return [
        *command,
        "--ssl-ca-certfile", str(certs.ca_cert),
        "--ssl-certfile", str(certs.server_cert),
        "--ssl-keyfile", str(certs.server_key),
        "--enable-supernode-auth",
    ]


def _check_settings(settings: SuperLinkSettings) -> None:
    if settings.insecure:
        return
    certs = settings.certs
    if certs is None:
        raise ConfigError("--certs DIR is required (the folder 'ctfed certs' wrote), or --insecure for a local test")
    certs.require_server_files()


def start_superlink(settings: SuperLinkSettings, *, echo: bool = False) -> RunningSuperLink:
    """Start the SuperLink, wait until it answers over (verified) HTTPS, write the connection.

    Raises ConfigError for missing certificates and ProcessError if it does not come up.
    """
    _check_settings(settings)
    state = settings.state_dir.resolve()
    settings = SuperLinkSettings(
        state_dir=state,
        certs_dir=None if settings.certs_dir is None else settings.certs_dir.resolve(),
        host=settings.host,
        port=settings.port,
        insecure=settings.insecure,
    )
    state.mkdir(parents=True, exist_ok=True)
    if settings.port:
        # Before anything starts or is written: a SuperLink already on this port (an
        # earlier 'ctfed server' still running, say) is named instead of half-started over.
        require_free_port(settings.host, settings.port, "the SuperLink (--port)")
    port = settings.port or free_port()
    flwr_home = state / FLWR_HOME
    host = _local_host(settings.host)
    local_address = f"{host}:{port}"
    certs = settings.certs
    write_connection(
        flwr_home, CONNECTION_NAME, local_address,
        root_certificates=None if settings.insecure or certs is None else certs.ca_cert,
    )
    log_file = state / LOG_FILE
    process = start_logged(superlink_command(settings, port), offline_env(flwr_home), state / CONSOLE_LOG, echo=echo)
    try:
        wait_healthy(
            port, process, log_file, host=host,
            ca_file=None if settings.insecure or certs is None else certs.ca_cert,
        )
    except BaseException:
        stop_process_group(process)
        raise
    return RunningSuperLink(process=process, port=port, local_address=local_address, flwr_home=flwr_home, log_file=log_file)


@contextlib.contextmanager
def running_superlink(settings: SuperLinkSettings, *, echo: bool = False) -> Iterator[RunningSuperLink]:
    """``start_superlink`` that always stops the SuperLink (and its children) on exit."""
    link = start_superlink(settings, echo=echo)
    try:
        yield link
    finally:
        stop_process_group(link.process)


def _flwr_json(command: Sequence[str], flwr_home: Path, timeout_s: float) -> dict:
    """Run a ``flwr ... --format json`` command and return its JSON answer."""
    try:
        done = subprocess.run(
            [flower_tool("flwr"), *command, "--format", "json"],
            env=offline_env(flwr_home), capture_output=True, text=True, timeout=timeout_s, check=False,
        )
    except subprocess.TimeoutExpired:
        raise ProcessError(f"'flwr {' '.join(command)}' did not answer within {timeout_s:.0f} s") from None
    start = done.stdout.find("{")
    try:
        return dict(json.loads(done.stdout[start:])) if start >= 0 else {}
    except json.JSONDecodeError:
        raise ProcessError(f"'flwr {' '.join(command)}' answered: {done.stdout.strip()} {done.stderr.strip()}") from None


def register_sites(
    public_keys: Sequence[Path], flwr_home: Path, connection: str = CONNECTION_NAME, timeout_s: float = 60.0
) -> list[Registration]:
    """Register site public keys with the SuperLink (``flwr supernode register``).

    Idempotent: a key this coordinator registered before (``SITES_FILE`` beside the Flower
    home) whose node the SuperLink still lists is not sent again, and a key the SuperLink
    knows otherwise is reported as such instead of failing. The site id is the key file's stem.
    """
    registry_path = flwr_home.parent / SITES_FILE
    registry = read_site_registry(registry_path)
    listed = {str(node["node-id"]) for node in list_nodes(flwr_home, connection, timeout_s)} if registry else set()
    results = []
    for key in public_keys:
        if not key.is_file():
            raise ConfigError(f"site public key {key} not found")
        site_id, fingerprint = key.stem, public_key_file_fingerprint(key)
        known = registry.get(site_id, {})
        if known.get("fingerprint") == fingerprint and str(known.get("node_id")) in listed:
            results.append(Registration(site_id, key, str(known["node_id"]), "already registered"))
            continue
        answer = _flwr_json(
            ["supernode", "register", str(key.resolve()), connection, "--name", site_id], flwr_home, timeout_s
        )
        if answer.get("success"):
            node_id = str(answer.get("node-id"))
            results.append(Registration(site_id, key, node_id, "registered"))
            registry[site_id] = {"fingerprint": fingerprint, "node_id": node_id}
            write_json_atomic(registry_path, registry)
        elif ALREADY_REGISTERED_CODE in str(answer.get("error-message", "")):
            results.append(Registration(site_id, key, None, "already registered"))
        else:
            raise ProcessError(f"registering {key} failed: {answer.get('error-message', answer)}")
    return results


def read_site_registry(path: Path) -> dict[str, dict[str, str]]:
    """``SITES_FILE``: {site id: {fingerprint, node_id}}; empty when absent."""
    if not path.is_file():
        return {}
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(registry, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise ConfigError(f"{path} is not a site registry written by 'ctfed server' ({err}); move it away") from None
    return registry


def list_nodes(flwr_home: Path, connection: str = CONNECTION_NAME, timeout_s: float = 60.0) -> list[dict]:
    """The SuperLink's SuperNodes (``flwr supernode list``): node-id, status (registered/online/offline)."""
    answer = _flwr_json(["supernode", "list", connection], flwr_home, timeout_s)
    if not answer.get("success"):
        raise ProcessError(f"listing SuperNodes failed: {answer.get('error-message', answer)}")
    return list(answer.get("nodes", []))


def site_table(flwr_home: Path, connection: str = CONNECTION_NAME) -> list[tuple[str, str, str]]:
    """(site, node id, status) of every SuperNode the SuperLink lists, named from ``SITES_FILE``."""
    names = {str(entry.get("node_id")): site for site, entry in read_site_registry(flwr_home.parent / SITES_FILE).items()}
    return [
        (names.get(str(node["node-id"]), "(not registered by ctfed server)"), str(node["node-id"]), str(node.get("status", "")))
        for node in list_nodes(flwr_home, connection)
    ]


def app_checkout() -> Path | None:
    """The checkout whose pyproject.toml is the Flower app ctfed is installed from (an
    editable install of the repository), or None (installed otherwise)."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    return root if pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text(encoding="utf-8") else None


def submit_command(link: RunningSuperLink, state: Path, started: float | None = None) -> str:
    """The ``flwr run`` command that submits the federation to ``link``: the app by its absolute
    path (so it works from any folder) and a run folder of its own under ``state/runs/``, where
    results.json, checkpoints and logs land (not inside the code checkout)."""
    app = app_checkout()
    run_dir = state / RUNS_DIR / time.strftime("run-%Y%m%d-%H%M%S", time.localtime(started))
    return shlex.join([
        f"FLWR_HOME={link.flwr_home}", "flwr", "run", str(app) if app else ".", link.connection, "--stream",
        "--run-config", f'run-dir="{run_dir}"',
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", type=Path, required=True, help="folder for the SuperLink database, logs and Flower home")
    parser.add_argument("--certs", type=Path, help="folder written by 'ctfed certs' (CA, server certificate and key)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTPS port for sites and tools (default {DEFAULT_PORT}; 0: a free one)")
    parser.add_argument(
        "--register-sites", action="store_true",
        help="after start, register every CERTS/sites/*/*.pub (already known keys are skipped)",
    )
    parser.add_argument(
        "--sites", action="store_true",
        help="do not start: list the SuperNodes of the SuperLink running for --state, by site name and status",
    )
    parser.add_argument(
        "--register", nargs="+", type=Path, metavar="KEY.pub",
        help="do not start: register these site public keys with the SuperLink already running for --state",
    )
    parser.add_argument("--insecure", action="store_true", help="no TLS and no site authentication: local tests only")


def _print_registrations(registrations: Sequence[Registration]) -> None:
    for reg in registrations:
        node = f" (node {reg.node_id})" if reg.node_id else ""
        print(f"site {reg.site_id}: {reg.status}{node}")


def run(args: argparse.Namespace) -> int:
    state: Path = args.state.resolve()
    flwr_home = state / FLWR_HOME
    try:
        if args.register or args.sites:
            if not (flwr_home / "config.toml").is_file():
                raise ConfigError(f"no SuperLink connection in {flwr_home}; start 'ctfed server --state {state}' first")
            if args.register:
                _print_registrations(register_sites(args.register, flwr_home))
            else:
                for site, node_id, status in site_table(flwr_home):
                    print(f"{site}\tnode {node_id}\t{status}")
            return 0
        if args.insecure and args.register_sites:
            raise ConfigError("--register-sites needs TLS: without it Flower cannot authenticate sites")
        settings = SuperLinkSettings(state_dir=state, certs_dir=args.certs, host=args.host, port=args.port, insecure=args.insecure)
        link = start_superlink(settings, echo=True)
    except ProcessError as err:
        print(f"ctfed server: {err}", file=sys.stderr)
        return 1
    try:
        print(f"ctfed server: SuperLink ready on {args.host}:{link.port} (state {state}, log {link.log_file})")
        if args.insecure:
            print("ctfed server: WARNING --insecure: no TLS, any SuperNode can join")
        if args.register_sites:
            assert settings.certs is not None
            keys = settings.certs.site_public_keys()
            if not keys:
                print(f"ctfed server: no site keys under {settings.certs.root}/sites")
            _print_registrations(register_sites(keys, link.flwr_home))
        print(
            "ctfed server: register more sites with\n"
            f"  ctfed server --state {state} --register KEY.pub\n"
            "submit a run (from any folder; a new run folder each time) with\n"
            f"  {submit_command(link, state)}\n"
            "Ctrl-C stops the SuperLink."
        )
    except ProcessError as err:
        stop_process_group(link.process)
        print(f"ctfed server: {err}", file=sys.stderr)
        return 1
    except BaseException:
        stop_process_group(link.process)
        raise
    return run_in_foreground(link.process)
