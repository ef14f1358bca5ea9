"""Certificates and keys for a deployed federation (``ctfed certs``).

One folder holds everything the coordinator issues:

```
OUT/
  ca.crt                     CA certificate: every site and the coordinator trust it
  ca.key            (0600)   CA private key: stays with the coordinator (ideally offline)
  server.crt                 SuperLink TLS certificate, SAN 127.0.0.1, localhost, --host names
  server.key        (0600)   SuperLink TLS key: stays on the SuperLink machine
  sites/<site>/ca.crt        copy of ca.crt, so a site's folder is self-contained
  sites/<site>/<site>.key (0600)  SuperNode auth key (OpenSSH private): goes to that site only
  sites/<site>/<site>.pub    its OpenSSH public key: the coordinator registers it
```

Formats follow what Flower 1.41 loads: the SuperLink hands ``--ssl-*`` PEM files to
uvicorn (and to ``flower-superexec``, which verifies the server against ``ca.crt`` at
127.0.0.1, hence that SAN); ``flower-supernode --auth-supernode-private-key`` reads the
key with ``load_ssh_private_key`` and requires an EC key; ``flwr supernode register``
reads the public key with ``load_ssh_public_key`` and requires a NIST curve. We use
P-384, the curve Flower's documentation names.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ctfed.common.config import SITE_ID_RULE, ConfigError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
SITES_DIR = "sites"
DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime common TLS clients accept for a server certificate
CURVE = ec.SECP384R1


@dataclass(frozen=True)
class SiteKeyPaths:
    """The files one site's SuperNode needs (and the public key the coordinator registers)."""

    site_id: str
    folder: Path
    private_key: Path
    public_key: Path
    ca_cert: Path


@dataclass(frozen=True)
class CertPaths:
    """Where ``ctfed certs`` puts each file under its output folder."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.root / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_KEY

    def site(self, site_id: str) -> SiteKeyPaths:
        folder = self.root / SITES_DIR / site_id
        return SiteKeyPaths(
            site_id=site_id,
            folder=folder,
            private_key=folder / f"{site_id}.key",
            public_key=folder / f"{site_id}.pub",
            ca_cert=folder / CA_CERT,
        )

    def site_public_keys(self) -> list[Path]:
        """Every site public key issued so far, in a stable order."""
        return sorted((self.root / SITES_DIR).glob("*/*.pub"))

    def require_server_files(self) -> None:
        """Fail with a clear message if the SuperLink's TLS files are missing."""
        missing = [p for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()]
        if missing:
            raise ConfigError(
                f"missing TLS file(s) {', '.join(str(p) for p in missing)}; "
                f"create them with 'ctfed certs --out {self.root} --sites ...'"
            )


@dataclass
class CertReport:
    """What one ``generate`` call did, for the operator's summary."""

    paths: CertPaths
    written: list[Path] = field(default_factory=list)
    reused: list[Path] = field(default_factory=list)
    sites: list[SiteKeyPaths] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)


def validate_site_id(site_id: str) -> str:
    """Site ids become file and folder names and appear in results: keep them plain."""
    if not SITE_ID_RULE.match(site_id):
        raise ConfigError(
            f"site id '{site_id}' is not usable: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, at most 63 characters)"
        )
    return site_id


