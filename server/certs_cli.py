"""``ctfed certs``: the coordinator issues the federation's CA, TLS certificate and site keys.

The coordinator runs this once (and again with new site ids to add hospitals); it then
ships each ``sites/<site>/`` folder to that hospital and keeps the rest. See
``common/certs.py`` for the file layout and why each format is what Flower expects.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ctfed.common.certs import DEFAULT_HOSTS, generate
from ctfed.common.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for the CA, server certificate and site keys")
    parser.add_argument("--sites", nargs="+", default=[], metavar="SITE_ID", help="site ids to issue SuperNode auth keys for")
    parser.add_argument(
        "--host", nargs="+", default=[], metavar="NAME",
        help=f"names/IPs the sites use to reach the SuperLink (added to {', '.join(DEFAULT_HOSTS)})",
    )
    parser.add_argument("--force", action="store_true", help="re-issue files that already exist (sites then need new ones)")
    parser.add_argument(
        "--ca-passphrase-env", metavar="VAR",
        help="encrypt a new CA key with the passphrase in environment variable VAR (and open an existing one with it); "
        "an environment variable keeps it out of the command line and shell history",
    )


def run(args: argparse.Namespace) -> int:
    passphrase = None
    if args.ca_passphrase_env:
        value = os.environ.get(args.ca_passphrase_env, "")
        if not value:
            raise ConfigError(f"--ca-passphrase-env {args.ca_passphrase_env}: that environment variable is not set or empty")
        passphrase = value.encode()
    report = generate(args.out, args.sites, hosts=args.host, force=args.force, ca_passphrase=passphrase)
    paths = report.paths
    for path in report.written:
        print(f"wrote   {path}")
    for path in report.reused:
        print(f"kept    {path}")
    print(f"\nSuperLink certificate valid for: {', '.join(report.hosts)}")
    print("\nWhich file goes where:")
    print(f"  coordinator (SuperLink machine): {paths.ca_cert}, {paths.server_cert}, {paths.server_key}")
    print(f"  coordinator, keep offline:       {paths.ca_key}  (needed only to issue more certificates)")
    print(f"  register with the SuperLink:     {paths.root}/sites/*/*.pub  ('ctfed server --register-sites')")
    for site in report.sites:
        print(f"  to {site.site_id} only: {site.folder}/  ({site.ca_cert.name} and {site.private_key.name}; never share the .key)")
    if report.sites:
        # Issue #12 point 12: a key made here is a key the coordinator has held.
        print(
            "\nThese site private keys were made here, so this machine has held them: send each folder over a "
            "channel you trust and delete it here. A hospital can instead make its own key "
            "('ctfed site --config site.yaml --make-keys') and send only the .pub "
            "('ctfed server --register hospital-a.pub'; docs/deploy.md)."
        )
    return 0
