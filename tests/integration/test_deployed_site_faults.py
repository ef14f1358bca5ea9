"""A deployed site killed in the middle of a secure-aggregation round and started again, then
the coordinator's SuperLink killed in the middle of a later round, started again, and the run
resumed.

Real processes on 127.0.0.1: a TLS SuperLink with node auth (``ctfed server``'s code path) and
three SuperNodes with a tolerant secure aggregation (SecAgg+ neighbourhoods of 3,
reconstruction threshold 2, the sites' policy allowing it). One site runs as its IT runs it,
``ctfed site --config site.yaml``; right after its SuperNode has sent its round-1 key shares,
every process of that site is SIGKILLed (as a power cut or the OOM killer would) and the
same command is started again at once.

What must hold: round 1 aggregates the two other sites, the killed one recorded as lost at a
named protocol stage (after its shares went out, so the others' masks with it are removed
from their shares); the SuperLink still counts the dead connection as online for two
heartbeats and would refuse the restarted key, so the restarted SuperNode waits that out
(from the last heartbeat its state folder recorded) before it connects; the site then takes part in round 2 with the local training state its state folder
carries (head, teacher, centres, optimiser of round 1); every round aggregates; and its audit
chain, written by both lives, still verifies. The heartbeat is Flower's shortest
(``site.heartbeat_interval_s=10``), so a lost site is answered for within about 20 s.

Then, in round 3, after a site has trained, the SuperLink and the run's ServerApp are SIGKILLed
together (a coordinator's power cut); the sites' SuperNodes stay up. ``ctfed server``'s code
path starts the SuperLink again on the same port and state folder, the sites reconnect on
their own, and the run is submitted again with ``resume=true``: rounds 1-2 are kept as they
were, round 3 runs again, every site continues the local training state of round 2 from its
state folder, and results.json records the resume with no config change.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from ctfed.client.audit import AUDIT_FILE, verify_audit_log
from ctfed.client.site_cli import RunningSuperNode, start_supernode
from ctfed.common.certs import generate
from ctfed.common.config import load_run_config, read_site_config, save_run_config
from ctfed.common.processes import descendant_pids, flower_tool, offline_env, stop_process_group
from ctfed.server.deploy_cli import RunningSuperLink, SuperLinkSettings, register_sites, start_superlink

from deployed import SITES, leftover_processes, signing_keys, tiny_site_caches, wait_online, write_site_yaml  # tests/deployed.py

pytestmark = pytest.mark.slow

APP_DIR = Path(__file__).resolve().parents[2]
VICTIM = SITES[1]
# What each site's policy and the run agree on: neighbourhoods of 3 with threshold 2 ride out one
# lost site (the default floor, above 2/3 of a neighbourhood, would need 4 sites for that).
TOLERANT_SITE = ["heartbeat_interval_s=10", "policy.min_secagg_threshold_fraction=0.5"]
TOLERANT_RUN = [
    "federation.rounds=3", "train.local_steps=2", "federation.min_sites=2",
    "secagg.num_shares=3", "secagg.reconstruction_threshold=2",
    # Bounds, should the kill land before a reply left: nothing waits for the defaults' 5-10 min.
    "secagg.stage_timeout_s=45", "federation.round_timeout_s=180",
]
SHARES_TIMEOUT_S = 240.0
RUN_TIMEOUT_S = 600.0


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return tiny_site_caches(tmp_path_factory.mktemp("sites"))


def _audited_kinds(site_folder: Path) -> list[tuple[str, int | None]]:
    path = site_folder / "state" / AUDIT_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            entries.append((entry.get("kind", ""), entry.get("round")))
    return entries


def _ctfed_site(yaml: Path, output: Path) -> subprocess.Popen:
    """``ctfed site --config site.yaml`` as the hospital's IT types it, in a session of its own."""
    with output.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ctfed.common.cli", "site", "--config", str(yaml), *TOLERANT_SITE],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )


def _shares_sent(log: Path, offset: int) -> bool:
    """Whether the SuperNode has pushed its round's key-share reply (Flower logs "Sent
    successfully" after each push); the victim runs one round of the run before it is killed."""
    text = log.read_text(errors="replace")[offset:] if log.is_file() else ""
    sending = text.find("Sending: train.secagg_share_keys message")
    return sending >= 0 and "Sent successfully" in text[sending:]


