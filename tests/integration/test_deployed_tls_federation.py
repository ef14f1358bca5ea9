"""End to end, deployed: TLS SuperLink with node auth, three authenticated SuperNodes, one refused.

Real processes on 127.0.0.1 only, on free ports, each with a private Flower home. The
SuperLink comes from ``ctfed server``'s code path and the SuperNodes from ``ctfed site``'s
(a YAML file read and checked by ``read_site_config``), so the test covers what an
operator runs. Every process is stopped in ``finally`` blocks, and the test fails if any
process that mentions its temporary folder is still alive afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ctfed.client.site_cli import RunningSuperNode, start_supernode
from ctfed.common.certs import generate, public_key_file_fingerprint
from ctfed.common.config import ConfigError, read_site_config
from ctfed.common.processes import stop_process_group
from ctfed.server.deploy_cli import (
    SuperLinkSettings,
    SITES_FILE,
    list_nodes,
    register_sites,
    site_table,
    running_superlink,
)

from deployed import SITES, leftover_processes, signing_keys, tiny_site_caches, wait_online, write_site_yaml  # tests/deployed.py
from helpers import assert_no_identifier_in, dicom_identifiers, submit_run  # tests/helpers.py

pytestmark = pytest.mark.slow

APP_DIR = Path(__file__).resolve().parents[2]
INTRUDER = "intruder"
RUN_TIMEOUT_S = 480.0  # 2 SecAgg+ rounds took 242 s at load 13 on the shared 2-core machine


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three tiny prepared site caches (2 synthetic scans each)."""
    return tiny_site_caches(tmp_path_factory.mktemp("sites"))


def test_site_config_is_checked_before_starting(tmp_path: Path, caches: list[Path]) -> None:
    certs = generate(tmp_path / "certs", ["hospital-a"]).paths
    site = certs.site("hospital-a")
    good = write_site_yaml(tmp_path / "a", "hospital-a", caches[0], "127.0.0.1:9", site.ca_cert, site.private_key)
    read_site_config(good).check_files()

    no_cache = write_site_yaml(tmp_path / "b", "hospital-a", tmp_path / "nope", "127.0.0.1:9", site.ca_cert, site.private_key)
    with pytest.raises(ConfigError, match="not a folder"):
        read_site_config(no_cache).check_files()
    with pytest.raises(ConfigError, match="manifest.json"):
        read_site_config(good, [f"data_path={tmp_path}"]).check_files()
    with pytest.raises(ConfigError, match="private key .* not found"):
        read_site_config(good, [f"private_key={tmp_path / 'missing.key'}"]).check_files()
    with pytest.raises(ConfigError, match="OpenSSH private key"):
        read_site_config(good, [f"private_key={certs.server_key}"]).check_files()
    with pytest.raises(ConfigError, match="host:port"):
        read_site_config(good, ["superlink=https://fl.example.org"])
    with pytest.raises(ConfigError, match="site_idz"):
        read_site_config(good, ["site_idz=x"])
    with pytest.raises(ConfigError, match="missing mandatory value: private_key"):
        (tmp_path / "partial.yaml").write_text("site_id: a\ndata_path: x\nsuperlink: 'h:1'\nca_cert: c\n")
        read_site_config(tmp_path / "partial.yaml")
    # Relative paths follow the YAML file, not the working directory.
    assert read_site_config(good).state_path == tmp_path / "a" / "state"
    # Secure aggregation's signing key and roster are checked together.
    roster = signing_keys(tmp_path, ("hospital-a",))
    folder = tmp_path / "hospital-a"
    signed = write_site_yaml(folder, "hospital-a", caches[0], "127.0.0.1:9", site.ca_cert, site.private_key, roster)
    read_site_config(signed).check_files()
    with pytest.raises(ConfigError, match="does not list this site"):
        read_site_config(signed, ["site_id=hospital-b"]).check_files()
    with pytest.raises(ConfigError, match="go together"):
        read_site_config(signed, ["roster=''"]).check_files()
    (folder / "keys" / "signing.key").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        read_site_config(signed).check_files()


