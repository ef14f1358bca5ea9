"""A deployed round's fixed cost: SecAgg+ rounds between a real SuperLink and SuperNodes on 127.0.0.1.

    python -m ctfed.simulations.bench.deployed_bench [--sites 3] [--rounds 2] [--out FILE.json]

What an operator runs, on one machine: ``ctfed server``'s SuperLink (TLS, node auth), one
``ctfed site`` SuperNode per site (signing keys and roster, so SecAgg+ is on), and
``flwr run`` of this checkout with the default (tiny) model and 2 local steps. It reports
the wall time of each round (results.json's ``seconds``), the time from submitting the run to
its end, and, from the SuperNodes' logs, how many ClientApp processes each site started and
how long each message's ClientApp took (Flower's "Receiving" to "Sending" lines, as seen
when they reach the log). Everything runs on free ports in a temporary folder, stopped
after.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ctfed.common.config import TrainConfig

APP_DIR = Path(__file__).resolve().parents[2]
ONLINE_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 900.0
_RECEIVING = re.compile(r"Receiving: (\S+) message")
_SENDING = re.compile(r"Sending: (\S+) message")
# One line per ClientApp process the site starts (Flower's own, or ctfed's forked one).
_CLIENTAPP_START = "Start `flwr-clientapp` process"


class _LogWatch:
    """Timestamps the lines of a growing log file as they appear (Flower's lines carry none)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        offset, pending = 0, ""
        while not self._stop.is_set():
            if self.path.is_file():
                with self.path.open("rb") as log:
                    log.seek(offset)
                    chunk = log.read()
                offset += len(chunk)
                pending += chunk.decode(errors="replace")
                *complete, pending = pending.split("\n")
                now = time.monotonic()
                self.lines.extend((now, line) for line in complete)
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def _stages(watch: _LogWatch, since: float) -> list[dict[str, Any]]:
    """Each message the site handled after ``since``: its type and Receiving-to-Sending seconds."""
    stages, received = [], None
    for stamp, line in watch.lines:
        if stamp < since:
            continue
        if match := _RECEIVING.search(line):
            received = (stamp, match.group(1))
        elif (match := _SENDING.search(line)) and received is not None:
            stages.append({"message": received[1], "seconds": round(stamp - received[0], 2)})
            received = None
    return stages


def measure(work: Path, sites: int, rounds: int, local_steps: int) -> dict[str, Any]:
    """Start a SuperLink and ``sites`` SuperNodes in ``work``, run ``rounds`` rounds, report."""
    from ctfed.client.site_cli import start_supernode
    from ctfed.common.certs import generate, make_signing_key, write_roster
    from ctfed.common.config import load_run_config, read_site_config
    from ctfed.common.preprocess import prepare
    from ctfed.common.processes import flower_tool, offline_env, stop_process_group
    from ctfed.server.deploy_cli import SuperLinkSettings, list_nodes, register_sites, running_superlink
    from ctfed.simulations.data.synth import synthesize_federation

    names = [f"site-{i}" for i in range(sites)]
    cfg = load_run_config()
    caches = []
    for site_dir in synthesize_federation(work / "dicom", sites=sites, scans_per_site=2, seed=0):
        cache = work / "cache" / site_dir.name
        prepare(site_dir, cache, cfg.preprocess, progress=False)
        caches.append(cache)
    certs = generate(work / "certs", names).paths
    roster = work / "roster.yaml"
    write_roster(roster, {name: make_signing_key(work / name / "keys" / "signing.key") for name in names})
    settings = SuperLinkSettings(state_dir=work / "coordinator", certs_dir=certs.root, host="127.0.0.1", port=0)
    run_dir = work / "run"
    nodes, watches = [], []
    try:
        with running_superlink(settings) as link:
            register_sites([certs.site(name).public_key for name in names], link.flwr_home)
            started = time.monotonic()
            for name, cache in zip(names, caches):
                keys = certs.site(name)
                yaml = work / name / "site.yaml"
                yaml.write_text(
                    f"site_id: {name}\ndata_path: {cache}\nsuperlink: '{link.local_address}'\n"
                    f"ca_cert: {keys.ca_cert}\nprivate_key: {keys.private_key}\nstate_dir: state\n"
                    f"runtime_port: 0\nsigning_key: keys/signing.key\nroster: {roster}\n"
                )
                node = start_supernode(read_site_config(yaml))
                nodes.append(node)
                watches.append(_LogWatch(node.log_file))
            deadline = time.monotonic() + ONLINE_TIMEOUT_S
            while len([n for n in list_nodes(link.flwr_home) if n["status"] == "online"]) < sites:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the SuperNodes did not come online in {ONLINE_TIMEOUT_S:.0f} s")
                time.sleep(0.5)
            online_s = time.monotonic() - started
            submitted = time.monotonic()
            run_config = f'num-server-rounds={rounds} local-steps={local_steps} run-dir="{run_dir}"'
            done = subprocess.run(
                [flower_tool("flwr"), "run", str(APP_DIR), link.connection, "--stream", "--run-config", run_config],
                env=offline_env(link.flwr_home), capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
            )
            run_s = time.monotonic() - submitted
            results_file = run_dir / "results.json"
            if done.returncode != 0 or not results_file.is_file():
                raise RuntimeError(f"flwr run failed ({done.returncode}): {(done.stdout + done.stderr)[-3000:]}")
            results = json.loads(results_file.read_text())
            time.sleep(0.5)  # the last lines of the SuperNodes' logs
    finally:
        for watch in watches:
            watch.stop()
        for node in nodes:
            stop_process_group(node.process)
    per_site = {}
    for name, watch in zip(names, watches):
        stages = _stages(watch, submitted)
        per_site[name] = {
            "clientapp_processes": sum(_CLIENTAPP_START in line for stamp, line in watch.lines if stamp >= submitted),
            "messages": stages,
        }
    return {
        "sites": sites,
        "rounds": rounds,
        "local_steps": local_steps,
        "status": results["status"],
        "round_s": [round(r["seconds"], 2) for r in results["rounds"]],
        "aggregated": [bool(r["aggregated"]) for r in results["rounds"]],
        "supernodes_online_s": round(online_s, 2),
        "flwr_run_s": round(run_s, 2),
        "per_site": per_site,
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``main`` (tests/unit/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(prog="python -m ctfed.simulations.bench.deployed_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=TrainConfig().local_steps, help="train.local_steps (default %(default)s)")
    parser.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ctfed-deployed-bench-") as work:
        figures = measure(Path(work), args.sites, args.rounds, args.local_steps)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if figures["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