def _san_entries(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.*-]*[A-Za-z0-9])?$", host):
                raise ConfigError(f"--host '{host}' is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host))
    return names


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret so it is never readable by others, not even for an instant."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, 0o600)  # in case the umask or a filesystem widened it
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: Sequence[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    now = _now()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=SERVER_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def site_key_pair(site_id: str) -> tuple[bytes, bytes]:
    """A SuperNode auth key pair: (OpenSSH private key, OpenSSH public key line)."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" ctfed-site-{site_id}\n".encode()


def make_supernode_key(private_key: Path, site_id: str, force: bool = False) -> Path:
    """A site's SuperNode auth key made AT the site (issue #12 point 12): the private key at
    ``private_key`` (0600), its OpenSSH public key beside it (``.pub``), which is all the
    coordinator receives (``ctfed server --register KEY.pub``). Returns the public key's path."""
    public_key = private_key.with_suffix(".pub")
    existing = [p for p in (private_key, public_key) if p.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} exists; the SuperLink knows its public key (pass --force to replace it)")
    private, public = site_key_pair(validate_site_id(site_id))
    _write_private(private_key, private)
    _write_public(public_key, public)
    return public_key


def _load_ca(paths: CertPaths, passphrase: bytes | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=passphrase)
    except TypeError:  # encrypted without a passphrase given, or a passphrase for a plain key
        state = "is passphrase-protected: give its passphrase" if passphrase is None else "is not encrypted: give no passphrase"
        raise ConfigError(f"{paths.ca_key} {state} (ctfed certs --ca-passphrase-env VAR)") from None
    except ValueError:
        raise ConfigError(f"{paths.ca_key}: wrong passphrase, or not a PEM private key") from None
    cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ConfigError(f"{paths.ca_key} does not belong to {paths.ca_cert}")
    return key, cert


def generate(
    out: Path,
    sites: Sequence[str],
    hosts: Sequence[str] = (),
    force: bool = False,
    ca_name: str = "ctfed federation CA",
    ca_passphrase: bytes | None = None,
) -> CertReport:
    """Issue (or extend) a federation's CA, SuperLink certificate and site auth keys.

    Nothing that exists is overwritten without ``force``: an existing CA is reused to add
    sites later, an existing server certificate is kept, and a site whose key exists is an
    error (its SuperNode still holds the old key). With ``force`` everything named is
    re-issued, which means every site must receive the new ``ca.crt`` and its new key.
    With ``ca_passphrase`` a new CA key is written encrypted with it (an existing one is
    opened with it), so a copied ``ca.key`` alone cannot issue certificates.
    """
    site_ids = [validate_site_id(s) for s in sites]
    duplicates = sorted({s for s in site_ids if site_ids.count(s) > 1})
    if duplicates:
        raise ConfigError(f"site ids given twice: {', '.join(duplicates)}")
    all_hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    _san_entries(all_hosts)  # reject bad host names before writing anything

    paths = CertPaths(out)
    report = CertReport(paths=paths, hosts=all_hosts)
    ca_present = [p for p in (paths.ca_cert, paths.ca_key) if p.exists()]
    if len(ca_present) == 1 and not force:
        raise ConfigError(f"{ca_present[0]} exists without its pair; remove it or pass --force")
    new_ca = force or not ca_present
    server_exists = paths.server_cert.exists() or paths.server_key.exists()
    if new_ca and server_exists and not force:
        raise ConfigError(
            f"{paths.server_cert} exists but its CA is gone; pass --force to re-issue it with a new CA"
        )
    existing_sites = [
        f for s in site_ids for f in (paths.site(s).private_key, paths.site(s).public_key) if f.exists()
    ]
    if existing_sites and not force:
        raise ConfigError(
            "refusing to overwrite existing site key(s): "
            + ", ".join(str(p) for p in existing_sites)
            + "; pass --force to re-issue them (those sites then need their new key)"
        )

    out.mkdir(parents=True, exist_ok=True)
    if new_ca:
        ca_key, ca_cert = _make_ca(ca_name)
        _write_private(paths.ca_key, _pem_key(ca_key, ca_passphrase))
        _write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        report.written += [paths.ca_cert, paths.ca_key]
    else:
        ca_key, ca_cert = _load_ca(paths, ca_passphrase)
        report.reused += [paths.ca_cert, paths.ca_key]

    if new_ca or force or not server_exists:
        server_key, server_cert = _make_server_cert(ca_key, ca_cert, all_hosts)
        _write_private(paths.server_key, _pem_key(server_key))
        _write_public(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
        report.written += [paths.server_cert, paths.server_key]
    else:
        report.reused += [paths.server_cert, paths.server_key]

    for site_id in site_ids:
        site = paths.site(site_id)
        private, public = site_key_pair(site_id)
        _write_private(site.private_key, private)
        _write_public(site.public_key, public)
        shutil.copyfile(paths.ca_cert, site.ca_cert)
        os.chmod(site.ca_cert, 0o644)
        report.written += [site.private_key, site.public_key, site.ca_cert]
        report.sites.append(site)
    return report


def server_cert_hosts(cert_file: Path) -> list[str]:
    """The names and addresses a server certificate is valid for (for messages and tests)."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)


def key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """OpenSSH's fingerprint of a site key, ``SHA256:<base64>``: what ``ssh-keygen -lf
    <site>.pub`` prints, so coordinator and site IT can compare it with standard tools."""
    import base64
    import hashlib

    blob = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def public_key_file_fingerprint(path: Path) -> str:
    """The fingerprint of an OpenSSH public key file (``<site>.pub``)."""
    key = serialization.load_ssh_public_key(path.read_bytes())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{path} is not an EC public key")
    return key_fingerprint(key)


# --- secure-aggregation signing keys and the roster (issue #12) -----------------------------
#
# Each site holds a long-term Ed25519 signing key and a *roster*: site id -> signing public
# key of every site in the federation, pinned at the hospital. A site signs its SecAgg key
# advertisement and the survivor set it is given, and verifies its neighbours against the
# roster, so a coordinator cannot substitute or invent neighbours. The key is made at the
# site (``ctfed site --make-signing-key``): whoever makes a site's signing key can
# impersonate it, so the coordinator must not. The roster is assembled from the sites'
# public lines and checked by each hospital out of band (fingerprints, not the coordinator's
# word). Files: the private key as PKCS#8 PEM (0600); the roster as YAML
# ``site-id: "ssh-ed25519 AAAA..."`` (OpenSSH public key lines, as Flower's trusted entities).

ROSTER_FILE = "roster.yaml"
SIGNING_KEY_FILE = "signing.key"


def signing_public_line(key: ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey) -> str:
    """The OpenSSH public key line (``ssh-ed25519 AAAA...``) of a signing key."""
    public = key.public_key() if isinstance(key, ed25519.Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def make_signing_key(path: Path, force: bool = False) -> str:
    """Write a fresh Ed25519 signing key to ``path`` (0600); returns its public key line."""
    if path.exists() and not force:
        raise ConfigError(f"signing key {path} exists; its public key is in the roster (pass --force to replace it)")
    key = ed25519.Ed25519PrivateKey.generate()
    _write_private(path, _pem_key(key))
    return signing_public_line(key)


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """A site's signing key; ConfigError naming the problem (missing, readable by others, wrong type)."""
    if not path.is_file():
        raise ConfigError(f"signing key {path} not found; make one with 'ctfed site --config site.yaml --make-signing-key'")
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"signing key {path} is readable by others; run 'chmod 600 {path}'")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"signing key {path} is not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is not an Ed25519 key")
    return key


def write_roster(path: Path, entries: Mapping[str, str]) -> None:
    """Write a roster (site id -> public key line), sorted by site id."""
    for site_id, line in entries.items():
        validate_site_id(site_id)
        _parse_roster_key(line, site_id, path)
    header = "# ctfed federation roster: site id -> Ed25519 signing public key (check each one out of band)\n"
    body = "".join(f'{site_id}: "{entries[site_id].strip()}"\n' for site_id in sorted(entries))
    _write_public(path, (header + body).encode())


def _parse_roster_key(line: str, site_id: str, path: Path) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_ssh_public_key(str(line).strip().encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"roster {path}: the key of site '{site_id}' is not an OpenSSH public key line ({err})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"roster {path}: the key of site '{site_id}' is not an ssh-ed25519 key")
    return key


def load_roster(path: Path) -> dict[str, ed25519.Ed25519PublicKey]:
    """Site id -> signing public key; ConfigError for a missing file, a bad entry or a key
    listed for two sites (one site could then sign as another)."""
    import yaml  # PyYAML (an OmegaConf dependency)

    if not path.is_file():
        raise ConfigError(f"roster {path} not found")
    try:
        table = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"roster {path} is not valid YAML: {err}") from None
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"roster {path} must map site ids to 'ssh-ed25519 ...' public keys")
    roster: dict[str, ed25519.Ed25519PublicKey] = {}
    seen: dict[bytes, str] = {}
    for site_id, line in table.items():
        validate_site_id(str(site_id))
        key = _parse_roster_key(str(line), str(site_id), path)
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if raw in seen:
            raise ConfigError(f"roster {path}: sites '{seen[raw]}' and '{site_id}' have the same key")
        seen[raw] = str(site_id)
        roster[str(site_id)] = key
    return roster


