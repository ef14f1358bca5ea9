"""Plain helpers that tests import (``from helpers import ...``): tiny stand-in data and writers.

Fixtures live in ``tests/conftest.py``; what is here is needed at import time (parametrize
lists, dataset classes) or called with arguments. ``tests/`` is on ``sys.path`` because
``tests/conftest.py`` sits in a folder without ``__init__.py`` (pytest's default import mode).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, get_origin

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.run import Run
from torch.utils.data import Dataset

from ctfed.client.policy import POLICY_FILE_KEY, write_policy_file
from ctfed.client.site import DATA_PATH_KEY, SITE_ID_KEY, STATE_DIR_KEY
from ctfed.client.train import LocalTrainer
from ctfed.common.config import ModelConfig, SitePolicy, TrainConfig
from ctfed.common.exchange import ARRAYS_KEY, CONFIG_KEY, RoundInstructions, state_to_record
from ctfed.common.preprocess import FORMAT, MANIFEST

MODEL = ModelConfig()


class Volumes(Dataset):
    """Structured stand-in for a prepared cache: a bright sphere in noise, in [0, 1]."""

    def __init__(self, count: int = 5, seed: int = 0, size: int = MODEL.image_size) -> None:
        generator = torch.Generator().manual_seed(seed)
        grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, size)] * 3, indexing="ij"))
        volumes = []
        for _ in range(count):
            centre = torch.rand(3, 1, 1, 1, generator=generator) - 0.5
            sphere = ((grid - centre).pow(2).sum(0) < 0.3).float()
            noise = 0.2 * torch.rand(MODEL.in_channels, size, size, size, generator=generator)
            volumes.append((0.7 * sphere + noise).clamp(0, 1))
        self.volumes = torch.stack(volumes)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.volumes[index]


def tiny_trainer(seed: int = 0, **train: object) -> LocalTrainer:
    """A LocalTrainer on the tiny model and 5 sphere volumes: 2 local steps of a 3-round schedule."""
    cfg = TrainConfig(local_steps=2, schedule_rounds=3, **train)  # type: ignore[arg-type]
    return LocalTrainer(MODEL, cfg, Volumes(), seed=seed)


def any_label(label: int) -> dict[str, int]:
    """The default label row of :func:`write_manifest_cache`: the task ``any`` only."""
    return {"any": label}


def write_manifest_cache(
    root: Path,
    labels: Sequence[int | None],
    *,
    label_row: Callable[[int], dict[str, int]] = any_label,
    start: int = 0,
) -> Path:
    """A minimal prepared cache in ``root``: one 1x8³ float16 volume per entry of ``labels``.

    Volume ``i`` (counting from ``start``) is filled with ``i``, so a view of the cache can be
    traced back to the file it reads; ``None`` is an unlabelled scan (no label row).
    """
    root.mkdir(parents=True)
    series = []
    for index, label in enumerate(labels, start=start):
        np.save(root / f"v{index}.npy", np.full((1, 8, 8, 8), index, dtype=np.float16))
        series.append({
            "key": f"k{index}", "file": f"v{index}.npy", "content_hash": f"{index:04d}",
            "label": None if label is None else label_row(label),
        })
    manifest = {"format": FORMAT, "preprocessing": {"output_size": 8}, "series": series}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def read_results(run_dir: Path) -> dict:
    """A run folder's results.json."""
    return json.loads((run_dir / "results.json").read_text())


def write_random_cache(root: Path, labels: Sequence[int | None], size: int = 32) -> Path:
    """A site cache the tiny model can train on: one random 3x``size``³ float16 volume per
    entry of ``labels`` (volume ``i`` from seed ``i``), label ``any`` per scan (None: unlabelled)."""
    root.mkdir(parents=True)
    series = []
    for index, label in enumerate(labels):
        volume = np.random.default_rng(index).random((3, size, size, size)).astype(np.float16)
        np.save(root / f"s{index}.npy", volume)
        series.append({
            "key": f"s{index}", "file": f"s{index}.npy", "content_hash": f"h{index:03d}",
            "label": None if label is None else any_label(label),
        })
    (root / MANIFEST).write_text(json.dumps({"series": series}))
    return root


def site_context(
    cache_dir: Path,
    state_dir: Path,
    site_id: str = "site_x",
    *,
    policy: SitePolicy | None = None,
    run_id: int = 1,
    **node_config: str,
) -> Context:
    """A deployed site's Context as its SuperNode would hand it to the ClientApp: its cache,
    its id and state folder, its policy file when ``policy`` is given, and any other node config."""
    config: dict[str, str] = {DATA_PATH_KEY: str(cache_dir), SITE_ID_KEY: site_id, STATE_DIR_KEY: str(state_dir)}
    if policy is not None:
        config[POLICY_FILE_KEY] = str(write_policy_file(policy, state_dir))
    config.update(node_config)
    return Context(run_id=run_id, node_id=1, state=RecordDict(), run_config={}, node_config=config)


