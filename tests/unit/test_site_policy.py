"""Site policy: every rule refuses a violating round, before the site reads any data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message

from ctfed.client.app import train as client_train
from ctfed.client.audit import AUDIT_FILE, KIND_REFUSAL, verify_audit_log
from ctfed.client.policy import (
    POLICY_FILE_KEY,
    SITE_POLICIES_FILE_KEY,
    PolicyViolation,
    check_instructions,
    load_site_policy,
    write_policy_file,
)
from ctfed.client.site_cli import node_config
from ctfed.common.config import (
    CentralDPConfig,
    ConfigError,
    LocalDPConfig,
    ModelConfig,
    PrivacyConfig,
    PrivacyMode,
    SitePolicy,
    TrainConfig,
    read_site_config,
)
from ctfed.common.exchange import (
    METRICS_KEY,
    POLICY_REFUSED_CODE,
    RoundInstructions,
    refusing_site,
)
from ctfed.common.model import ViTEncoder

from helpers import site_context, train_message  # tests/helpers.py


def _instructions(
    model: ModelConfig | None = None,
    train: TrainConfig | None = None,
    privacy: PrivacyConfig | None = None,
    **extra: Any,
) -> RoundInstructions:
    values = {"phase": "pretrain", "min_sites": 3, "secure_aggregation": False, "server_round": 1, **extra}
    return RoundInstructions(
        model=model or ModelConfig(), train=train or TrainConfig(local_steps=4), privacy=privacy or PrivacyConfig(), **values
    )


LOCAL_DP = PrivacyConfig(mode=PrivacyMode.local)
# The example of "any noise": it met require_dp before the policy had bounds.
CENTRAL_WEAK = PrivacyConfig(mode=PrivacyMode.central, central=CentralDPConfig(noise_multiplier=1e-9, clip_norm=1e9, delta=0.5))
LOCAL_WEAK = PrivacyConfig(mode=PrivacyMode.local, local=LocalDPConfig(noise_multiplier=0.1))

# (policy, instructions that break it, a phrase the refusal must contain)
RULES: list[tuple[SitePolicy, RoundInstructions, str]] = [
    (SitePolicy(allowed_phases=["finetune"]), _instructions(), "phase 'pretrain'"),
    (SitePolicy(require_secure_aggregation=True), _instructions(), "require_secure_aggregation"),
    (SitePolicy(min_sites=5), _instructions(), "as few as 3 sites"),
    (SitePolicy(require_dp=True, max_epsilon=8.0), _instructions(), "require_dp"),
    (SitePolicy(max_epsilon=3.0), _instructions(), "max_epsilon=3"),
    (SitePolicy(max_round_epsilon=1.0), _instructions(), "max_round_epsilon=1"),
    (SitePolicy(min_noise_multiplier=0.8), _instructions(privacy=CENTRAL_WEAK), "privacy.central.noise_multiplier=1e-09"),
    (SitePolicy(max_delta=1e-5), _instructions(privacy=CENTRAL_WEAK), "privacy.central.delta=0.5 exceeds"),
    (SitePolicy(min_noise_multiplier=0.8), _instructions(privacy=LOCAL_WEAK), "privacy.local.noise_multiplier=0.1"),
    (SitePolicy(max_local_steps=2), _instructions(), "train.local_steps x train.accumulation_steps=4 exceeds policy.max_local_steps=2"),
    # Micro-batches are work too: 2 steps of 3 accumulated micro-batches are 6.
    (SitePolicy(max_local_steps=4), _instructions(train=TrainConfig(local_steps=2, accumulation_steps=3)),
     "train.local_steps x train.accumulation_steps=6 exceeds policy.max_local_steps=4"),
    (SitePolicy(allowed_models=["small"]), _instructions(), "model 'tiny'"),
    (SitePolicy(max_hidden_size=24), _instructions(), "model.hidden_size=48"),
    (SitePolicy(max_layers=1), _instructions(), "model.num_layers=2"),
]


@pytest.mark.parametrize(("policy", "instructions", "phrase"), RULES, ids=[r[2].split()[0] for r in RULES])
def test_each_rule_refuses_a_violating_round(policy: SitePolicy, instructions: RoundInstructions, phrase: str) -> None:
    with pytest.raises(PolicyViolation, match="policy: ") as refused:
        check_instructions(policy, instructions, secure_path=False)
    assert phrase in str(refused.value)


def test_allowed_rounds_pass_and_all_reasons_are_listed() -> None:
    check_instructions(SitePolicy(), _instructions(), secure_path=False)
    strict = SitePolicy(
        require_secure_aggregation=False, min_sites=3, require_dp=True, max_epsilon=5.0, max_local_steps=4,
        allowed_models=["tiny"], max_hidden_size=48, max_layers=2, min_noise_multiplier=1.0, max_delta=1e-5,
    )
    check_instructions(strict, _instructions(privacy=LOCAL_DP), secure_path=False)
    check_instructions(
        SitePolicy(require_secure_aggregation=True), _instructions(secure_aggregation=True), secure_path=True
    )
    with pytest.raises(PolicyViolation) as refused:
        check_instructions(SitePolicy(max_local_steps=1, max_layers=1), _instructions(), secure_path=False)
    assert "max_local_steps" in str(refused.value) and "max_layers" in str(refused.value)


def _train_message(train: TrainConfig) -> Message:
    return train_message(_instructions(train=train), ViTEncoder(ModelConfig()).state_dict())


def test_client_app_refuses_before_reading_data(tmp_path: Path, flower_task_identity: None) -> None:
    state_dir = tmp_path / "state"
    missing_cache = tmp_path / "no-such-cache"
    context = site_context(missing_cache, state_dir, "hospital-a", policy=SitePolicy(max_local_steps=1), run_id=5)
    reply = client_train(_train_message(TrainConfig(local_steps=2)), context)
    assert reply.has_error()
    assert reply.error.code == POLICY_REFUSED_CODE
    assert "max_local_steps=1" in (reply.error.reason or "")
    assert refusing_site(reply.error.reason or "") == "hospital-a"
    assert not missing_cache.exists()
    entries = [json.loads(line) for line in (state_dir / AUDIT_FILE).read_text().splitlines()]
    assert [e["kind"] for e in entries] == [KIND_REFUSAL] and entries[0]["round"] == 1
    assert verify_audit_log(state_dir / AUDIT_FILE) == 1

    # The same round under a permissive policy gets as far as the (missing) data.
    write_policy_file(SitePolicy(), state_dir)
    with pytest.raises(FileNotFoundError, match="manifest"):
        client_train(_train_message(TrainConfig(local_steps=2)), context)


def test_policy_sources(tmp_path: Path) -> None:
    assert load_site_policy({}, {}, "x") == SitePolicy()
    table = tmp_path / "policies.json"
    table.write_text(json.dumps({"a": {"max_local_steps": 2}, "*": {"require_dp": True, "max_epsilon": 8}}))
    assert load_site_policy({}, {SITE_POLICIES_FILE_KEY: str(table)}, "a").max_local_steps == 2
    assert load_site_policy({}, {SITE_POLICIES_FILE_KEY: str(table)}, "b").require_dp
    table.write_text(json.dumps({"a": {"max_local_step": 2}}))
    with pytest.raises(ConfigError, match="max_local_step"):
        load_site_policy({}, {SITE_POLICIES_FILE_KEY: str(table)}, "a")
    with pytest.raises(ConfigError, match="not found"):
        load_site_policy({POLICY_FILE_KEY: str(tmp_path / "none.json")}, {}, "a")


def _site_yaml(tmp_path: Path, policy: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(
        "site_id: hospital-a\ndata_path: cache\nsuperlink: fl.example.org:8000\n"
        "ca_cert: ca.crt\nprivate_key: a.key\n" + policy
    )
    return path


def test_site_yaml_policy_is_validated_and_passed_to_the_supernode(tmp_path: Path) -> None:
    cfg = read_site_config(
        _site_yaml(tmp_path, "policy:\n  max_local_steps: 8\n  require_dp: true\n  min_noise_multiplier: 1\n")
    )
    assert cfg.policy.max_local_steps == 8 and cfg.policy.require_dp
    config = node_config(cfg)
    assert f'state-dir="{cfg.state_path}"' in config
    assert f'policy-file="{cfg.state_path / "policy.json"}"' in config
    with pytest.raises(ConfigError, match="allowed_phases"):
        read_site_config(_site_yaml(tmp_path, "policy:\n  allowed_phases: [train]\n"))
    with pytest.raises(ConfigError, match="max_epsilon"):
        read_site_config(_site_yaml(tmp_path, "policy:\n  max_epsilon: -1\n"))
    with pytest.raises(ConfigError, match="max_local_step"):
        read_site_config(_site_yaml(tmp_path, "policy:\n  max_local_step: 3\n"))
    # require_dp alone would be met by any noise at all.
    with pytest.raises(ConfigError, match="require_dp needs a bound"):
        read_site_config(_site_yaml(tmp_path, "policy:\n  require_dp: true\n"))
    with pytest.raises(ConfigError, match="max_delta"):
        read_site_config(_site_yaml(tmp_path, "policy:\n  max_delta: 1\n"))


def test_default_state_folder_is_visible_and_an_earlier_hidden_one_is_kept(tmp_path: Path) -> None:
    # The state folder holds the privacy ledger: hidden, it is easy to miss in a backup; moved
    # by an upgrade, the site would start a fresh budget.
    cfg = read_site_config(_site_yaml(tmp_path, ""))
    assert cfg.state_path == tmp_path / "ctfed-site-hospital-a"
    (tmp_path / ".ctfed-site-hospital-a").mkdir()
    assert cfg.state_path == tmp_path / ".ctfed-site-hospital-a"
    (tmp_path / "ctfed-site-hospital-a").mkdir()
    assert cfg.state_path == tmp_path / "ctfed-site-hospital-a"


def test_shipped_site_yaml_policy_is_the_permissive_default() -> None:
    from omegaconf import OmegaConf

    shipped = Path(__file__).parents[2] / "conf" / "site.yaml"
    assert SitePolicy(**OmegaConf.to_container(OmegaConf.load(shipped).policy)) == SitePolicy()  # type: ignore[arg-type]


def test_simulation_site_policies_config() -> None:
    from ctfed.simulations.config import load_simulation_config

    cfg = load_simulation_config(["simulation.site_policies=[{site:site_1,max_local_steps:1}]"])
    assert cfg.simulation.policy_for("site_1").max_local_steps == 1
    # A simulation's coordinator is the researcher's: its sites answer the monitor on the
    # plain path too; a named site's policy is a whole replacement, from SitePolicy's defaults.
    assert cfg.simulation.policy_for("site_0") == SitePolicy(share_monitor_on_plain_path=True)
    assert not cfg.simulation.policy_for("site_1").share_monitor_on_plain_path
    with pytest.raises(ConfigError, match="twice"):
        load_simulation_config(["simulation.site_policies=[{site:a},{site:a}]"])


def test_site_keeps_its_data_summary_when_its_policy_says_so(
    tmp_path: Path, flower_task_identity: None, one_site_cache: Path
) -> None:
    from ctfed.common.data_summary import DATA_PREFIX, SCANS_KEY

    state_dir = tmp_path / "state"
    context = site_context(one_site_cache, state_dir, "hospital-a", policy=SitePolicy(), run_id=5)
    # Two scans is a small cell: by default (min_reported_count 5) no count of this site leaves it.
    suppressed = client_train(_train_message(TrainConfig(local_steps=1)), context).content[METRICS_KEY]
    assert SCANS_KEY not in suppressed and not [key for key in suppressed if key.startswith(DATA_PREFIX + "positive-")]
    # Nor its ranges: with fewer scans than the floor each end would be one scan's value (#12, 10a).
    assert not [key for key in suppressed if key.startswith((DATA_PREFIX + "slices-", DATA_PREFIX + "spacing-"))]

    write_policy_file(SitePolicy(min_reported_count=0), state_dir)
    shared = client_train(_train_message(TrainConfig(local_steps=1)), context).content[METRICS_KEY]
    assert shared[SCANS_KEY] == 2
    assert DATA_PREFIX + "slices-min" in shared and DATA_PREFIX + "spacing-max-mm" in shared  # 0 sends all, exact

    write_policy_file(SitePolicy(share_data_summary=False), state_dir)
    kept = client_train(_train_message(TrainConfig(local_steps=1)), context).content[METRICS_KEY]
    assert "loss" in kept and not [key for key in kept if key.startswith(DATA_PREFIX)]
