"""A site's heartbeat (client/supernode_main.py, client/site_cli.py): the interval it announces,
the record of the last heartbeat the SuperLink accepted, and waiting out a dead SuperNode's
connection before a restarted one connects (the SuperLink refuses a key it counts online).
The end to end case, with real processes: tests/integration/test_deployed_site_faults.py."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

import pytest

from ctfed.client.site_cli import HEARTBEAT_FILE, activation_window_s, supernode_command
from ctfed.client.supernode_main import (
    EXPIRY_MARGIN_S,
    HEARTBEAT_CONSTANT,
    HEARTBEAT_MODULES,
    HEARTBEAT_SENDER,
    HEARTBEAT_SENDER_MODULE,
    previous_connection_expiry,
    record_heartbeats,
    set_heartbeat_interval,
    wait_for_previous_connection,
)
from ctfed.common.config import ConfigError, SiteConfig

SITE = {"site_id": "hospital-a", "data_path": "c", "superlink": "h:1", "ca_cert": "ca", "private_key": "k"}


def test_the_heartbeat_interval_is_checked_and_reaches_the_supernode_command() -> None:
    assert SiteConfig(**SITE).heartbeat_interval_s == 30.0  # Flower's own default
    for bad in (9.9, 0.0, -1.0, 1800.5):
        with pytest.raises(ConfigError, match=r"site.heartbeat_interval_s must be in \[10, 1800\]"):
            SiteConfig(**SITE, heartbeat_interval_s=bad)
    cfg = SiteConfig(**SITE, heartbeat_interval_s=10.0)
    launcher = supernode_command(cfg, 9999)
    launcher = launcher[: launcher.index("--")]
    assert launcher[launcher.index("--heartbeat-interval") + 1] == "10"
    assert launcher[launcher.index("--heartbeat-file") + 1] == str(cfg.state_path / HEARTBEAT_FILE)
    assert activation_window_s(cfg) == 25.0  # two heartbeats and a margin


def test_set_heartbeat_interval_sets_what_flower_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    modules = [importlib.import_module(name) for name in HEARTBEAT_MODULES]
    for module in modules:
        monkeypatch.setattr(module, HEARTBEAT_CONSTANT, getattr(module, HEARTBEAT_CONSTANT))  # restored after
    set_heartbeat_interval(12.0)
    assert [getattr(module, HEARTBEAT_CONSTANT) for module in modules] == [12.0, 12.0]


def test_accepted_heartbeats_are_recorded_and_refused_ones_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module(HEARTBEAT_SENDER_MODULE)

    class Sender:  # Flower's HeartbeatSender(fn) keeps fn and calls it per heartbeat
        def __init__(self, heartbeat_fn):  # noqa: ANN001, ANN204
            self.heartbeat_fn = heartbeat_fn

    monkeypatch.setattr(module, HEARTBEAT_SENDER, Sender)
    record = tmp_path / HEARTBEAT_FILE
    record_heartbeats(record, 10.0)
    make = getattr(module, HEARTBEAT_SENDER)
    assert make(lambda: False).heartbeat_fn() is False and not record.exists()
    before = time.time()
    assert make(lambda: True).heartbeat_fn() is True
    written = json.loads(record.read_text())
    assert written["interval_s"] == 10.0 and before <= written["time"] <= time.time()


def test_a_dead_supernodes_connection_is_waited_out_before_connecting(tmp_path: Path) -> None:
    record = tmp_path / HEARTBEAT_FILE
    slept: list[float] = []
    assert previous_connection_expiry(record) is None and wait_for_previous_connection(record, slept.append) == 0.0
    # Last heartbeat 5 s ago at a 10 s interval: the SuperLink counts it online 15 s more.
    record.write_text(json.dumps({"time": time.time() - 5.0, "interval_s": 10.0}))
    waited = wait_for_previous_connection(record, slept.append)
    assert slept == [waited] and 15.0 + EXPIRY_MARGIN_S - 1.0 < waited <= 15.0 + EXPIRY_MARGIN_S
    # Expired long ago, half written or nonsense: no wait (ctfed site's retry covers a refusal).
    for text in (json.dumps({"time": time.time() - 60.0, "interval_s": 10.0}), '{"time": 1', '{"interval_s": 10}', "[]"):
        record.write_text(text)
        assert wait_for_previous_connection(record, slept.append) == 0.0
    assert len(slept) == 1
    # A clock set far back cannot make a site wait for ever.
    record.write_text(json.dumps({"time": time.time() + 1e9, "interval_s": 10.0}))
    assert wait_for_previous_connection(record, slept.append) <= 2 * 1800 + EXPIRY_MARGIN_S


def test_a_refused_activation_is_retried_only_inside_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``run_site`` retries a refused activation while the SuperLink could still count the
    site's previous connection online (``activation_window_s`` from the start), then stops
    with the diagnosis. Each SuperNode here is refused after 8 s of (simulated) start-up."""
    from ctfed.client import site_cli

    clock = [0.0]
    starts: list[float] = []
    monkeypatch.setattr(site_cli.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(site_cli.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))

    def start(cfg: SiteConfig, echo: bool = False) -> object:
        starts.append(clock[0])
        return site_cli.RunningSuperNode(process=None, site_id=cfg.site_id, log_file=tmp_path / "supernode.log", runtime_port=0)  # type: ignore[arg-type]

    def run(process: object) -> int:
        clock[0] += 8.0  # start-up and the refusal
        return 1

    monkeypatch.setattr(site_cli, "start_supernode", start)
    monkeypatch.setattr(site_cli, "run_in_foreground", run)
    monkeypatch.setattr(site_cli, "activation_refused", lambda node: True)
    monkeypatch.setattr(site_cli, "exit_diagnosis", lambda cfg, node: "this site's key is not registered")
    monkeypatch.setattr(site_cli, "site_key_fingerprint", lambda cfg: "SHA256:test")
    cfg = SiteConfig(**{**SITE, "state_dir": str(tmp_path)}, heartbeat_interval_s=10.0)
    assert site_cli.run_site(cfg) == 1
    # Window 25 s: refused at 8 (retry at 13), at 21 (13 + 8; 21 + 5 is past 25: stop).
    assert starts == [0.0, 13.0]
    err = capsys.readouterr().err
    assert err.count("trying again in 5 s") == 1 and "not registered" in err
