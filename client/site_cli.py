"""``ctfed site``: a hospital's SuperNode, from one validated YAML file.

Everything a site's IT decides lives in ``site.yaml`` (see ``conf/site.yaml``): its site id,
the prepared cache, the SuperLink address, the CA certificate, its auth key and its policy
(what the site takes part in, ``client/policy.py``). The file
is validated, and the cache and keys checked, before any process starts, so a typo is a
one-line error instead of a SuperNode that retries forever. The SuperNode then runs
offline in the foreground until Ctrl-C/SIGTERM; the ClientApp finds the cache and site id
in its node config (``client/site.py``). It runs through ``client/supernode_main.py``, which
stores and runs only the app bundles ``site.trusted_app_hashes`` pins (``--app-hash DIR``
prints a reviewed checkout's hash).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ctfed.client.audit import AUDIT_FILE, AuditLogError, verify_audit_log
from ctfed.client.policy import POLICY_FILE, POLICY_FILE_KEY, write_policy_file
from ctfed.client.secagg import ROSTER_KEY, SIGNING_KEY_KEY
from ctfed.client.site import DATA_PATH_KEY, SITE_ID_KEY, STATE_DIR_KEY
from ctfed.client.supernode_main import NOT_PINNED
from ctfed.common.certs import make_signing_key, make_supernode_key
from ctfed.common.config import ConfigError, SiteConfig, read_site_config
from ctfed.common.processes import (
    ProcessError,
    flower_tool,
    free_port,
    offline_env,
    probe_superlink,
    require_free_port,
    run_in_foreground,
    start_logged,
)

LOG_FILE = "supernode.log"
# The last heartbeat the SuperLink accepted from this site's SuperNode (client/supernode_main.py),
# so that a SuperNode started after a crash waits out the dead one's connection.
HEARTBEAT_FILE = "supernode.heartbeat.json"
CHECK_TIMEOUT_S = 10.0  # --check: one connection attempt to the SuperLink, at most this long
# ``ctfed certs`` writes this comment, then the site id, into each site's public key file.
SITE_KEY_COMMENT_PREFIX = "ctfed-site-"
FLWR_HOME = "flwr-home"
# What Flower 1.41's SuperNode logs when the SuperLink refuses to activate its key
# (ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED): no SuperNode is registered with that public
# key (or one with the same key is connected already). It then exits.
ACTIVATION_REFUSED = "Failed to activate SuperNode"
# The SuperLink also refuses a key whose node it still counts as online: a site restarted
# after a crash, within two of its heartbeat intervals (Flower's patience). ``ctfed site``
# starts its SuperNode again every this many seconds for that long (plus the margin) before
# it says the key is not registered.
ACTIVATION_RETRY_S = 5.0
ACTIVATION_MARGIN_S = 5.0
# ... when it stops retrying after site.max_wait_s, and when the TLS handshake fails.
GAVE_UP = "Giving up reconnection"
TLS_FAILED = "SSL/TLS handshake error detected"


@dataclass(frozen=True)
class RunningSuperNode:
    """A started SuperNode process and where its output goes."""

    process: subprocess.Popen
    site_id: str
    log_file: Path
    runtime_port: int
    log_offset: int = 0  # where this process's output starts in ``log_file`` (appended)


def site_key_fingerprint(cfg: SiteConfig) -> str:
    """The OpenSSH fingerprint of this site's public key (``ssh-keygen -lf <site>.pub``)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    from ctfed.common.certs import key_fingerprint

    key = load_ssh_private_key(Path(cfg.private_key).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)  # check_files made sure
    return key_fingerprint(key.public_key())


def _site_named_by(public_key_file: Path) -> str:
    """The site a ``ctfed certs`` public key names (its comment ``ctfed-site-<id>``), else its stem."""
    with contextlib.suppress(OSError, IndexError):
        comment = public_key_file.read_text(encoding="utf-8").split()[2]
        if comment.startswith(SITE_KEY_COMMENT_PREFIX):
            return comment.removeprefix(SITE_KEY_COMMENT_PREFIX)
    return public_key_file.stem


