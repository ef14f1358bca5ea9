"""``simulation.ray_address``: what is accepted, and a dead address fails fast and names itself
(the two-node cluster run is tests/integration/test_ray_cluster.py)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from ctfed.common.config import ConfigError
from ctfed.simulations.config import load_simulation_config
from ctfed.simulations.runtime.engine import RAY_ADDRESS_ENV, SimulationError, resolve_ray_address, run_app, simulation_env


@pytest.mark.parametrize("address", ["auto", "127.0.0.1:6379", "head.example.org:6380", " 10.0.0.5:6379 "])
def test_accepted_addresses(address: str) -> None:
    assert load_simulation_config([f"simulation.ray_address='{address}'"]).simulation.ray_address == address.strip()


@pytest.mark.parametrize("address", ["ray://10.0.0.5:10001", "10.0.0.5", "10.0.0.5:port", ":6379", "10.0.0.5:70000"])
def test_other_addresses_are_refused_by_name(address: str) -> None:
    with pytest.raises(ConfigError, match="simulation.ray_address must be"):
        load_simulation_config([f"simulation.ray_address='{address}'"])


def test_concurrent_sites_is_refused_on_a_cluster() -> None:
    """ray.init() refuses num_cpus when it connects; the config says so before anything starts."""
    with pytest.raises(ConfigError, match="concurrent_sites=3 sets the cores of a private Ray"):
        load_simulation_config(["simulation.ray_address=127.0.0.1:6379", "simulation.concurrent_sites=3"])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed on exit: nothing listens there


def test_a_dead_address_fails_fast_naming_it(tmp_path: Path) -> None:
    port = _closed_port()
    started = time.monotonic()
    with pytest.raises(SimulationError, match=rf"simulation.ray_address=127.0.0.1:{port}: no Ray head answers"):
        run_app(tmp_path / "app", {}, num_sites=2, client_cpus=1, flwr_home=tmp_path / ".flwr",
                timeout_s=600, log_path=tmp_path / "federation.log", ray_address=f"127.0.0.1:{port}")
    assert time.monotonic() - started < 10  # not Ray's minute of retries, nor the run's timeout
    assert not (tmp_path / ".flwr").exists()  # refused before a SuperLink started


def test_a_private_ray_ignores_an_exported_ray_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RAY_ADDRESS_ENV, "10.0.0.5:6379")
    assert RAY_ADDRESS_ENV not in simulation_env(tmp_path, resolve_ray_address(""))
    assert simulation_env(tmp_path, "127.0.0.1:7000")[RAY_ADDRESS_ENV] == "127.0.0.1:7000"