def train_message(
    instructions: RoundInstructions | ConfigRecord,
    weights: ArrayRecord | Mapping[str, torch.Tensor],
    message_type: str = "train",
    node_id: int = 1,
) -> Message:
    """A coordinator's message to ``node_id``: the round's instructions and the weights it sends.
    Needs a Flower task identity (fixture ``flower_task_identity``, or an InProcessGrid)."""
    config = instructions.to_record() if isinstance(instructions, RoundInstructions) else instructions
    arrays = weights if isinstance(weights, ArrayRecord) else state_to_record(weights)
    return Message(RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}), dst_node_id=node_id, message_type=message_type)


# Identifiers planted in DICOM headers, to show that none of them leaves the site.
PLANTED_IDENTIFIERS = {
    "PatientName": "ZZPHINAME123", "PatientID": "ZZPID98765", "AccessionNumber": "ZZACC55555",
    "InstitutionName": "ZZHOSPITAL777", "PatientBirthDate": "19010203",
}


def plant_identifiers(files: Sequence[Path]) -> list[Path]:
    """Write :data:`PLANTED_IDENTIFIERS` into every file of the first file's series; returns those files."""
    import pydicom

    target = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    planted = []
    for path in files:
        ds = pydicom.dcmread(path)
        if ds.SeriesInstanceUID == target:
            for keyword, value in PLANTED_IDENTIFIERS.items():
                setattr(ds, keyword, value)
            ds.save_as(path)
            planted.append(path)
    return planted


def dicom_identifiers(folder: Path) -> set[str]:
    """The header identifiers (names, IDs, UIDs of 6 characters or more) of every DICOM file
    under ``folder``: what must never appear in anything a run writes."""
    import pydicom

    identifiers: set[str] = set()
    for path in folder.rglob("*"):
        if not path.is_file() or path.suffix == ".csv":
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        for keyword in ("PatientName", "PatientID", "AccessionNumber", "InstitutionName", "StudyInstanceUID", "SeriesInstanceUID"):
            value = str(ds.get(keyword, "")).strip()
            if len(value) >= 6:
                identifiers.add(value)
    return identifiers


def assert_no_identifier_in(folder: Path, identifiers: set[str], skipped: Sequence[Path] = ()) -> None:
    """No file under ``folder`` (outside ``skipped`` folders) holds any of ``identifiers``."""
    assert identifiers
    for path in folder.rglob("*"):
        if not path.is_file() or any(skip in path.parents for skip in skipped):
            continue
        data = path.read_bytes()
        for identifier in identifiers:
            assert identifier.encode() not in data, f"{identifier!r} found in {path}"


TINY_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "ctfed-tests"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"

[tool.flwr.app.config]
rounds = 1
"""


def tiny_app(folder: Path) -> Path:
    """A minimal Flower app that Flower can bundle (``flwr build``, ``ctfed site --app-hash``); never run."""
    (folder / "tinyapp").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(TINY_PYPROJECT)
    (folder / "tinyapp" / "__init__.py").write_text("")
    (folder / "tinyapp" / "client.py").write_text("app = None  # the site's code\n")
    (folder / "tinyapp" / "server.py").write_text("app = None\n")
    return folder


def submit_run(app_dir: Path, connection: str, flwr_home: Path, run_config: str, timeout_s: float) -> str:
    """``flwr run APP CONNECTION --stream --run-config ...`` as the coordinator types it, against a
    running SuperLink; its output, after asserting it finished in ``timeout_s`` with exit code 0."""
    import subprocess

    import pytest

    from ctfed.common.processes import flower_tool, offline_env, stop_process_group

    command = [flower_tool("flwr"), "run", str(app_dir), connection, "--stream", "--run-config", run_config]
    flwr_run = subprocess.Popen(
        command, env=offline_env(flwr_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    try:
        output, _ = flwr_run.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"'flwr run' did not finish in {timeout_s:.0f} s")
    finally:
        stop_process_group(flwr_run)
    assert flwr_run.returncode == 0, output[-5000:]
    return output


# ---------------------------------------------------------------------------- a Ray cluster on 127.0.0.1

# Run by the cluster's own Python as a Ray driver, so the test process never joins a cluster
# (ray.init there would outlive the test): prints the alive nodes and ClientAppActors' nodes.
_RAY_PROBE = """
import json, sys, time
import ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
want, deadline = int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while True:
    alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    if len(alive) >= want or time.monotonic() > deadline:
        break
    time.sleep(0.2)