def check_key_owner(cfg: SiteConfig) -> str:
    """Refuse another site's key under this ``site_id``, as far as the files beside it tell.

    ``ctfed certs`` writes ``<site>.key`` beside ``<site>.pub``, whose comment names the
    site. A public key there that matches the private key and names another site, or a
    ``<site_id>.pub`` that does not match it, is a ConfigError; with no public key beside it
    the fingerprint is all there is (the coordinator registered a fingerprint per site).
    Returns a line saying what was found.
    """
    from cryptography.exceptions import UnsupportedAlgorithm

    from ctfed.common.certs import public_key_file_fingerprint

    key_path = Path(cfg.private_key)
    fingerprint = site_key_fingerprint(cfg)
    owner: tuple[str, Path] | None = None
    for public in sorted(key_path.parent.glob("*.pub")):
        try:
            matches = public_key_file_fingerprint(public) == fingerprint
        except (ValueError, OSError, UnsupportedAlgorithm):
            continue
        site = _site_named_by(public)
        if matches and site != cfg.site_id:
            raise ConfigError(
                f"site.private_key {key_path} is site {site}'s key ({public} holds its public key, {fingerprint}), "
                f"not site_id {cfg.site_id}'s: the coordinator would take this SuperNode for {site}; "
                f"use {cfg.site_id}'s own key from 'ctfed certs'"
            )
        if not matches and public.stem == cfg.site_id:
            raise ConfigError(
                f"site.private_key {key_path} ({fingerprint}) does not belong to {public}, "
                f"the public key of site {cfg.site_id}: use the {cfg.site_id}.key that came with it"
            )
        if matches:
            owner = (site, public)
    if owner is None:
        return f"key {fingerprint} (no public key beside it names its site; the coordinator must have registered this one)"
    return f"key {fingerprint} is site {owner[0]}'s ({owner[1].name})"


def _own_output(node: RunningSuperNode) -> str:
    """What this start of the SuperNode wrote to its log ("" if unreadable)."""
    with contextlib.suppress(OSError):
        with node.log_file.open("rb") as log:
            log.seek(node.log_offset)
            return log.read().decode(errors="replace")
    return ""


def activation_refused(node: RunningSuperNode) -> bool:
    """Whether the SuperNode exited because the SuperLink refused to activate its key."""
    return ACTIVATION_REFUSED in _own_output(node)


def exit_diagnosis(cfg: SiteConfig, node: RunningSuperNode) -> str | None:
    """Why the SuperNode exited, in the site's terms, when its log says (None: it does not)."""
    output = _own_output(node)
    if output:
        if ACTIVATION_REFUSED in output:
            return (
                f"this site's key is not registered with the coordinator (key fingerprint "
                f"{site_key_fingerprint(cfg)}): the SuperLink refused to activate it for "
                f"{activation_window_s(cfg):g} s. Send {cfg.site_id}.pub "
                f"to the coordinator to register ('ctfed server --state STATE --register {cfg.site_id}.pub'); "
                "if it is registered, another SuperNode with this key is connected already"
            )
        if TLS_FAILED in output:
            return (
                f"the TLS handshake with {cfg.superlink} failed: site.ca_cert {cfg.ca_cert} does not vouch for its "
                "certificate (another coordinator's CA?), or it names another host; 'ctfed site --check' tells which"
            )
        if GAVE_UP in output:
            return (
                f"could not reach the SuperLink at {cfg.superlink} for site.max_wait_s={cfg.max_wait_s:g} s and gave up "
                "(a wrong host or port, or the coordinator is down); 'ctfed site --check' tests the connection"
            )
    return None


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def node_config(cfg: SiteConfig) -> str:
    """The ``--node-config`` string: cache, site id, state folder, policy file, signing key and roster."""
    values = {
        DATA_PATH_KEY: cfg.data_path,
        SITE_ID_KEY: cfg.site_id,
        STATE_DIR_KEY: str(cfg.state_path),
        POLICY_FILE_KEY: str(cfg.state_path / POLICY_FILE),
    }
    # Secure aggregation's signing key and the roster pinned here (client/secagg.py); without
    # them the site refuses secure-aggregation rounds.
    if cfg.signing_key and cfg.roster:
        values.update({SIGNING_KEY_KEY: cfg.signing_key, ROSTER_KEY: cfg.roster})
    return " ".join(f"{key}={_toml_string(value)}" for key, value in values.items())


def app_bundle_hash(app_dir: Path) -> str:
    """SHA-256 of the app bundle (FAB) Flower builds from ``app_dir``: ``flwr run``'s ``fab_hash``.

    Flower's own build (``build_fab_from_disk``: its include/exclude rules, sorted entries,
    fixed zip dates) is deterministic, so a hospital gets from a checkout it reviewed the
    hash of exactly the bundle the coordinator submits from the same tree. Raises ConfigError
    when ``app_dir`` is no Flower app.
    """
    from flwr.cli.build import build_fab_from_disk

    if not (app_dir / "pyproject.toml").is_file():
        raise ConfigError(f"--app-hash {app_dir}: no pyproject.toml there; give the folder of a ctfed checkout")
    try:
        bundle = build_fab_from_disk(app_dir)
    except ValueError as err:
        raise ConfigError(f"--app-hash {app_dir}: Flower cannot build an app bundle from it: {err}") from None
    return hashlib.sha256(bundle).hexdigest()


