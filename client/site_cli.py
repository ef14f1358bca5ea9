"""``ctfed site``: a hospital's SuperNode, from one validated YAML file.

Everything a site's IT decides lives in ``site.yaml`` (see ``conf/site.yaml``): its site id,
the prepared cache, the SuperLink address, the CA certificate, its auth key and its policy
(what the site takes part in, ``client/policy.py``). The file
is validated, and the cache and keys checked, before any process starts, so a typo is a
one-line error instead of a SuperNode that retries forever. The SuperNode then runs
offline in the foreground until Ctrl-C/SIGTERM; the ClientApp finds the cache and site id
in its node config (``client/site.py``).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ctfed.client.audit import AUDIT_FILE, AuditLogError, verify_audit_log
from ctfed.client.policy import POLICY_FILE, POLICY_FILE_KEY, write_policy_file
from ctfed.client.secagg import ROSTER_KEY, SIGNING_KEY_KEY
from ctfed.client.site import DATA_PATH_KEY, SITE_ID_KEY, STATE_DIR_KEY
from ctfed.common.certs import make_signing_key, make_supernode_key
from ctfed.common.config import ConfigError, SiteConfig, read_site_config
from ctfed.common.processes import (
    ProcessError,
    flower_tool,
    free_port,
    offline_env,
    run_in_foreground,
    start_logged,
)

LOG_FILE = "supernode.log"
FLWR_HOME = "flwr-home"


@dataclass(frozen=True)
class RunningSuperNode:
    """A started SuperNode process and where its output goes."""

    process: subprocess.Popen
    site_id: str
    log_file: Path
    runtime_port: int


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


def supernode_command(cfg: SiteConfig, runtime_port: int) -> list[str]:
    """The ``flower-supernode`` command line: TLS to the SuperLink, node auth, local Runtime API."""
    command = [
        flower_tool("flower-supernode"),
        "--superlink", cfg.superlink,
        "--root-certificates", cfg.ca_cert,
        "--auth-supernode-private-key", cfg.private_key,
        "--node-config", node_config(cfg),
        "--isolation", "subprocess",
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
    state = cfg.state_path
    state.mkdir(parents=True, exist_ok=True)
    # The ClientApp reads the policy from here (node config ``policy-file``) every round.
    write_policy_file(cfg.policy, state)
    port = cfg.runtime_port or free_port()
    log_file = state / LOG_FILE
    process = start_logged(supernode_command(cfg, port), offline_env(state / FLWR_HOME), log_file, echo=echo)
    return RunningSuperNode(process=process, site_id=cfg.site_id, log_file=log_file, runtime_port=port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="the site's YAML file (example: conf/site.yaml)")
    parser.add_argument("--check", action="store_true", help="validate the config and files, print the command, start nothing")
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
        print(f"ctfed site: {cfg.site_id}: configuration and files OK")
        return 0
    try:
        node = start_supernode(cfg, echo=True)
    except ProcessError as err:
        print(f"ctfed site: {err}", file=sys.stderr)
        return 1
    print(f"ctfed site: {cfg.site_id}: SuperNode connecting to {cfg.superlink} (log {node.log_file}); Ctrl-C stops it")
    code = run_in_foreground(node.process)
    if code not in (0, 130, 143):
        print(f"ctfed site: the SuperNode exited with code {code}; see {node.log_file}", file=sys.stderr)
    return code

