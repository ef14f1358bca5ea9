"""What the tests of deployed federations (real SuperLink / SuperNode processes on 127.0.0.1)
share: tiny site caches, a site.yaml as a hospital writes it, the sites' signing keys and
roster, waiting for SuperNodes to come online, and finding processes a test left behind."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from ctfed.client.site_cli import RunningSuperNode
from ctfed.common.certs import make_signing_key, write_roster
from ctfed.common.config import load_run_config
from ctfed.common.preprocess import prepare
from ctfed.server.deploy_cli import list_nodes
from ctfed.simulations.data.synth import synthesize_federation

SITES = ("hospital-a", "hospital-b", "hospital-c")
NODES_ONLINE_TIMEOUT_S = 60.0


def tiny_site_caches(root: Path, sites: int = 3, scans_per_site: int = 2) -> list[Path]:
    """Prepared caches of a few synthetic scans per site, under ``root``/cache."""
    cfg = load_run_config()
    out = []
    for site_dir in synthesize_federation(root / "dicom", sites=sites, scans_per_site=scans_per_site, seed=0):
        cache = root / "cache" / site_dir.name
        prepare(site_dir, cache, cfg.preprocess, progress=False)
        out.append(cache)
    return out


def write_site_yaml(
    folder: Path, site_id: str, cache: Path, superlink: str, ca: Path, key: Path, roster: Path | None = None
) -> Path:
    """A site.yaml like conf/site.yaml, with paths relative to it where they can be. With a
    roster, the site's signing key is ``keys/signing.key`` in its folder (see signing_keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.yaml"
    signing = f"signing_key: keys/signing.key\nroster: {roster}\n" if roster is not None else ""
    path.write_text(
        f"site_id: {site_id}\n"
        f"data_path: {cache}\n"
        f"superlink: '{superlink}'\n"
        f"ca_cert: {ca}\n"
        f"private_key: {key}\n"
        "state_dir: state\n"  # relative: resolved against the YAML's folder
        "runtime_port: 0\n" + signing
    )
    return path


def signing_keys(root: Path, sites: tuple[str, ...]) -> Path:
    """Each hospital makes its own signing key in its folder; the roster of their public
    lines is what every hospital pins (here one file for all)."""
    lines = {site: make_signing_key(root / site / "keys" / "signing.key") for site in sites}
    roster = root / "roster.yaml"
    write_roster(roster, lines)
    return roster


def leftover_processes(marker: str) -> list[str]:
    """Live processes whose command line mentions ``marker`` (our temporary folder)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if marker in text and state != "Z":
                found.append(f"{cmdline.parent.name}: {text[:160]}")
    return found


def wait_online(flwr_home: Path, count: int, nodes: list[RunningSuperNode]) -> list[dict]:
    """The SuperLink's online nodes once ``count`` are; fails the test if a SuperNode exits first."""
    deadline = time.monotonic() + NODES_ONLINE_TIMEOUT_S
    online: list[dict] = []
    while time.monotonic() < deadline:
        for node in nodes:
            if node.process.poll() is not None:
                pytest.fail(f"SuperNode {node.site_id} exited ({node.process.returncode}):\n{node.log_file.read_text()[-3000:]}")
        online = [n for n in list_nodes(flwr_home) if n["status"] == "online"]
        if len(online) >= count:
            return online
        time.sleep(1.0)
    pytest.fail(f"only {len(online)} of {count} SuperNodes came online in {NODES_ONLINE_TIMEOUT_S:.0f} s")