def check_site_signing(site_id: str, signing_key: str, roster: str) -> None:
    """A site's signing key and roster belong together: both given, and the roster lists the
    site under its own public key (so its neighbours can verify it)."""
    if not signing_key or not roster:
        raise ConfigError("site.signing_key and site.roster go together: set both (or neither, and take no part in secure aggregation)")
    key = load_signing_key(Path(signing_key))
    table = load_roster(Path(roster))
    if site_id not in table:
        raise ConfigError(f"roster {roster} does not list this site ('{site_id}')")
    if signing_public_line(table[site_id]) != signing_public_line(key):
        raise ConfigError(f"roster {roster} lists another key for '{site_id}' than site.signing_key {signing_key}")


def ensure_federation_signing_keys(folder: Path, site_ids: Sequence[str]) -> tuple[Path, dict[str, Path]]:
    """Signing keys for sites simulated on one machine, and their roster: ``folder/<site>.key``
    (kept if present, so a resumed run keeps its keys) and ``folder/roster.yaml``."""
    folder.mkdir(parents=True, exist_ok=True)
    keys: dict[str, Path] = {}
    entries: dict[str, str] = {}
    for site_id in site_ids:
        path = folder / f"{validate_site_id(site_id)}.key"
        entries[site_id] = signing_public_line(load_signing_key(path)) if path.exists() else make_signing_key(path)
        keys[site_id] = path
    roster = folder / ROSTER_FILE
    write_roster(roster, entries)
    return roster, keys
