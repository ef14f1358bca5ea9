"""Pseudonyms for everything a site writes to disk.

Outputs (manifest, report, cache file names, logs) name series and studies only by a keyed
hash of their UIDs. The key is a per-site secret that never leaves the site, so nobody
holding the outputs can confirm a guessed UID by hashing it, while re-running ``prepare``
at the same site yields the same keys (which is what makes the cache incremental).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

logger = logging.getLogger(__name__)

SECRET_FILE = ".site_secret"
SECRET_BYTES = 32


def site_secret(cache_dir: Path) -> bytes:
    """Return this site's secret, creating ``<cache_dir>/.site_secret`` (mode 0600) once.

    Losing the file only changes the pseudonyms (the cache is rebuilt); it never exposes data.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / SECRET_FILE
    if path.exists():
        secret = path.read_bytes()
        if len(secret) != SECRET_BYTES:
            raise ValueError(
                f"{path} is not a {SECRET_BYTES}-byte site secret; delete it to create a new one "
                "(the cache will be rebuilt under new pseudonyms)"
            )
        return secret
    secret = secrets.token_bytes(SECRET_BYTES)
    if not _create_secret(path, secret):
        return site_secret(cache_dir)  # another process created it first
    logger.info("created a new site secret in %s", cache_dir)
    return secret


def _create_secret(path: Path, secret: bytes) -> bool:
    """Write ``secret`` to a new ``path`` (mode 0600); False if the file already exists."""
    # O_EXCL: two processes racing to create the secret cannot both win and disagree.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
    return True


def install_site_secret(cache_dir: Path, secret: bytes) -> None:
    """Give a new cache folder a chosen secret instead of a random one (``ctfed simulate``'s
    synthetic hospitals: their pseudonyms, hence their manifest order, follow the synth seed).

    Never for a real site: anyone holding the secret can confirm a guessed UID. An existing
    different secret is refused, since the cache's keys were made with it.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a site secret is {SECRET_BYTES} bytes, got {len(secret)}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not _create_secret(cache_dir / SECRET_FILE, secret) and site_secret(cache_dir) != secret:
        raise ValueError(f"{cache_dir / SECRET_FILE} already holds another site secret")


def pseudonym(secret: bytes, *parts: str, length: int = 16) -> str:
    """HMAC-SHA256 of ``parts`` under ``secret``, as ``length`` hex characters.

    The first part names the kind of thing ("series", "study", "file") so a series and a
    study that happened to share an identifier still get different keys.
    """
    if not 1 <= length <= 64:
        raise ValueError(f"pseudonym length must be in 1..64, got {length}")
    message = "\x1f".join(parts).encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:length]
