"""Fixtures shared by tests/unit and tests/integration.

Session-scoped fixtures build something expensive once for every file that reads it; a test
that writes must copy it first (they are read-only by contract). Plain helpers that tests
call with arguments, or need at import time, are in ``tests/helpers.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest


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
