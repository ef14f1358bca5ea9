"""A real Flower simulation with local DP-SGD, where one site's policy refuses every round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctfed.client.audit import AUDIT_FILE, KIND_REFUSAL, KIND_SECAGG_PREFIX, KIND_TRAIN_REPLY, verify_audit_log
from ctfed.client.ledger import LEDGER_FILE
from ctfed.common.cli import main
from ctfed.common.dp import PrivacyLedger, entries_epsilon
from ctfed.common.exchange import STATUS_AGGREGATED, STATUS_REFUSED
from ctfed.common.secagg import STAGE_MASKED_INPUT, STAGE_TRAIN, STAGES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    code = main(
        [
            "simulate",
            f"output_dir={out}",
            "run_name=dp",
            "federation.rounds=2",
            "federation.min_sites=2",
            "train.local_steps=2",
            "synth.sites=3",
            "synth.scans_per_site=2",
            "privacy.mode=local",
            "privacy.local.noise_multiplier=1.0",
            "simulation.site_policies=[{site:site_1,max_local_steps:1}]",
            # Secure aggregation (the default) with a threshold two sites can meet.
            "secagg.num_shares=3",
            "secagg.reconstruction_threshold=2",
        ]
    )
    assert code == 0
    return out / "dp"


def test_epsilon_grows_per_site_and_the_refusing_site_is_recorded(local_dp_run: Path) -> None:
    results = json.loads((local_dp_run / "results.json").read_text())
    assert results["status"] == "completed"
    for record in results["rounds"]:
        assert record["aggregated"] is True
        sites = {s["site"]: s for s in record["sites"]}
        assert set(sites) == {"site_0", "site_1", "site_2"}
        refused = sites.pop("site_1")
        assert refused["status"] == STATUS_REFUSED
        assert "max_local_steps=1" in refused["reason"] and refused["epsilon"] is None
        for site, outcome in sites.items():
            assert outcome["status"] == STATUS_AGGREGATED
            # Two scans, below policy.min_reported_count: the site withholds its volume count,
            # and under local DP the epsilon would give it away, so the reply carries none.
            assert outcome["epsilon"] is None
    for site in ("site_0", "site_2"):
        ledger = PrivacyLedger.load(local_dp_run / "sites" / site / LEDGER_FILE)
        assert [entry.round for entry in ledger.entries] == [1, 2]
        assert 0 < entries_epsilon(ledger.entries[:1], 1e-5) < ledger.epsilon(1e-5)


def test_every_outgoing_message_is_audited(local_dp_run: Path) -> None:
    secure_stages = [f"{KIND_SECAGG_PREFIX}{stage}" for stage in STAGES if stage != STAGE_TRAIN]
    for site, kinds in (("site_0", [KIND_TRAIN_REPLY, *secure_stages]), ("site_1", [KIND_REFUSAL])):
        path = local_dp_run / "sites" / site / AUDIT_FILE
        entries = [json.loads(line) for line in path.read_text().splitlines()]
        assert verify_audit_log(path) == len(entries) == 2 * len(kinds)
        assert [e["kind"] for e in entries] == kinds * 2
        assert [e["round"] for e in entries] == [1] * len(kinds) + [2] * len(kinds)
        if site == "site_0":
            train = [e for e in entries if e["kind"] == KIND_TRAIN_REPLY]
            assert train[1]["dp"]["mode"] == "local"
            assert train[1]["dp"]["epsilon_after"] > train[0]["dp"]["epsilon_after"] > 0
            # The clear update stays at the site; what left it was the masked vector.
            assert train[0]["parameters"] and "held for secure aggregation" in train[0]["reason"]
            masked = [e for e in entries if e["kind"] == f"{KIND_SECAGG_PREFIX}{STAGE_MASKED_INPUT}"]
            assert masked[0]["bytes"] > 0 and masked[0]["payload_sha256"] != masked[1]["payload_sha256"]
            # Whose shares this site's masks are with: the other training site's node, ids only.
            assert len(masked[0]["shares"]["shares_received_from"]) == 1
            # Under local DP no per-step loss left the site.
            assert "losses" not in train[0]["metrics"] and "loss" in train[0]["metrics"]


@pytest.fixture(scope="module")
def central_dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    code = main(
        [
            "simulate",
            f"output_dir={out}",
            "run_name=central",
            "federation.rounds=2",
            "train.local_steps=1",
            "synth.sites=2",
            "synth.scans_per_site=2",
            "privacy.mode=central",
            "privacy.central.clip_norm=0.05",
            "privacy.central.noise_multiplier=0.5",
            # Central DP on top of secure aggregation: the coordinator noises the unmasked mean.
            "secagg.num_shares=3",
            "secagg.reconstruction_threshold=2",
        ]
    )
    assert code == 0
    return out / "central"


def test_central_dp_noises_the_mean_and_keeps_its_ledger(central_dp_run: Path) -> None:
    from opacus.accountants import RDPAccountant

    from ctfed.common.checkpoint import load_checkpoint

    results = json.loads((central_dp_run / "results.json").read_text())
    assert results["status"] == "completed"
    rounds = results["rounds"]
    assert [r["central_noise_std"] for r in rounds] == [pytest.approx(0.5 * 0.05 / 2)] * 2
    accountant = RDPAccountant()
    epsilons = []
    for _ in rounds:
        accountant.step(noise_multiplier=0.5, sample_rate=1.0)
        epsilons.append(accountant.get_epsilon(1e-5))
    assert [r["central_epsilon"] for r in rounds] == [pytest.approx(e) for e in epsilons]
    ledger = PrivacyLedger.from_dict(results["central_privacy_ledger"])
    assert [e.round for e in ledger.entries] == [1, 2]
    _, _, card = load_checkpoint(central_dp_run / "checkpoints" / "global_round_0002.safetensors")
    assert card["central_privacy_ledger"] == results["central_privacy_ledger"]
    for record in rounds:
        assert all(s["status"] == STATUS_AGGREGATED for s in record["sites"])


def test_distributed_dp_federation_sites_noise_and_account_their_own(tmp_path: Path) -> None:
    """privacy.mode=distributed in a real Flower simulation: every site clips, adds its Skellam
    noise under the masks and records its own epsilon; the coordinator adds none."""
    from ctfed.client.ledger import DISTRIBUTED_LEDGER_FILE
    from ctfed.common.dp import SKELLAM, entries_epsilon

    code = main([
        "simulate", f"output_dir={tmp_path}", "run_name=distributed", "federation.rounds=1", "train.local_steps=1",
        "synth.sites=2", "synth.scans_per_site=2", "privacy.mode=distributed",
        "privacy.distributed.clip_norm=0.05", "privacy.distributed.noise_multiplier=0.7",
        "secagg.num_shares=3", "secagg.reconstruction_threshold=2",
    ])
    assert code == 0
    run = tmp_path / "distributed"
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed"
    (record,) = results["rounds"]
    assert record["aggregated"] and record["central_noise_std"] is None and "central_privacy_ledger" not in results
    for outcome in record["sites"]:
        assert outcome["status"] == STATUS_AGGREGATED
        ledger = PrivacyLedger.load(run / "sites" / outcome["site"] / DISTRIBUTED_LEDGER_FILE)
        (entry,) = ledger.entries
        assert entry.mechanism == SKELLAM and entry.noise_multiplier == 0.7  # its own noise only (policy default)
        assert outcome["epsilon"] == pytest.approx(entries_epsilon([entry], 1e-5))
        entries = [json.loads(line) for line in (run / "sites" / outcome["site"] / AUDIT_FILE).read_text().splitlines()]
        dp = next(e["dp"] for e in entries if e["kind"] == KIND_TRAIN_REPLY)
        assert dp["mode"] == "distributed" and dp["noise_added_by"].startswith("this site")