def app_pin_status(cfg: SiteConfig) -> str:
    """One line: the bundles this site runs (its pinned hashes), or the unpinned warning."""
    if not cfg.trusted_app_hashes:
        return f"WARNING: {NOT_PINNED} (set site.trusted_app_hashes; see 'ctfed site --app-hash')"
    return "app pinned: runs only the app bundles with sha256 " + ", ".join(cfg.trusted_app_hashes)


def supernode_command(cfg: SiteConfig, runtime_port: int) -> list[str]:
    """The SuperNode's command line: TLS to the SuperLink, node auth, local Runtime API.

    Flower's ``flower-supernode`` run through ``ctfed.client.supernode_main`` in the same
    process, which refuses every app bundle whose hash ``site.trusted_app_hashes`` does not pin.
    """
    flower_tool("flower-supernode")  # the same installation must provide it (clear error if not)
    launcher = [sys.executable, "-m", "ctfed.client.supernode_main"]
    for digest in cfg.trusted_app_hashes:
        launcher += ["--trusted-app-hash", digest]
    # Flower's process isolation, with ctfed's ClientApp executor beside the SuperNode
    # (client/clientapp_executor.py): each message still runs in a process of its own, forked
    # from one that imported the ClientApp at start, instead of a fresh flwr-clientapp.
    launcher += ["--clientapp-executor", f"127.0.0.1:{runtime_port}"]
    launcher += ["--heartbeat-interval", f"{cfg.heartbeat_interval_s:g}"]
    launcher += ["--heartbeat-file", str(cfg.state_path / HEARTBEAT_FILE)]
    command = [
        *launcher, "--",
        "--superlink", cfg.superlink,
        "--root-certificates", cfg.ca_cert,
        "--auth-supernode-private-key", cfg.private_key,
        "--node-config", node_config(cfg),
        "--isolation", "process",
        # The Runtime API only serves this SuperNode's own ClientApp processes: loopback,
        # on a port of its own so several SuperNodes can share a machine.
        "--host", "127.0.0.1",
        "--port", str(runtime_port),
    ]
    if cfg.max_wait_s > 0:
        command += ["--max-wait-time", str(cfg.max_wait_s)]
    return command


def start_supernode(cfg: SiteConfig, *, echo: bool = False) -> RunningSuperNode:
    """Check the site's files, then start its SuperNode (output in ``<state>/supernode.log``).

    Raises ConfigError before starting anything if the cache or a key is missing.
    """
    cfg.check_files()
    check_key_owner(cfg)
    state = cfg.state_path
    state.mkdir(parents=True, exist_ok=True)
    # The ClientApp reads the policy from here (node config ``policy-file``) every round.
    write_policy_file(cfg.policy, state)
    if cfg.runtime_port:
        require_free_port("127.0.0.1", cfg.runtime_port, "this SuperNode's Runtime API (site.runtime_port)")
    port = cfg.runtime_port or free_port()
    log_file = state / LOG_FILE
    offset = log_file.stat().st_size if log_file.is_file() else 0
    process = start_logged(supernode_command(cfg, port), offline_env(state / FLWR_HOME), log_file, echo=echo)
    return RunningSuperNode(process=process, site_id=cfg.site_id, log_file=log_file, runtime_port=port, log_offset=offset)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="the site's YAML file (example: conf/site.yaml); required unless --app-hash")
    parser.add_argument(
        "--app-hash", type=Path, metavar="DIR",
        help="print the SHA-256 of the app bundle Flower builds from the ctfed checkout DIR (the value for "
        "site.trusted_app_hashes: the bundle 'flwr run DIR' submits) and exit",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=(
            "validate the config, files and key (another site's key is refused), print the command, connect once "
            "to the SuperLink (TLS verified against ca_cert); start nothing"
        ),
    )
    parser.add_argument(
        "--verify-audit", action="store_true", help="check the hash chain of this site's audit log and exit"
    )
    parser.add_argument(
        "--make-signing-key", action="store_true",
        help="make this site's secure-aggregation signing key at site.signing_key and print the roster line to share",
    )
    parser.add_argument(
        "--make-keys", action="store_true",
        help="make this site's keys here: the SuperNode auth key at site.private_key (+ .pub for the coordinator) "
        "and the signing key; only public keys leave the site",
    )
    parser.add_argument("--force", action="store_true", help="with --make-keys/--make-signing-key: replace existing keys")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config values, e.g. runtime_port=9095")