def test_deployed_federation_with_tls_and_node_auth(tmp_path: Path, caches: list[Path]) -> None:
    marker = str(tmp_path)
    certs = generate(tmp_path / "certs", [*SITES, INTRUDER]).paths
    settings = SuperLinkSettings(state_dir=tmp_path / "coordinator", certs_dir=certs.root, host="127.0.0.1", port=0)
    run_dir = tmp_path / "run"
    nodes: list[RunningSuperNode] = []
    others: list[subprocess.Popen] = []
    try:
        with running_superlink(settings) as link:
            # Only the three hospitals are registered; the intruder has a key from the same
            # CA and the right ca.crt, but the SuperLink has never seen its public key.
            registrations = register_sites([certs.site(s).public_key for s in SITES], link.flwr_home)
            assert [(r.site_id, r.status) for r in registrations] == [(s, "registered") for s in SITES]
            # A restart's --register-sites: keys the SuperLink still knows are not sent again,
            # so its log gets no "Public key already in use" errors, and the node id is known.
            again = register_sites([certs.site(SITES[0]).public_key], link.flwr_home)
            assert (again[0].status, again[0].node_id) == ("already registered", registrations[0].node_id)
            assert "already in use" not in (link.log_file.read_text() + (link.log_file.parent / "superlink.console.log").read_text()).lower()
            assert {site for site, _, _ in site_table(link.flwr_home)} == set(SITES)  # named, unlike flwr's list
            (link.flwr_home.parent / SITES_FILE).unlink()  # a lost registry: Flower's answer still counts
            assert register_sites([certs.site(SITES[1]).public_key], link.flwr_home)[0].status == "already registered"

            roster = signing_keys(tmp_path, SITES)
            for site_id, cache in zip(SITES, caches):
                site = certs.site(site_id)
                yaml = write_site_yaml(
                    tmp_path / site_id, site_id, cache, link.local_address, site.ca_cert, site.private_key, roster
                )
                nodes.append(start_supernode(read_site_config(yaml)))
            intruder_keys = certs.site(INTRUDER)
            intruder_yaml = write_site_yaml(
                tmp_path / INTRUDER, INTRUDER, caches[0], link.local_address, intruder_keys.ca_cert, intruder_keys.private_key
            )
            # As the hospital would start it, so the test sees what its IT sees.
            intruder_out = tmp_path / "intruder.out"
            with intruder_out.open("wb") as out:
                intruder = subprocess.Popen(
                    # Flower's shortest heartbeat: a refused key is retried for 2 x 10 + 5 s, not 65 s.
                    [sys.executable, "-m", "ctfed.common.cli", "site", "--config", str(intruder_yaml), "heartbeat_interval_s=10"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                )
            others.append(intruder)

            online = wait_online(link.flwr_home, len(SITES), nodes)
            assert len(online) == len(SITES)

            run_config = f'num-server-rounds=2 local-steps=2 run-dir="{run_dir}"'
            output = submit_run(APP_DIR, link.connection, link.flwr_home, run_config, RUN_TIMEOUT_S)

            results_file = run_dir / "results.json"
            assert results_file.is_file(), output[-5000:]
            results = json.loads(results_file.read_text())
            assert results["status"] == "completed", output[-5000:]
            assert [r["round"] for r in results["rounds"]] == [1, 2]
            assert results["secure_aggregation"] is True  # SecAgg+ is the default
            for record in results["rounds"]:
                assert record["aggregated"] is True and record["secure_aggregation"] is True
                assert sorted(s["site"] for s in record["sites"]) == sorted(SITES)
                assert all(s["status"] == "aggregated" for s in record["sites"])
                assert INTRUDER not in {s["site"] for s in record["sites"]}
            # The run folder reads like a simulation's (server/run_folder.py): the report of the
            # rounds aggregated, the config results.json records, the coordinator's log per round.
            report = (run_dir / "report.md").read_text()
            assert "| Status | completed |" in report and "| Rounds recorded | 2 of 2 |" in report
            for number in (1, 2):
                assert f"### Round {number}\n\naggregated;" in report
            assert OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")) == results["config"]
            log = (run_dir / "federation.log").read_text()
            assert [n for n in (1, 2) if f"[round {n}/2] done in" in log] == [1, 2], log[-3000:]
            assert_no_identifier_in(run_dir, dicom_identifiers(caches[0].parents[1] / "dicom"))
            # Flower 1.41 refuses the activation of an unknown key and the SuperNode exits; the
            # site tries again while the refusal could be its own previous connection, then stops
            # (meanwhile the run above went on without it).
            intruder_code = intruder.wait(timeout=120)
            assert intruder_code != 0
            fingerprint = public_key_file_fingerprint(intruder_keys.public_key)
            said = intruder_out.read_text()
            # Each refusal inside the window is retried, the last one is not. Under load a
            # SuperNode's start can take the whole window, so one attempt is a valid outcome
            # (the retry itself: tests/unit/test_supernode_heartbeat.py).
            attempts = said.count("SuperNode connecting to")
            assert attempts >= 1 and said.count("trying again in 5 s") == attempts - 1, said[-3000:]
            assert f"{INTRUDER}: this site's key is not registered with the coordinator (key fingerprint {fingerprint})" in said
            link_log = link.log_file.read_text() + (link.log_file.parent / "superlink.console.log").read_text()
            assert "No SuperNode found with the given public key" in link_log
            # The coordinator names the key by fingerprint (and site, from the certs folder), never as PEM.
            assert "BEGIN PUBLIC KEY" not in link_log
            assert f"public key {fingerprint} (site {INTRUDER})" in link_log
            assert len(list_nodes(link.flwr_home)) == len(SITES)  # never registered, never listed

            # Every site verified its neighbours' signed advertisements and signed the survivor set.
            for site_id in SITES:
                kinds = [json.loads(line)["kind"] for line in (tmp_path / site_id / "state" / "audit.jsonl").read_text().splitlines()]
                assert kinds.count("secagg-secagg_consistency") == 2 and "secagg-abort" not in kinds, kinds
    finally:
        for node in nodes:
            stop_process_group(node.process)
        for process in others:
            stop_process_group(process)
    # running_superlink stopped the SuperLink; nothing started for this test may survive.
    deadline = time.monotonic() + 10
    while leftover_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not leftover_processes(marker)