def _kill_everything(process: subprocess.Popen) -> None:
    """SIGKILL a wrapper and every process under it at once: nothing exits gracefully."""
    for pid in [*descendant_pids(process.pid), process.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)


def _flwr_run(link: RunningSuperLink, run_config: str) -> subprocess.Popen:
    """``flwr run`` of this checkout's app on the SuperLink, as the coordinator submits it."""
    return subprocess.Popen(
        [flower_tool("flwr"), "run", str(APP_DIR), link.connection, "--stream", "--run-config", run_config],
        env=offline_env(link.flwr_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


def _finished(run: subprocess.Popen) -> str:
    try:
        output, _ = run.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"'flwr run' did not finish in {RUN_TIMEOUT_S:.0f} s")
    assert run.returncode == 0, output[-5000:]
    return output


def _round_losses(log: str, site_id: str, number: int) -> list[str]:
    """The "loss A -> B" a site logged for training round ``number`` (client/app.py)."""
    return re.findall(rf"site {re.escape(site_id)} round {number}: \d+ steps, loss (\S+ -> \S+),", log)


def _recorded_rounds(run_dir: Path) -> int:
    with contextlib.suppress(OSError, ValueError):
        return len(json.loads((run_dir / "results.json").read_text())["rounds"])
    return 0


def test_a_killed_site_rejoins_and_a_killed_superlink_resumes_the_run(tmp_path: Path, caches: list[Path]) -> None:
    marker = str(tmp_path)
    certs = generate(tmp_path / "certs", list(SITES)).paths
    settings = SuperLinkSettings(state_dir=tmp_path / "coordinator", certs_dir=certs.root, host="127.0.0.1", port=0)
    run_dir = tmp_path / "run"
    nodes: dict[str, RunningSuperNode] = {}
    sites: list[subprocess.Popen] = []
    runs: list[subprocess.Popen] = []
    links: list[RunningSuperLink] = []
    victim_out = tmp_path / "victim.out"
    victim_log = tmp_path / VICTIM / "state" / "supernode.log"
    logs = {s: tmp_path / s / "state" / "supernode.log" for s in SITES}
    try:
        link = start_superlink(settings)
        links.append(link)
        register_sites([certs.site(s).public_key for s in SITES], link.flwr_home)
        roster = signing_keys(tmp_path, SITES)
        yamls = {}
        for site_id, cache in zip(SITES, caches):
            site = certs.site(site_id)
            yamls[site_id] = write_site_yaml(
                tmp_path / site_id, site_id, cache, link.local_address, site.ca_cert, site.private_key, roster
            )
            if site_id != VICTIM:
                nodes[site_id] = start_supernode(read_site_config(yamls[site_id], TOLERANT_SITE))
        sites.append(_ctfed_site(yamls[VICTIM], victim_out))
        wait_online(link.flwr_home, len(SITES), list(nodes.values()))

        config_file = tmp_path / "run.yaml"
        save_run_config(load_run_config(TOLERANT_RUN), config_file)
        run_config = f'run-config-file="{config_file}" run-dir="{run_dir}"'
        runs.append(_flwr_run(link, run_config))
        # The victim has trained, sent its update and pushed its key shares for round 1:
        # the coordinator holds its shares, and the others mask against its keys.
        offset = victim_log.stat().st_size if victim_log.is_file() else 0
        deadline = time.monotonic() + SHARES_TIMEOUT_S
        while not _shares_sent(victim_log, offset):
            assert time.monotonic() < deadline, f"{VICTIM} sent no round-1 key shares in {SHARES_TIMEOUT_S:.0f} s"
            assert runs[0].poll() is None, runs[0].communicate()[0][-5000:]
            assert sites[0].poll() is None, victim_out.read_text()[-3000:]
            time.sleep(0.05)
        _kill_everything(sites[0])
        restart_offset = victim_log.stat().st_size
        sites.append(_ctfed_site(yamls[VICTIM], victim_out))

        # Round 3 under way (a site has trained it): the coordinator loses power.
        trained_3 = f"site {SITES[0]} round 3: "
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (_recorded_rounds(run_dir) == 2 and trained_3 in logs[SITES[0]].read_text(errors="replace")):
            assert time.monotonic() < deadline, "round 3 never started"
            assert runs[0].poll() is None, runs[0].communicate()[0][-5000:]
            time.sleep(0.05)
        _kill_everything(link.process)
        runs[0].wait(timeout=60)  # 'flwr run' loses its stream
        before = json.loads((run_dir / "results.json").read_text())
        assert before["status"] == "running" and [r["round"] for r in before["rounds"]] == [1, 2]
        offsets = {s: logs[s].stat().st_size for s in SITES}

        # `ctfed server` again: the same state folder and port; the SuperNodes reconnect.
        link = start_superlink(replace(settings, port=links[0].port))
        links.append(link)
        wait_online(link.flwr_home, len(SITES), list(nodes.values()))
        runs.append(_flwr_run(link, f"{run_config} resume=true"))
        output = _finished(runs[1])

        results = json.loads((run_dir / "results.json").read_text())
        assert results["status"] == "completed", output[-5000:]
        rounds = results["rounds"]
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert rounds[:2] == before["rounds"]  # kept as they were
        assert all(r["aggregated"] and r["secure_aggregation"] for r in rounds), [r.get("reason") for r in rounds]
        [resume] = results["resumes"]
        assert resume["after_round"] == 2 and not resume.get("config_changes") and not resume.get("config_override")
        assert results["federation_id"] == before["federation_id"]
        assert sorted(p.name for p in (run_dir / "checkpoints").glob("global_round_*.safetensors")) == [
            f"global_round_{n:04d}.safetensors" for n in (0, 1, 2, 3)  # 0: the initial model
        ]
        first = {s["site"]: s for s in rounds[0]["sites"]}
        assert first[VICTIM]["status"] in ("dropped", "failed"), first[VICTIM]
        # Lost after its shares: at the masked input (or later), never before it.
        assert "secagg_masked_input" in first[VICTIM]["reason"] or "secagg_consistency" in first[VICTIM]["reason"], first[VICTIM]
        assert all(first[s]["status"] == "aggregated" for s in SITES if s != VICTIM), first
        for record in rounds[1:]:
            assert sorted((s["site"], s["status"]) for s in record["sites"]) == [(s, "aggregated") for s in sorted(SITES)]
        # The restarted SuperNode waited out the dead one's connection instead of being refused.
        log = victim_log.read_text(errors="replace")[restart_offset:]
        assert "previous SuperNode did not stop gracefully" in log, log[-3000:]
        assert "not registered" not in victim_out.read_text(errors="replace")
        # The restarted site continued its own round-1 state from its state folder.
        assert f"site {VICTIM} round 2: resumed its local training state of round 1" in log, log[-5000:]
        # The resumed run is a new Flower run: every site continued its round-2 state from disk,
        # so the site that had trained round 3 before the power cut trains it again exactly.
        federation = results["federation_id"][:8]
        for site_id in SITES:
            after = logs[site_id].read_text(errors="replace")[offsets[site_id]:]
            assert f"site {site_id} round 3: resumed its local training state of round 2 of federation {federation}" in after, (
                site_id, after[-3000:])
        killed_run = logs[SITES[0]].read_text(errors="replace")[:offsets[SITES[0]]]
        resumed_run = logs[SITES[0]].read_text(errors="replace")[offsets[SITES[0]]:]
        assert _round_losses(killed_run, SITES[0], 3) == _round_losses(resumed_run, SITES[0], 3) != []
        # Its audit log, written by both of its lives, is still one verified chain.
        assert verify_audit_log(tmp_path / VICTIM / "state" / AUDIT_FILE) > 0
        kinds = _audited_kinds(tmp_path / VICTIM)
        assert ("secagg-secagg_consistency", 2) in kinds and ("secagg-secagg_unmask", 2) in kinds, kinds
        assert ("secagg-secagg_unmask", 3) in kinds, kinds
    finally:
        for run in runs:
            stop_process_group(run)
        for node in nodes.values():
            stop_process_group(node.process)
        for site in sites:
            stop_process_group(site)
        for started in links:
            stop_process_group(started.process)
    deadline = time.monotonic() + 10
    while leftover_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not leftover_processes(marker)