def run(args: argparse.Namespace) -> int:
    if args.app_hash is not None:
        try:
            print(app_bundle_hash(args.app_hash.expanduser().resolve()))
        except ConfigError as err:
            print(f"ctfed site: {err}", file=sys.stderr)
            return 1
        return 0
    if args.config is None:
        print("ctfed site: --config SITE.yaml is required (unless --app-hash DIR)", file=sys.stderr)
        return 2
    cfg = read_site_config(args.config, args.overrides)
    if args.verify_audit:
        path = cfg.state_path / AUDIT_FILE
        try:
            entries = verify_audit_log(path)
        except AuditLogError as err:
            print(f"ctfed site: {cfg.site_id}: audit log BROKEN: {err}", file=sys.stderr)
            return 1
        print(f"ctfed site: {cfg.site_id}: audit log {path} intact, {entries} outgoing messages")
        return 0
    if args.make_keys:
        try:
            public = make_supernode_key(Path(cfg.private_key), cfg.site_id, force=args.force)
        except ConfigError as err:
            print(f"ctfed site: {err}", file=sys.stderr)
            return 1
        print(f"ctfed site: {cfg.site_id}: SuperNode auth key written to {cfg.private_key} (mode 0600, stays here)")
        print(f"Send {public} to the coordinator ('ctfed server --state STATE --register {public.name}').")
        if not cfg.signing_key:
            return 0
    if args.make_signing_key or args.make_keys:
        if not cfg.signing_key:
            print("ctfed site: set site.signing_key (e.g. keys/<site>.sign.key) in the config first", file=sys.stderr)
            return 1
        try:
            line = make_signing_key(Path(cfg.signing_key), force=args.force)
        except ConfigError as err:
            print(f"ctfed site: {err}", file=sys.stderr)
            return 1
        print(f"ctfed site: {cfg.site_id}: signing key written to {cfg.signing_key} (keep it here, mode 0600)")
        print("Add this line to the federation roster and have every hospital check it out of band:")
        print(f'{cfg.site_id}: "{line}"')
        return 0
    if args.check:
        cfg.check_files()
        print(shlex.join(supernode_command(cfg, cfg.runtime_port or free_port())))
        print(f"ctfed site: {cfg.site_id}: configuration and files OK; {check_key_owner(cfg)}")
        print(f"ctfed site: {cfg.site_id}: {app_pin_status(cfg)}")
        try:
            print(f"ctfed site: {cfg.site_id}: {probe_superlink(cfg.superlink, Path(cfg.ca_cert), CHECK_TIMEOUT_S)}")
        except ProcessError as err:
            print(f"ctfed site: {cfg.site_id}: connection check FAILED: {err}", file=sys.stderr)
            return 1
        return 0
    print(f"ctfed site: {cfg.site_id}: {app_pin_status(cfg)}", file=sys.stderr if not cfg.trusted_app_hashes else sys.stdout)
    try:
        return run_site(cfg)
    except ProcessError as err:
        print(f"ctfed site: {err}", file=sys.stderr)
        return 1


def activation_window_s(cfg: SiteConfig) -> float:
    """How long after its start a site keeps retrying a refused activation: the SuperLink's
    patience with the site's previous connection (two heartbeat intervals) and a margin."""
    return 2 * cfg.heartbeat_interval_s + ACTIVATION_MARGIN_S


def run_site(cfg: SiteConfig) -> int:
    """Run the site's SuperNode in the foreground until it exits; its exit code.

    A refused activation within ``activation_window_s`` of the start is retried: after a
    crash the SuperLink holds the site's previous connection until it misses two heartbeats.
    """
    retry_until = time.monotonic() + activation_window_s(cfg)
    while True:
        node = start_supernode(cfg, echo=True)
        print(
            f"ctfed site: {cfg.site_id}: SuperNode connecting to {cfg.superlink} with key {site_key_fingerprint(cfg)} "
            f"(log {node.log_file}); Ctrl-C stops it"
        )
        code = run_in_foreground(node.process)
        if code in (0, 130, 143):
            return code
        refused = activation_refused(node)
        if refused and time.monotonic() + ACTIVATION_RETRY_S < retry_until:
            print(
                f"ctfed site: {cfg.site_id}: the SuperLink refused to activate this site's key; it still counts a "
                f"connection of this site as online for up to {2 * cfg.heartbeat_interval_s:g} s after a crash "
                f"(two heartbeat intervals): trying again in {ACTIVATION_RETRY_S:g} s",
                file=sys.stderr,
            )
            try:
                time.sleep(ACTIVATION_RETRY_S)
            except KeyboardInterrupt:
                return 130
            continue
        diagnosis = exit_diagnosis(cfg, node)
        if diagnosis:
            print(f"ctfed site: {cfg.site_id}: {diagnosis}", file=sys.stderr)
        print(f"ctfed site: the SuperNode exited with code {code}; see {node.log_file}", file=sys.stderr)
        return code

