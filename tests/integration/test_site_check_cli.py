"""``ctfed site --check`` checks what a site's IT can get wrong, against a real TLS SuperLink
on 127.0.0.1: another CA's certificate, a wrong port, another site's key; and a SuperNode
that cannot reach its SuperLink gives up after ``max_wait_s`` (bounded by default) saying why."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ctfed.client.site_cli import exit_diagnosis, start_supernode
from ctfed.common.certs import generate
from ctfed.common.cli import main
from ctfed.common.config import ConfigError, SiteConfig, read_site_config
from ctfed.common.processes import free_port, stop_process_group
from ctfed.server.deploy_cli import SuperLinkSettings, running_superlink

pytestmark = pytest.mark.slow

GIVE_UP_S = 3.0


def _site_yaml(folder: Path, site_id: str, superlink: str, ca: Path, key: Path) -> Path:
    cache = folder / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "manifest.json").write_text("{}")  # --check reads no volume
    path = folder / "site.yaml"
    path.write_text(
        f"site_id: {site_id}\ndata_path: {cache}\nsuperlink: '{superlink}'\nca_cert: {ca}\nprivate_key: {key}\nstate_dir: state\n"
    )
    return path


def test_check_refuses_another_sites_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certs = generate(tmp_path / "certs", ["hospital-a", "hospital-b"]).paths
    a, b = certs.site("hospital-a"), certs.site("hospital-b")
    # hospital-a's IT copied hospital-b's key (it came from the same CA, so TLS alone passes).
    wrong = _site_yaml(tmp_path / "a", "hospital-a", "127.0.0.1:9", a.ca_cert, b.private_key)
    assert main(["site", "--config", str(wrong), "--check"]) == 2
    assert "is site hospital-b's key" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="is site hospital-b's key"):
        start_supernode(read_site_config(wrong))  # and nothing starts with it
    # The key renamed to this site's name, beside this site's own public key: still caught.
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(a.public_key, lone / "hospital-a.pub")
    shutil.copy(b.private_key, lone / "hospital-a.key")
    (lone / "hospital-a.key").chmod(0o600)
    renamed = _site_yaml(tmp_path / "renamed", "hospital-a", "127.0.0.1:9", a.ca_cert, lone / "hospital-a.key")
    with pytest.raises(ConfigError, match="does not belong to .*hospital-a.pub"):
        start_supernode(read_site_config(renamed))


def test_check_connects_to_the_superlink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certs = generate(tmp_path / "certs", ["hospital-a"]).paths
    other_ca = generate(tmp_path / "other-certs", ["hospital-a"]).paths  # another coordinator's CA
    site = certs.site("hospital-a")
    settings = SuperLinkSettings(state_dir=tmp_path / "coordinator", certs_dir=certs.root, host="127.0.0.1", port=0)
    with running_superlink(settings) as link:
        good = _site_yaml(tmp_path / "good", "hospital-a", link.local_address, site.ca_cert, site.private_key)
        assert main(["site", "--config", str(good), "--check"]) == 0
        out = capsys.readouterr().out
        assert f"SuperLink answering on {link.local_address} (TLS verified against {site.ca_cert})" in out
        assert "is site hospital-a's (hospital-a.pub)" in out
        # No app pinned: said, so the hospital knows it runs whatever the coordinator submits.
        assert "WARNING: app not pinned: this site runs any code the coordinator submits" in out
        pin = "ab" * 32
        assert main(["site", "--config", str(good), "--check", f"trusted_app_hashes=[{pin}]"]) == 0
        out = capsys.readouterr().out
        assert f"app pinned: runs only the app bundles with sha256 {pin}" in out and "not pinned" not in out
        assert f"--trusted-app-hash {pin}" in out  # the SuperNode command it prints

        wrong_ca = _site_yaml(tmp_path / "ca", "hospital-a", link.local_address, other_ca.ca_cert, site.private_key)
        assert main(["site", "--config", str(wrong_ca), "--check"]) == 1
        assert "does not verify against" in capsys.readouterr().err

        nobody = f"127.0.0.1:{free_port()}"
        wrong_port = _site_yaml(tmp_path / "port", "hospital-a", nobody, site.ca_cert, site.private_key)
        assert main(["site", "--config", str(wrong_port), "--check"]) == 1
        assert f"nothing listens on {nobody} (connection refused)" in capsys.readouterr().err


def test_a_supernode_on_a_wrong_port_gives_up_with_the_reason(tmp_path: Path) -> None:
    assert SiteConfig.max_wait_s > 0  # bounded unless a site asks for "forever" (0)
    certs = generate(tmp_path / "certs", ["hospital-a"]).paths
    site = certs.site("hospital-a")
    yaml = _site_yaml(tmp_path / "a", "hospital-a", f"127.0.0.1:{free_port()}", site.ca_cert, site.private_key)
    cfg = read_site_config(yaml, [f"max_wait_s={GIVE_UP_S}"])
    node = start_supernode(cfg)
    try:
        code = node.process.wait(timeout=60 + GIVE_UP_S)
    finally:
        stop_process_group(node.process)
    assert code != 0
    diagnosis = exit_diagnosis(cfg, node)
    assert diagnosis and f"could not reach the SuperLink at {cfg.superlink} for site.max_wait_s=3 s" in diagnosis
