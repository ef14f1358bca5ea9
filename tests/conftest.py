"""Fixtures shared by tests/unit and tests/integration.

Session-scoped fixtures build something expensive once for every file that reads it; a test
that writes must copy it first (they are read-only by contract). Plain helpers that tests
call with arguments, or need at import time, are in ``tests/helpers.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import LocalRayCluster

if TYPE_CHECKING:
    from ctfed.simulations.config import SimulationRunConfig


# ---------------------------------------------------------------------------- two workers

# The default run is split over pytest-xdist workers, one test file to a worker (pyproject's
# addopts: ``-n auto --dist loadfile``): much of the suite's wall time is spent waiting on
# processes (SuperLinks, SuperNodes, Ray), which a second worker fills (on 2 cores 1,562 s in
# one process, 918 s on two workers: docs/test-times.md). At most this many
# workers: every simulation starts Ray with all the machine's cores, so more would only queue
# behind each other and multiply the memory. ``-n 0`` runs in this process.
MAX_TEST_WORKERS = 4
# The heaviest files first, so that neither worker is left with one of them at the end
# (measured idle on 2 cores, docs/test-times.md); then the other files with a slow test, then
# the rest, each group in collection order. Only the order changes, never what runs.
HEAVIEST_FILES = (
    "test_label_efficiency_study.py", "test_bench_quick.py", "test_deployed_site_faults.py",
    "test_fault_tolerance.py", "test_deployed_tls_federation.py", "test_privacy_sweep.py",
)


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, one compute thread per worker and per process it starts (sites,
    SuperNodes, Ray), unless the caller chose: two workers' torch thread pools on the same two
    cores would spin-wait on each other."""
    if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"  # for the processes the tests start
        import torch

        torch.set_num_threads(1)  # this process imported torch already (tests/helpers.py)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core, at least 1, at most MAX_TEST_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_TEST_WORKERS))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, longest files first (``HEAVIEST_FILES``, then files with a ``slow`` test):
    files are handed out in this order, so the long ones start while the short ones fill in.
    ``--no-loadscope-reorder`` (addopts) keeps xdist from reordering by test count."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> int:
        if item.path.name in HEAVIEST_FILES:
            return HEAVIEST_FILES.index(item.path.name)
        return len(HEAVIEST_FILES) + (0 if item.path in slow_files else 1)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run 5, node 1, task 1 as the process's Flower task identity.

    ``Message()`` takes its run and node from it; a SuperNode sets it, a unit test has none.
    """
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 5), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


@pytest.fixture(scope="session")
def three_site_caches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared caches of 3 synthetic hospitals with 2 scans each (``synth.sites=3
    synth.scans_per_site=2``): ``<root>/site_0`` .. ``site_2``. Read-only: sites keep their
    state outside their cache, so federations over it share one copy."""
    from ctfed.simulations.config import load_simulation_config
    from ctfed.simulations.runtime.simulate import synthesize_and_prepare

    root = tmp_path_factory.mktemp("three_sites")
    synthesize_and_prepare(load_simulation_config(["synth.sites=3", "synth.scans_per_site=2"]), root)
    return root / "cache"


@pytest.fixture(scope="session")
def one_site_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic hospital of 2 scans (one per study, seed 0) prepared with the run config's
    preprocessing, as ``ctfed prepare`` would at a site. Read-only."""
    from ctfed.common.config import load_run_config
    from ctfed.common.preprocess import prepare
    from ctfed.simulations.data.synth import synthesize_federation

    root = tmp_path_factory.mktemp("one_site")
    (site_dicom,) = synthesize_federation(root / "dicom", sites=1, scans_per_site=2, seed=0)
    prepare(site_dicom, root / "cache", load_run_config().preprocess, progress=False)
    return root / "cache"


# ---------------------------------------------------------------------------- one Ray head per session

# "shared" (default): the in-process simulated federations of tests/integration run on one Ray
# head that the session starts on first use (simulation.ray_address), instead of each starting
# its own Ray (~20-70 s of a run under load, docs/test-times.md). "private": every run starts
# its own Ray, as ctfed simulate does by default.
TEST_RAY_ENV = "CTFED_TEST_RAY"
# Files whose runs stay on a private Ray: timed benchmarks (a run's cost includes its Ray
# start), killed and faulty sites and processes.
PRIVATE_RAY_FILES = {"test_bench_quick.py", "test_fault_tolerance.py"}


class SharedRayHead:
    """One Ray head for the session (all the machine's cores), started on the first run that asks."""

    def __init__(self) -> None:
        self.cluster: LocalRayCluster | None = None

    def address(self) -> str:
        if self.cluster is None:
            self.cluster = LocalRayCluster(workers=0, cpus_per_node=os.cpu_count() or 1, object_store_mb=1024).start()
        return self.cluster.address

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


@pytest.fixture(scope="session")
def shared_ray_head() -> Iterator[SharedRayHead]:
    """The session's Ray head; stopped at the session's end, failed tests or not."""
    head = SharedRayHead()
    try:
        yield head
    finally:
        head.stop()


def needs_private_ray(cfg: SimulationRunConfig) -> bool:
    """A run that keeps its own Ray: concurrent_sites sets its cores (refused on a cluster),
    faults kill and stall site processes, an explicit address is the test's own."""
    return bool(cfg.simulation.concurrent_sites or cfg.simulation.faults or cfg.simulation.ray_address)


@pytest.fixture(autouse=True)
def simulations_on_the_shared_ray_head(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Route ``ctfed simulate``'s config (in this process) to the session's Ray head by adding
    ``simulation.ray_address``; the run records it like any override. Off with CTFED_TEST_RAY=private."""
    path = Path(str(request.node.path))
    if os.environ.get(TEST_RAY_ENV, "shared") == "private" or "integration" not in path.parts or path.name in PRIVATE_RAY_FILES:
        return
    from ctfed.simulations.runtime import simulate

    head: SharedRayHead = request.getfixturevalue("shared_ray_head")
    load = simulate.load_simulation_config

    def load_on_the_shared_head(overrides: Sequence[str] = (), **kwargs: object):  # noqa: ANN202 - the loader's type
        cfg = load(overrides, **kwargs)
        if needs_private_ray(cfg):
            return cfg
        return load([*overrides, f"simulation.ray_address={head.address()}"], **kwargs)

    monkeypatch.setattr(simulate, "load_simulation_config", load_on_the_shared_head)
