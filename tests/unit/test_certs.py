"""``ctfed certs``: file formats Flower loads, permissions, and nothing overwritten by accident."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key

from ctfed.common.certs import generate, server_cert_hosts
from ctfed.common.cli import main
from ctfed.common.config import ConfigError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_issues_a_chain_flower_can_load(tmp_path: Path) -> None:
    report = generate(tmp_path / "pki", ["hospital-a", "hospital-b"], hosts=["fl.example.org", "10.0.0.5"])
    paths = report.paths
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    # The server certificate is signed by the CA (raises if not) and names every host.
    server.verify_directly_issued_by(ca)
    assert set(server_cert_hosts(paths.server_cert)) == {"127.0.0.1", "10.0.0.5", "localhost", "fl.example.org"}
    assert isinstance(load_pem_private_key(paths.server_key.read_bytes(), None), ec.EllipticCurvePrivateKey)

    for site_id in ("hospital-a", "hospital-b"):
        site = paths.site(site_id)
        private = load_ssh_private_key(site.private_key.read_bytes(), password=None)
        public = load_ssh_public_key(site.public_key.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert site.ca_cert.read_bytes() == paths.ca_cert.read_bytes()
        assert _mode(site.private_key) == 0o600
    assert _mode(paths.ca_key) == 0o600 and _mode(paths.server_key) == 0o600
    a, b = (load_ssh_public_key(paths.site(s).public_key.read_bytes()) for s in ("hospital-a", "hospital-b"))
    assert a.public_numbers() != b.public_numbers()


def test_adding_a_site_keeps_the_ca_and_existing_keys(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    generate(out, ["hospital-a"])
    ca_before = (out / "ca.crt").read_bytes()
    key_before = (out / "sites/hospital-a/hospital-a.key").read_bytes()
    report = generate(out, ["hospital-c"])
    assert (out / "ca.crt").read_bytes() == ca_before
    assert (out / "sites/hospital-a/hospital-a.key").read_bytes() == key_before
    assert out / "ca.key" in report.reused
    assert [s.site_id for s in report.sites] == ["hospital-c"]

    with pytest.raises(ConfigError, match="refusing to overwrite existing site key"):
        generate(out, ["hospital-a"])
    assert (out / "sites/hospital-a/hospital-a.key").read_bytes() == key_before
    generate(out, ["hospital-a"], force=True)
    assert (out / "ca.crt").read_bytes() != ca_before


@pytest.mark.parametrize(
    ("sites", "hosts", "message"),
    [
        (["../escape"], [], "not usable"),
        (["a", "a"], [], "given twice"),
        (["a"], ["bad host!"], "neither an IP address nor a DNS name"),
    ],
)
def test_bad_input_writes_nothing(tmp_path: Path, sites: list[str], hosts: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        generate(tmp_path / "pki", sites, hosts=hosts)
    assert not (tmp_path / "pki").exists()


def test_cli_prints_where_each_file_goes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "--out", str(tmp_path / "pki"), "--sites", "hospital-a"]) == 0
    out = capsys.readouterr().out
    assert "to hospital-a only" in out and "never share the .key" in out
    assert "this machine has held them" in out and "--make-keys" in out  # the site-made key is offered
    assert main(["certs", "--out", str(tmp_path / "pki"), "--sites", "hospital-a"]) != 0
    assert "refusing to overwrite" in capsys.readouterr().err


def test_ca_key_can_be_passphrase_protected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue #12 point 12: a copied ca.key alone cannot issue certificates."""
    pki = tmp_path / "pki"
    monkeypatch.setenv("CTFED_CA_PASSPHRASE", "correct horse")
    assert main(["certs", "--out", str(pki), "--ca-passphrase-env", "CTFED_CA_PASSPHRASE"]) == 0
    ca_key = (pki / "ca.key").read_bytes()
    assert b"ENCRYPTED" in ca_key
    with pytest.raises(TypeError):
        load_pem_private_key(ca_key, password=None)
    # Adding a site later needs the passphrase; without it or with a wrong one, a clear error.
    with pytest.raises(ConfigError, match="passphrase-protected"):
        generate(pki, ["hospital-b"])
    with pytest.raises(ConfigError, match="wrong passphrase"):
        generate(pki, ["hospital-b"], ca_passphrase=b"wrong")
    assert main(["certs", "--out", str(pki), "--sites", "hospital-b", "--ca-passphrase-env", "CTFED_CA_PASSPHRASE"]) == 0
    capsys.readouterr()
    assert main(["certs", "--out", str(pki), "--ca-passphrase-env", "UNSET_VARIABLE_X"]) != 0
    assert "not set" in capsys.readouterr().err
