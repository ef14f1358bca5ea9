"""Flower's SuperLink, run with one ctfed log filter: site public keys appear as fingerprints.

Flower logs a refused or duplicate SuperNode key as its whole PEM ("Attempted to register
SuperNode with public key: b'-----BEGIN PUBLIC KEY-----...'"), with no site name: noise
that IT cannot match to anything. ``ctfed server`` starts the SuperLink through this module
instead of the ``flower-superlink`` script, in the same process (so signals, the
parent-death signal and the process group are unchanged); every Flower log record (console
and ``--log-file`` alike) then names such a key by its OpenSSH fingerprint
(``ssh-keygen -lf site.pub`` prints the same) and, when a ``--site-keys`` folder holds it,
by its site id:

    python -m ctfed.server.superlink_main [--site-keys CERTS/sites] -- <flower-superlink args>
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ctfed.common.certs import key_fingerprint, public_key_file_fingerprint

# A PEM public key as Flower logs it: raw, or as the repr of bytes (literal "\n", quotes).
PEM_PUBLIC_KEY = re.compile(r"b?'?-----BEGIN PUBLIC KEY-----(?:\\n|\s|[A-Za-z0-9+/=])+?-----END PUBLIC KEY-----(?:\\n|\n)*'?")


def site_fingerprints(site_keys: Path | None) -> dict[str, str]:
    """Fingerprint -> site id for every ``<site>/<site>.pub`` under ``site_keys``."""
    known: dict[str, str] = {}
    if site_keys is None:
        return known
    for path in sorted(site_keys.glob("*/*.pub")):
        try:
            known[public_key_file_fingerprint(path)] = path.stem
        except (ValueError, OSError):
            continue  # not a site key; the SuperLink's log is no place to fail over it
    return known


def describe_key(pem: str, known: Mapping[str, str]) -> str:
    """``public key SHA256:... (site hospital-a)`` for a PEM as it appears in a log line."""
    text = pem.strip().removeprefix("b").strip("'").replace("\\n", "\n")
    try:
        key = load_pem_public_key(text.encode())
    except ValueError:
        return "a public key (unreadable)"
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return "a public key (not EC)"
    fingerprint = key_fingerprint(key)
    site = known.get(fingerprint)
    return f"public key {fingerprint} ({f'site {site}' if site else 'no site of the certs folder'})"


class PublicKeyRedactor(logging.Filter):
    """Replaces every PEM public key in a record's message by ``describe_key``'s text."""

    def __init__(self, known: Mapping[str, str]) -> None:
        super().__init__()
        self.known = dict(known)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "BEGIN PUBLIC KEY" in message:
            record.msg = PEM_PUBLIC_KEY.sub(lambda match: describe_key(match.group(0), self.known), message)
            record.args = ()
        return True


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ctfed-superlink", description=__doc__.splitlines()[0])
    parser.add_argument("--site-keys", type=Path, help="folder of <site>/<site>.pub (CERTS/sites) to name keys by site")
    parser.add_argument("flower_args", nargs=argparse.REMAINDER, help="-- then flower-superlink's arguments")
    args = parser.parse_args(argv)
    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args

    from flwr.superlink.cli import flower_superlink

    logging.getLogger("flwr").addFilter(PublicKeyRedactor(site_fingerprints(args.site_keys)))
    sys.argv = ["flower-superlink", *flower_args]
    flower_superlink()


if __name__ == "__main__":
    main()