actors = [a for a in state.actors().values() if a.get("ActorClassName", "").endswith("ClientAppActor")]
print(json.dumps({"nodes": alive, "site_actor_nodes": sorted({a["Address"]["NodeID"] for a in actors})}))
"""


class LocalRayCluster:
    """A Ray head and ``workers`` worker nodes on 127.0.0.1, each started by ``ray start --block``
    as a child of this process with its own temp dir and ports, and stopped by signalling those
    children (never ``ray stop``, which stops every Ray on the machine, other sessions' too).

    ``address`` is the head's host:port for ``simulation.ray_address``; ``probe()`` lists the
    alive nodes and the nodes that ran simulated sites (Flower's ClientAppActors)."""

    def __init__(self, workers: int = 1, cpus_per_node: int = 1, object_store_mb: int = 100) -> None:
        self.workers = workers
        self.cpus_per_node = cpus_per_node
        self.object_store_mb = object_store_mb
        self.processes: list[subprocess.Popen] = []
        # Short: Ray's Unix sockets live under it and a socket path is limited to 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="ctfray-", dir="/tmp"))
        self.port = 0
        self.address = ""

    def _ray_start(self, name: str, *args: str) -> subprocess.Popen:
        from ctfed.common.processes import free_port

        log = (self.root / f"{name}.log").open("w", encoding="utf-8")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        command = [
            str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats",
            "--num-cpus", str(self.cpus_per_node),
            "--temp-dir", str(self.root / name), "--object-store-memory", str(self.object_store_mb * 2**20),
            # Fixed by default (52365), so two nodes on one machine would collide.
            "--dashboard-agent-listen-port", str(free_port()),
            *args,
        ]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.processes.append(process)
        return process

    def start(self, timeout_s: float = 180.0) -> "LocalRayCluster":
        """Start the head, then the workers; each is up once its ``ray start`` says so (after
        its raylet registered with the head). Minutes under load: Ray's start is ~30 s alone
        on a shared core at load 13."""
        from ctfed.common.processes import free_port

        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        try:
            self._ray_start(
                "head", "--head", "--port", str(self.port), "--include-dashboard", "false",
                "--ray-client-server-port", str(free_port()),  # fixed by default (10001)
            )
            self._wait_started("head", timeout_s)
            for index in range(self.workers):
                self._ray_start(f"worker{index}", "--address", self.address)
            for index in range(self.workers):
                self._wait_started(f"worker{index}", timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_started(self, name: str, timeout_s: float) -> None:
        process = self.processes[[p.args[p.args.index("--temp-dir") + 1] for p in self.processes].index(str(self.root / name))]
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started" not in self.log(name):
            if process.poll() is not None:
                raise RuntimeError(f"Ray node {name} exited ({process.returncode}): {self.log(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray node {name} did not start within {timeout_s:.0f} s: {self.log(name)}")
            time.sleep(0.2)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(encoding="utf-8", errors="replace")[-4000:] if path.exists() else "(no log)"

    def probe(self, wait_for_nodes: int = 0, timeout_s: float = 30.0) -> dict[str, list[str]]:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        out = subprocess.run(
            [sys.executable, "-c", _RAY_PROBE, self.address, str(wait_for_nodes), str(timeout_s)],
            capture_output=True, text=True, timeout=timeout_s + 60, env=env, check=True,
        ).stdout
        return json.loads(out.strip().splitlines()[-1])

    def stop(self) -> None:
        """SIGTERM each ``ray start --block`` (it stops its node's processes), workers first;
        then SIGKILL whatever of their process groups is left."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # its own session: only this node's processes
            process.wait()
        self.processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalRayCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the SuperNode's side of Flower (tests of the app pin and the site's executor) ---------

SITE = {"site_id": "hospital-a", "data_path": "c", "superlink": "h:1", "ca_cert": "ca", "private_key": "k"}


class FakeSuperLink:
    """What the SuperNode's connection returns: one message of run 5, its run and its bundle."""

    def __init__(self, message: Message, fab_content: bytes) -> None:
        message.metadata.__dict__["_message_id"] = message.object_id  # as the SuperLink delivers it
        self.message = message
        self.objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
        self.fab = Fab(hashlib.sha256(fab_content).hexdigest(), fab_content, {})
        self.pending = [(message, get_object_tree(message))]
        self.fabs_fetched = 0

    def receive(self):  # noqa: ANN201
        return self.pending.pop() if self.pending else None

    def get_run(self, run_id: int) -> Run:
        run = Run.create_empty(run_id)
        run.fab_hash = self.fab.hash_str
        return run

    def get_fab(self, fab_hash: str, run_id: int) -> Fab:
        self.fabs_fetched += 1
        return self.fab

    def pull_object(self, run_id: int, object_id: str) -> bytes:
        return self.objects[object_id]


_OTHER_TYPE = {int: 2.5, float: "1", str: 7, bytes: "not bytes", bool: 1}


def corrupt_field(payload: dict, field: str, kind: Any, how: str) -> None:
    """Leave ``field`` out of ``payload`` (``how="missing"``) or give it a value of another
    type than ``kind`` (a field type of common/secagg.py's payload tables) that a
    ConfigRecord still carries: for a list, one element of another type."""
    if how == "missing":
        del payload[field]
    elif get_origin(kind) is list:
        payload[field] = ["x"] if kind == list[int] else [1]
    else:
        payload[field] = _OTHER_TYPE[kind]
