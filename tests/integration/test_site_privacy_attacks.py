"""A malicious coordinator against the real site handlers (issue #12, points 5, 6, 7, 9, 13).

Each test hand-writes the messages an attacking coordinator would send to the site's real
ClientApp handlers (``client/app.py``'s ``train`` and the secure-aggregation stages) and
checks that the site refuses, or that what it sends is what the site's own rules allow.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from opacus.accountants import RDPAccountant

from ctfed.client import secagg as site_secagg
from ctfed.client.app import train as client_train
from ctfed.client.audit import AUDIT_FILE, KIND_REFUSAL, KIND_SECAGG_PREFIX, KIND_TRAIN_REPLY, verify_audit_log
from ctfed.client.ledger import CENTRAL_LEDGER_FILE, DISTRIBUTED_LEDGER_FILE, LEDGER_FILE, planned_distributed_entry
from ctfed.common import secagg as sa
from ctfed.common.config import (
    CentralDPConfig,
    ConfigError,
    DistributedDPConfig,
    LocalDPConfig,
    ModelConfig,
    PrivacyConfig,
    PrivacyMode,
    RunConfig,
    SecAggConfig,
    SitePolicy,
    TrainConfig,
)
from ctfed.common.data_summary import SCANS_KEY
from ctfed.common.dp import SKELLAM, LedgerEntry, PrivacyLedger, entries_epsilon
from ctfed.common.exchange import (
    ARRAYS_KEY,
    BUDGET_REFUSED_CODE,
    CLIP_SCALE_KEY,
    CONFIG_KEY,
    DATA_SECONDS_KEY,
    EPSILON_KEY,
    LOSS_FIRST_KEY,
    LOSS_KEY,
    LOSSES_KEY,
    METRICS_KEY,
    PEAK_RSS_KEY,
    POLICY_REFUSED_CODE,
    ROUND_SECONDS_KEY,
    SECURE_AGGREGATION_KEY,
    SERVER_ROUND_KEY,
    TRAIN_SECONDS_KEY,
    RoundInstructions,
    SiteReply,
    state_to_record,
)
from ctfed.common.model import ViTEncoder
from ctfed.common.preprocess import MANIFEST

from helpers import site_context, train_message  # tests/helpers.py

MODEL = ModelConfig()
ONE_STEP = TrainConfig(local_steps=1, batch_size=2, num_local_crops=1)
LOCAL_DP = PrivacyConfig(mode=PrivacyMode.local, local=LocalDPConfig(noise_multiplier=1.0))
SITE = "hospital-a"


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity: None) -> None:
    """Every message here is built outside a SuperNode (tests/conftest.py)."""


@pytest.fixture
def cache(one_site_cache: Path) -> Path:
    """A prepared site cache of two synthetic scans, one per study (read-only, shared)."""
    return one_site_cache


def _context(state_dir: Path, cache_dir: Path, policy: SitePolicy) -> Context:
    from ctfed.client.secagg import ROSTER_KEY, SIGNING_KEY_KEY
    from ctfed.common.certs import ensure_federation_signing_keys

    # A site that may join secure aggregation holds its signing key and the roster (#12, 1).
    roster, keys = ensure_federation_signing_keys(state_dir.parent / "secagg-keys", [SITE])
    return site_context(
        cache_dir, state_dir, SITE, policy=policy, run_id=5, **{SIGNING_KEY_KEY: str(keys[SITE]), ROSTER_KEY: str(roster)}
    )


def _instructions(
    privacy: PrivacyConfig | None = None, claims_secure: bool = False, server_round: int = 1,
    train: TrainConfig = ONE_STEP, **extra: Any,
) -> ConfigRecord:
    record = RoundInstructions(
        server_round=server_round, model=MODEL, train=train, privacy=privacy or PrivacyConfig(), min_sites=3,
        secure_aggregation=claims_secure,
    ).to_record()
    for key, value in extra.items():  # what an attacker adds to the record
        record[key] = value
    return record


def _global_encoder() -> dict[str, torch.Tensor]:
    """The same global encoder in every message (an attacker replaying one round)."""
    torch.manual_seed(0)
    return ViTEncoder(MODEL).state_dict()


def _plain(instructions: ConfigRecord) -> Message:
    """A plain ``train`` message: Flower routes it to the ClientApp's plain handler."""
    return train_message(instructions, _global_encoder())


def _secure_stage_a(instructions: ConfigRecord) -> tuple[Message, Any]:
    """Stage (a) of secure aggregation, and the site's real handler for it."""
    encoder = _global_encoder()
    params = ConfigRecord(
        {sa.P_ROUND: int(instructions[SERVER_ROUND_KEY]), sa.P_THRESHOLD: 2, sa.P_CLIPPING: 1.0,
         sa.P_QUANTIZATION: 2**20, sa.P_MODULUS_BITS: 64, sa.P_MAX_WEIGHT: 64, sa.P_MAX_NORM: 1e6}
    )
    content = RecordDict({ARRAYS_KEY: state_to_record(encoder), CONFIG_KEY: instructions, sa.PARAMS_KEY: params})
    kind = sa.message_type(sa.STAGE_TRAIN)
    return Message(content, dst_node_id=1, message_type=kind), site_secagg.stage_handlers(client_train)[kind]


def _audit(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / AUDIT_FILE
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert verify_audit_log(path) == len(entries)
    return entries


# -- point 5: "secure" is the protocol path, not a flag -------------------------------------


def test_plain_message_with_the_secure_flag_gets_no_clear_update(tmp_path: Path, cache: Path) -> None:
    state = tmp_path / "state"
    context = _context(state, cache, SitePolicy(require_secure_aggregation=True))

    # The attack: a plain train message whose instructions claim secure aggregation.
    reply = client_train(_plain(_instructions(claims_secure=True)), context)
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == POLICY_REFUSED_CODE
    assert "require_secure_aggregation" in reply.error.reason and "plain train path" in reply.error.reason
    (entry,) = _audit(state)
    assert entry["kind"] == KIND_REFUSAL and entry["parameters"] == []

    # The same round on the secure path: the site trains and keeps the update.
    message, stage_a = _secure_stage_a(_instructions(claims_secure=True))
    reply = stage_a(message, context)
    assert not reply.has_error()
    assert ARRAYS_KEY not in reply.content.array_records and sa.PROTOCOL_KEY in reply.content.config_records
    assert sa.DELTA_STATE_KEY in context.state
    held = _audit(state)[-1]
    assert held["kind"] == KIND_TRAIN_REPLY and "held for secure aggregation" in held["reason"]


def test_the_audit_records_a_clear_update_as_sent_in_clear(tmp_path: Path, cache: Path) -> None:
    state = tmp_path / "state"
    context = _context(state, cache, SitePolicy())
    # Even without the policy, a plain message claiming secure aggregation is a lie the site refuses.
    lied = client_train(_plain(_instructions(claims_secure=True)), context)
    assert lied.has_error() and f"{SECURE_AGGREGATION_KEY}=true" in lied.error.reason

    honest = client_train(_plain(_instructions(claims_secure=False)), context)
    assert ARRAYS_KEY in honest.content.array_records
    entries = _audit(state)
    assert [e["kind"] for e in entries] == [KIND_REFUSAL, KIND_TRAIN_REPLY]
    assert entries[1]["parameters"] and "sent in clear" in entries[1]["reason"]
    assert not any("held" in e["reason"] for e in entries)


# -- point 6: DP randomness from the CSPRNG, whatever the instructions ------------------------


def test_identical_dp_rounds_give_different_updates(tmp_path: Path, cache: Path) -> None:
    """Same seed, same site index, same global model and instructions: a coordinator that
    could reproduce the noise would get the same update twice."""
    updates = []
    for name in ("first", "again"):
        context = _context(tmp_path / name, cache, SitePolicy())
        reply = client_train(_plain(_instructions(LOCAL_DP)), context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        updates.append(reply.content[ARRAYS_KEY].to_torch_state_dict())
    difference = max(float((updates[0][k] - updates[1][k]).abs().max()) for k in updates[0])
    assert difference > 1e-6


def test_an_instruction_asking_for_seeded_dp_noise_is_refused(tmp_path: Path, cache: Path) -> None:
    state = tmp_path / "state"
    reply = client_train(
        _plain(_instructions(LOCAL_DP, **{"privacy.local.secure_rng": False})), _context(state, cache, SitePolicy())
    )
    assert reply.has_error() and reply.error.code == POLICY_REFUSED_CODE
    assert "secure_rng" in reply.error.reason
    assert _audit(state)[-1]["kind"] == KIND_REFUSAL


# -- point 7: require_dp is not met by any noise; the site computes epsilon itself -----------

# The issue's example: central DP whose noise is nothing, clip is everything, delta a coin flip.
NEGLIGIBLE = PrivacyConfig(
    mode=PrivacyMode.central, central=CentralDPConfig(noise_multiplier=1e-9, clip_norm=1e9, delta=0.5)
)


@pytest.mark.parametrize(
    ("policy", "code", "phrase"),
    [
        (SitePolicy(require_dp=True, min_noise_multiplier=0.5), POLICY_REFUSED_CODE, "privacy.central.noise_multiplier=1e-09"),
        (SitePolicy(require_dp=True, max_delta=1e-5, min_noise_multiplier=1e-12), POLICY_REFUSED_CODE, "privacy.central.delta=0.5"),
        (SitePolicy(require_dp=True, max_round_epsilon=2.0), BUDGET_REFUSED_CODE, "above policy.max_round_epsilon 2"),
        (SitePolicy(require_dp=True, max_epsilon=10.0), BUDGET_REFUSED_CODE, "exceeds max_epsilon 10"),
    ],
    ids=["noise-floor", "delta-cap", "round-epsilon", "total-epsilon"],
)
def test_negligible_central_noise_does_not_meet_require_dp(
    tmp_path: Path, cache: Path, policy: SitePolicy, code: int, phrase: str
) -> None:
    state = tmp_path / "state"
    reply = client_train(_plain(_instructions(NEGLIGIBLE)), _context(state, cache, policy))
    assert reply.has_error() and reply.error.code == code
    assert phrase in reply.error.reason
    assert not (state / CENTRAL_LEDGER_FILE).exists()  # a refused round spends nothing


def test_site_accounts_central_dp_itself_at_its_own_delta(tmp_path: Path, cache: Path) -> None:
    """Central rounds enter the site's own ledger (sample rate 1: the site cannot verify the
    coordinator's sampling), epsilon at the policy's delta whatever delta the round names,
    and the round that would pass the budget is refused."""
    central = PrivacyConfig(mode=PrivacyMode.central, central=CentralDPConfig(noise_multiplier=2.0, delta=0.5))
    def epsilon_after(rounds: int) -> float:
        accountant = RDPAccountant()
        accountant.history = [(2.0, 1.0, rounds)]
        return accountant.get_epsilon(1e-6)

    budget = (epsilon_after(2) + epsilon_after(3)) / 2  # two rounds fit, the third does not
    state = tmp_path / "state"
    context = _context(state, cache, SitePolicy(require_dp=True, max_epsilon=budget, delta=1e-6))
    for server_round in (1, 2):
        reply = client_train(_plain(_instructions(central, server_round=server_round)), context)
        # The coordinator keeps its own central ledger; the site's stays in its audit log.
        assert not reply.has_error() and EPSILON_KEY not in reply.content[METRICS_KEY]
    sent = [e["dp"] for e in _audit(state)]
    assert [d["epsilon_after"] for d in sent] == [
        pytest.approx(epsilon_after(1), rel=1e-9), pytest.approx(epsilon_after(2), rel=1e-9),
    ]
    refused = client_train(_plain(_instructions(central, server_round=3)), context)
    assert refused.has_error() and refused.error.code == BUDGET_REFUSED_CODE
    assert "central DP ledger" in refused.error.reason
    ledger = PrivacyLedger.load(state / CENTRAL_LEDGER_FILE)
    assert [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries] == [(2.0, 1.0, 1)] * 2
    assert sent[0]["epsilon_delta"] == 1e-6 and sent[0]["delta"] == 0.5


def test_under_dp_no_per_step_loss_or_clip_scale_leaves_the_site(tmp_path: Path, cache: Path) -> None:
    """Point 10, in part: a step's loss is a figure of the one or two volumes in its batch, and
    central DP's clip scale is clip_norm over the update's exact norm."""
    central = PrivacyConfig(mode=PrivacyMode.central, central=CentralDPConfig(noise_multiplier=1.0, clip_norm=1e-6))
    state = tmp_path / "state"
    train = TrainConfig(local_steps=2, batch_size=2, num_local_crops=1)
    instructions = RoundInstructions(server_round=1, model=MODEL, train=train, privacy=central, min_sites=3).to_record()
    reply = client_train(_plain(instructions), _context(state, cache, SitePolicy()))
    sent = reply.content[METRICS_KEY]
    assert LOSSES_KEY not in sent and LOSS_FIRST_KEY not in sent and CLIP_SCALE_KEY not in sent
    assert LOSS_KEY in sent  # the round's mean over its steps
    (entry,) = _audit(state)
    assert 0 < entry["dp"]["clip_scale"] < 1  # the site still knows, in its own log


def _labelled_cache(root: Path) -> Path:
    """A tiny labelled cache (3 positive, 3 negative scans for "any"), one study per scan."""
    import numpy as np

    root.mkdir()
    series = []
    for index, label in enumerate([0, 1, 0, 1, 1, 0]):
        np.save(root / f"s{index}.npy", np.random.default_rng(index).random((3, 32, 32, 32)).astype(np.float16))
        series.append({"key": f"s{index}", "study_key": f"t{index}", "file": f"s{index}.npy", "label": {"any": label}})
    (root / MANIFEST).write_text(json.dumps({"series": series}))
    return root


def test_phase_two_central_rounds_are_accounted_and_budgeted(tmp_path: Path) -> None:
    from ctfed.common.checkpoint import state_digest
    from ctfed.common.config import FinetuneConfig
    from ctfed.common.exchange import FINETUNE_PHASE
    from ctfed.common.finetune import FederatedFreezingSchedule, build_classifier

    tiny = ModelConfig(name="tiny", image_size=32, patch_size=8, hidden_size=48, num_layers=4, num_heads=3, mlp_dim=96)
    finetune = FinetuneConfig(label_names=["any"], batch_size=2, eval_n_boot=5)
    plan = FederatedFreezingSchedule(finetune, tiny.num_layers, rounds=3, local_steps=1).plan(1)
    state = build_classifier(tiny, 1, seed=0).state_dict()
    central = PrivacyConfig(mode=PrivacyMode.central, central=CentralDPConfig(noise_multiplier=1.0))
    config = RoundInstructions(
        server_round=1, model=tiny, train=TrainConfig(), privacy=central, phase=FINETUNE_PHASE, finetune=finetune,
        plan=plan, plan_local_steps=1, full_state=True, base_sha256=state_digest(state),
    ).to_record()
    message = lambda: Message(  # noqa: E731
        RecordDict({ARRAYS_KEY: state_to_record(state), CONFIG_KEY: config}), dst_node_id=1, message_type="train"
    )
    cache_dir = _labelled_cache(tmp_path / "cache")
    state_dir = tmp_path / "state"
    reply = client_train(message(), _context(state_dir, cache_dir, SitePolicy(require_dp=True, max_epsilon=50.0)))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    (entry,) = PrivacyLedger.load(state_dir / CENTRAL_LEDGER_FILE).entries
    assert (entry.noise_multiplier, entry.sample_rate, entry.steps) == (1.0, 1.0, 1)
    # One round at noise multiplier 1 is already above a budget of 1.
    refused = client_train(message(), _context(tmp_path / "strict", cache_dir, SitePolicy(require_dp=True, max_epsilon=1.0)))
    assert refused.has_error() and refused.error.code == BUDGET_REFUSED_CODE


# -- point 9: the privacy unit under local DP ------------------------------------------------


def _cache_copy(cache: Path, target: Path, **shared: str) -> Path:
    """The cache with both volumes given the same value of each ``shared`` field."""
    shutil.copytree(cache, target)
    manifest = json.loads((target / MANIFEST).read_text())
    for entry in manifest["series"]:
        entry.update(shared)
    (target / MANIFEST).write_text(json.dumps(manifest))
    return target


@pytest.mark.parametrize(
    ("shared", "phrase"),
    [
        ({"study_key": "0123456789abcdef"}, "1 study pseudonyms have more than one volume"),
        ({"patient_key": "fedcba9876543210"}, "1 patient pseudonyms have more than one volume"),
    ],
    ids=["two-series-of-one-study", "two-studies-of-one-patient"],
)
def test_local_dp_refuses_two_volumes_of_one_person(tmp_path: Path, cache: Path, shared: dict, phrase: str) -> None:
    two_of_one = _cache_copy(cache, tmp_path / "cache", **shared)
    if "patient_key" in shared:  # distinct studies, one patient
        manifest = json.loads((two_of_one / MANIFEST).read_text())
        assert len({e["study_key"] for e in manifest["series"]}) == 2
    state = tmp_path / "state"
    context = _context(state, two_of_one, SitePolicy())
    reply = client_train(_plain(_instructions(LOCAL_DP)), context)
    assert reply.has_error() and reply.error.code == POLICY_REFUSED_CODE
    assert phrase in reply.error.reason and "up to 2x the epsilon" in reply.error.reason
    assert next(iter(shared.values())) not in reply.error.reason  # counts, never a pseudonym
    assert not (state / "privacy_ledger.json").exists()
    # Without local DP the same cache trains: the unit matters only to DP-SGD's epsilon.
    assert not client_train(_plain(_instructions()), context).has_error()


@pytest.mark.parametrize("shared", [{"study_key": "0123456789abcdef"}, {"patient_key": "fedcba9876543210"}], ids=["study", "patient"])
def test_a_site_may_train_local_dp_on_one_volume_per_person_instead(
    tmp_path: Path, cache: Path, shared: dict, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """``policy.local_dp_repeat_volumes: one_per_person``: the round trains on one volume of the
    person, and the site's own accounting counts that one volume (the coordinator cannot ask
    for it: the rule is the site's policy, not an instruction)."""
    from ctfed.client.ledger import local_sample_rate

    two_of_one = _cache_copy(cache, tmp_path / "cache", **shared)
    state = tmp_path / "state"
    policy = SitePolicy(local_dp_repeat_volumes="one_per_person")
    with caplog.at_level(logging.WARNING, logger="ctfed.client.privacy_round"):
        reply = client_train(_plain(_instructions(LOCAL_DP)), _context(state, two_of_one, policy))
    assert not reply.has_error(), reply.error.reason
    assert "local DP trains on 1 of 2 cached volumes, one per person" in caplog.text + capsys.readouterr().out
    (entry,) = PrivacyLedger.load(state / LEDGER_FILE).entries
    assert entry.sample_rate == local_sample_rate(ONE_STEP.batch_size, 1)  # one volume, not two
    # The default policy still refuses, and says how to opt in.
    refused = client_train(_plain(_instructions(LOCAL_DP)), _context(tmp_path / "strict", two_of_one, SitePolicy()))
    assert refused.has_error() and "policy.local_dp_repeat_volumes: one_per_person" in refused.error.reason


def _cache_of(cache: Path, target: Path, copies: int) -> Path:
    """``copies`` x the cache's volumes, each its own study and patient (one volume per person)."""
    shutil.copytree(cache, target)
    manifest = json.loads((target / MANIFEST).read_text())
    series = []
    for copy in range(copies):
        for index, entry in enumerate(manifest["series"]):
            series.append({**entry, "key": f"{entry['key']}-{copy}", "study_key": f"{copy:08x}{index:08x}",
                           "patient_key": f"{index:08x}{copy:08x}", "content_hash": f"{copy}-{entry.get('content_hash', index)}"})
    manifest["series"] = series
    (target / MANIFEST).write_text(json.dumps(manifest))
    return target


@pytest.mark.parametrize(
    ("copies", "policy"),
    [(1, SitePolicy()), (3, SitePolicy(share_data_summary=False))],
    ids=["count-below-the-floor", "no-data-summary"],
)
def test_local_dp_epsilon_does_not_give_away_a_volume_count_the_site_withholds(
    tmp_path: Path, cache: Path, copies: int, policy: SitePolicy, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Point 10: under local DP the sample rate is batch_size / volumes, so the site's epsilon
    (or a budget refusal quoting it, or the rate itself) tells the coordinator how many volumes
    the site has. A site that does not send its count (below policy.min_reported_count, or
    share_data_summary off) keeps the epsilon in its ledger and audit log, and a refusal sent
    for its budget carries no figure. A site that sends its count sends its epsilon too."""
    volumes = _cache_of(cache, tmp_path / "cache", copies)
    state = tmp_path / "state"
    reply = client_train(_plain(_instructions(LOCAL_DP)), _context(state, volumes, policy))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    sent = reply.content[METRICS_KEY]
    assert EPSILON_KEY not in sent and SCANS_KEY not in sent
    # Nor the timings and peak memory: the Poisson-sampled work grows with the volume count.
    assert not {TRAIN_SECONDS_KEY, DATA_SECONDS_KEY, ROUND_SECONDS_KEY, PEAK_RSS_KEY} & set(sent)
    (entry,) = PrivacyLedger.load(state / LEDGER_FILE).entries  # spent and counted at the site
    assert entry.sample_rate == ONE_STEP.batch_size / (2 * copies)
    assert _audit(state)[-1]["dp"]["epsilon_after"] > 0

    # A budget the round cannot meet: the refusal says which knob, not the figures.
    strict = replace(policy, require_dp=True, max_round_epsilon=1e-3)
    with caplog.at_level(logging.WARNING, logger="ctfed.client.app"):
        refused = client_train(_plain(_instructions(LOCAL_DP)), _context(tmp_path / "strict", volumes, strict))
    assert refused.has_error() and refused.error.code == BUDGET_REFUSED_CODE
    assert "policy.max_round_epsilon" in refused.error.reason
    assert "sample rate" not in refused.error.reason and not any(c.isdigit() for c in refused.error.reason)
    assert "sample rate" in caplog.text + capsys.readouterr().out  # the site's own log has them
    assert "sample rate" not in json.dumps(_audit(tmp_path / "strict"))

    # The same volumes at a site that shares its count: the epsilon goes with it.
    shared = _cache_of(cache, tmp_path / "shared-cache", 3)
    open_state = tmp_path / "open"
    reply = client_train(_plain(_instructions(LOCAL_DP)), _context(open_state, shared, SitePolicy()))
    sent = reply.content[METRICS_KEY]
    assert sent[SCANS_KEY] == 6 and sent[TRAIN_SECONDS_KEY] > 0
    assert sent[EPSILON_KEY] == pytest.approx(PrivacyLedger.load(open_state / LEDGER_FILE).epsilon(SitePolicy().delta))


def test_a_coordinator_probing_the_budget_learns_the_volume_count_unless_the_site_accounts_with_its_own(
    tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Point 10: the accept-or-refuse answer is an oracle. Two sites that withhold their counts
    (6 and 12 volumes), with the same budget for one round. The coordinator sends local-DP
    rounds at batch sizes 1, 2 and 4 and watches which the budget refuses: with the real
    counts in the accounting (sample rate batch / volumes) the two sites answer differently,
    which bounds each count. With ``policy.local_dp_accounted_volumes: 6`` at both, every
    answer, and every epsilon the replies carry, is a function of that 6 and the instructions
    alone: the two sites cannot be told apart."""
    counts = {"six": 3, "twelve": 6}  # copies of the 2-scan cache
    caches = {name: _cache_of(cache, tmp_path / f"cache-{name}", copies) for name, copies in counts.items()}
    delta = SitePolicy().delta
    # A round-alone budget between the epsilons at sample rates 1/6 and 1/3.
    budget = entries_epsilon([_local_entry(2 / 9)], delta)

    def probe(policy: SitePolicy) -> dict[str, list[tuple[str, float | None]]]:
        answers: dict[str, list[tuple[str, float | None]]] = {}
        for name, volumes in caches.items():
            answers[name] = []
            for batch in (1, 2, 4):
                state = tmp_path / f"{policy.local_dp_accounted_volumes}-{name}-{batch}"
                reply = client_train(
                    _plain(_instructions(LOCAL_DP, train=replace(ONE_STEP, batch_size=batch))), _context(state, volumes, policy)
                )
                if reply.has_error():
                    assert reply.error.code == BUDGET_REFUSED_CODE, reply.error.reason
                    answers[name].append(("refused", None))
                else:
                    answers[name].append(("trained", reply.content[METRICS_KEY].get(EPSILON_KEY)))
        return answers

    withheld = SitePolicy(share_data_summary=False, require_dp=True, max_round_epsilon=budget)
    real = probe(withheld)
    # The oracle: at batch 2 the 6-volume site refuses (rate 1/3) and the 12-volume one trains (1/6).
    assert [a for a, _ in real["six"]] == ["trained", "refused", "refused"]
    assert [a for a, _ in real["twelve"]] == ["trained", "trained", "refused"]
    assert all(epsilon is None for answers in real.values() for _, epsilon in answers)  # epsilon withheld

    accounted = probe(replace(withheld, local_dp_accounted_volumes=6))
    assert accounted["six"] == accounted["twelve"]
    assert [a for a, _ in accounted["six"]] == ["trained", "refused", "refused"]
    # The epsilon now travels: the accounted one, an upper bound on the 12-volume site's true one.
    (_, sent), *_ = accounted["twelve"]
    assert sent == pytest.approx(entries_epsilon([_local_entry(1 / 6)], delta))
    assert sent > entries_epsilon([_local_entry(1 / 12)], delta)
    (entry,) = PrivacyLedger.load(tmp_path / "6-twelve-1" / LEDGER_FILE).entries
    assert entry.sample_rate == pytest.approx(1 / 6)

    # Fewer volumes than the site accounts with would understate its epsilon: refused, and the
    # coordinator is not told the count.
    with caplog.at_level(logging.WARNING):
        short = client_train(_plain(_instructions(LOCAL_DP)),
                             _context(tmp_path / "short", caches["six"], replace(withheld, local_dp_accounted_volumes=7)))
    assert short.has_error() and short.error.code == POLICY_REFUSED_CODE
    assert "policy.local_dp_accounted_volumes" in short.error.reason and not any(c.isdigit() for c in short.error.reason)
    assert "fewer than policy.local_dp_accounted_volumes 7" in caplog.text + capsys.readouterr().out


def _local_entry(sample_rate: float) -> LedgerEntry:
    return LedgerEntry(round=1, noise_multiplier=LOCAL_DP.local.noise_multiplier, sample_rate=sample_rate, steps=ONE_STEP.local_steps)


def test_one_volume_per_person_keeps_the_first_by_content_hash_and_never_two_of_a_study() -> None:
    from ctfed.client.privacy_unit import check_one_volume_per_person, one_volume_per_person

    entries = [
        {"content_hash": "c", "patient_key": "p1", "study_key": "s1"},
        {"content_hash": "a", "patient_key": "p1", "study_key": "s2"},  # p1's first by content hash
        {"content_hash": "b", "study_key": "s3"},  # no PatientID: its study is its unit
        {"content_hash": "d", "study_key": "s3"},
        {"content_hash": "e", "patient_key": "p2", "study_key": "s4"},
        {"content_hash": "f"},  # nobody's: never chosen
    ]
    assert one_volume_per_person(entries) == [1, 2, 4]
    check_one_volume_per_person([entries[i] for i in one_volume_per_person(entries)])
    # A person's choice depends on that person's volumes only: adding someone changes nothing else.
    more = entries + [{"content_hash": "0", "patient_key": "p3", "study_key": "s5"}]
    assert one_volume_per_person(more) == [1, 2, 4, 6]


def test_two_studies_of_one_patient_prepared_for_real_are_refused_under_local_dp(
    tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Point 9 through the real ``prepare``: a patient with two studies is one person."""
    import logging

    import pydicom

    from ctfed.common.config import load_run_config
    from ctfed.common.preprocess import prepare

    (site_dicom,) = [p for p in (cache.parent / "dicom").iterdir() if p.is_dir()]  # the fixture's DICOM
    dicom = tmp_path / "dicom"
    shutil.copytree(site_dicom, dicom)
    files = sorted(p for p in dicom.rglob("*") if p.is_file() and p.name != "labels.csv")
    patient_id, study_of = "ZZPID98765", {}
    for path in files:
        ds = pydicom.dcmread(path)
        study_of[path] = str(ds.StudyInstanceUID)
        ds.PatientID = patient_id  # both studies: one patient
        ds.save_as(path)
    out = tmp_path / "cache"
    preprocess = load_run_config().preprocess
    prepare(dicom, out, preprocess, progress=False)
    entries = json.loads((out / MANIFEST).read_text())["series"]
    assert len(entries) == len({e["study_key"] for e in entries}) == 2  # two studies
    assert len({e["patient_key"] for e in entries}) == 1  # of one patient
    for path in (p for p in out.rglob("*") if p.is_file()):  # the PatientID is never written in clear
        assert patient_id.encode() not in path.read_bytes(), path.name

    state = tmp_path / "state"
    reply = client_train(_plain(_instructions(LOCAL_DP)), _context(state, out, SitePolicy()))
    assert reply.has_error() and reply.error.code == POLICY_REFUSED_CODE
    assert "1 patient pseudonyms have more than one volume" in reply.error.reason
    assert entries[0]["patient_key"] not in reply.error.reason and patient_id not in reply.error.reason
    assert patient_id not in (state / AUDIT_FILE).read_text()

    # A cache from before patient pseudonyms gets them on the next prepare, without reprocessing.
    manifest = json.loads((out / MANIFEST).read_text())
    for entry in manifest["series"]:
        del entry["patient_key"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert prepare(dicom, out, preprocess, progress=False).cached == 2
    assert len({e.get("patient_key") for e in json.loads((out / MANIFEST).read_text())["series"]}) == 1

    # A study without a PatientID gets no patient key; its study is then its unit (and logged).
    from ctfed.common.dicom import study_key
    from ctfed.common.privacy import site_secret

    (first_study,) = {uid for uid in study_of.values() if study_key(site_secret(out), uid) == entries[0]["study_key"]}
    for path in (p for p in files if study_of[p] == first_study):
        ds = pydicom.dcmread(path)
        ds.PatientID = ""
        ds.save_as(path)
    prepare(dicom, out, preprocess, progress=False)
    entries = json.loads((out / MANIFEST).read_text())["series"]
    assert sorted(bool(e.get("patient_key")) for e in entries) == [False, True]
    with caplog.at_level(logging.WARNING, logger="ctfed.client.privacy_round"):
        assert not client_train(_plain(_instructions(LOCAL_DP)), _context(tmp_path / "state2", out, SitePolicy())).has_error()
    # (the ClientApp's console logging may take the record before caplog does)
    assert "1 of 2 cached volumes have no patient pseudonym" in caplog.text + capsys.readouterr().out


# -- point 13: the share stages record whose shares went where ------------------------------


def _fake_local_train(msg: Message, context: Context) -> Message:
    node = msg.metadata.dst_node_id
    delta = {"w": torch.full((4,), 0.01 * node)}
    content = RecordDict({ARRAYS_KEY: state_to_record(delta), **SiteReply(f"s{node}", num_examples=2, loss=1.0).to_records()})
    return Message(content=content, reply_to=msg)


def test_share_stages_audit_the_node_ids_of_every_share_list(tmp_path: Path) -> None:
    from ctfed.server.secagg import secure_round
    from ctfed.simulations.runtime.inprocess import InProcessGrid

    nodes = [11, 12, 13]
    handlers = site_secagg.stage_handlers(_fake_local_train)
    # The stages as the ClientApp registers them: each reply audited (client/secagg.py).
    audited = {
        sa.message_type(stage): site_secagg._audited(stage, handlers[sa.message_type(stage)])
        for stage in sa.STAGES if stage != sa.STAGE_TRAIN
    }
    handlers.update(audited)
    contexts = {
        node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                      node_config={"data-path": str(tmp_path / "no-cache"), "site-id": f"s{node}",
                                   "state-dir": str(tmp_path / f"s{node}")})
        for node in nodes
    }
    grid = InProcessGrid(handlers, nodes, contexts=contexts)
    cfg = RunConfig()
    cfg.secagg = SecAggConfig(num_shares=3)  # automatic threshold: 3 of 3, above the sites' 2/3 floor
    cfg.federation.min_sites = 2
    like = {"w": torch.zeros(4)}
    messages = [
        train_message(ConfigRecord({SERVER_ROUND_KEY: 1}), like, node_id=n) for n in nodes
    ]
    result = secure_round(grid, messages, like, cfg, server_round=1)
    assert result.mean_delta is not None, result.reason
    assert torch.allclose(result.mean_delta["w"], torch.full((4,), 0.12), atol=1e-6)
    for node in nodes:
        others = sorted(set(nodes) - {node})
        entries = {e["kind"]: e for e in _audit(tmp_path / f"s{node}")}
        shares = {stage: entries[f"{KIND_SECAGG_PREFIX}{stage}"]["shares"] for stage in sa.STAGES if stage != sa.STAGE_TRAIN}
        assert shares[sa.STAGE_SHARE_KEYS] == {"neighbours": nodes, "shares_sent_to": others}
        assert shares[sa.STAGE_MASKED_INPUT] == {"shares_received_from": others}
        assert shares[sa.STAGE_CONSISTENCY] == {"survivors_signed": nodes}
        assert shares[sa.STAGE_UNMASK] == {
            "signed_by": nodes, "seed_shares_revealed_for": nodes, "sk1_shares_revealed_for": [],
        }


# -- point 8: distributed DP, accounted by the site for the honest sites it counts on ---------

def _distributed(noise_multiplier: float) -> PrivacyConfig:
    return PrivacyConfig(mode=PrivacyMode.distributed, distributed=DistributedDPConfig(noise_multiplier=noise_multiplier))


def test_distributed_dp_on_the_plain_path_is_refused(tmp_path: Path, cache: Path) -> None:
    """Its noise is added under the masks: a plain reply would be the clipped update in clear."""
    state = tmp_path / "state"
    reply = client_train(_plain(_instructions(_distributed(1.0))), _context(state, cache, SitePolicy()))
    assert reply.has_error() and reply.error.code == POLICY_REFUSED_CODE
    assert "privacy.mode=distributed" in reply.error.reason and "plain train path" in reply.error.reason
    assert not (state / DISTRIBUTED_LEDGER_FILE).exists()


def test_the_site_counts_only_the_honest_sites_its_own_policy_names(tmp_path: Path, cache: Path) -> None:
    """A coordinator that splits the noise over many sites (each adds little) cannot make a site
    count on them: its epsilon is for its own noise, or for policy.distributed_dp_honest_sites
    sites' noise; no instruction can name that number."""
    per_site = 0.4  # what a coordinator asks of each of, say, 25 sites for a multiplier of 2 on their sum
    alone = entries_epsilon([planned_distributed_entry(DistributedDPConfig(noise_multiplier=per_site), 1, 1)], 1e-5)
    three = entries_epsilon([planned_distributed_entry(DistributedDPConfig(noise_multiplier=per_site), 3, 1)], 1e-5)
    assert three < 0.6 * alone
    budget = (alone + three) / 2  # enough for the noise of 3 sites, not for one's

    message, stage_a = _secure_stage_a(_instructions(_distributed(per_site)))
    state = tmp_path / "alone"
    reply = stage_a(message, _context(state, cache, SitePolicy(require_dp=True, max_round_epsilon=budget)))
    assert reply.has_error() and reply.error.code == BUDGET_REFUSED_CODE and "distributed DP" in reply.error.reason
    # Naming the count in the instructions is an unknown key: refused, not believed.
    forged = _instructions(_distributed(per_site), **{"privacy.distributed.honest_sites": 25})
    message, stage_a = _secure_stage_a(forged)
    reply = stage_a(message, _context(tmp_path / "forged", cache, SitePolicy(require_dp=True, max_round_epsilon=budget)))
    assert reply.has_error() and reply.error.code == POLICY_REFUSED_CODE and "honest_sites" in reply.error.reason

    # A site whose hospital counts on 3 honest sites (of at least 3 in every sum) accepts, and says so.
    state = tmp_path / "trusting"
    policy = SitePolicy(require_dp=True, max_round_epsilon=budget, min_sites=3, distributed_dp_honest_sites=3)
    message, stage_a = _secure_stage_a(_instructions(_distributed(per_site)))
    context = _context(state, cache, policy)
    reply = stage_a(message, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert sa.DELTA_STATE_KEY in context.state  # held for the masks; its noise with it
    held = context.state[sa.STATE_KEY]
    assert held[f"noise-{sa.NOISE_MULTIPLIER}"] == per_site and held[f"noise-{sa.NOISE_GRANULARITY}"] == 2**20
    ledger = PrivacyLedger.load(state / DISTRIBUTED_LEDGER_FILE)
    (entry,) = ledger.entries
    assert entry.mechanism == SKELLAM and entry.noise_multiplier == pytest.approx(per_site * 3**0.5)
    dp = _audit(state)[-1]["dp"]
    assert dp["honest_sites_counted"] == 3 and dp["epsilon_after"] == pytest.approx(three, rel=1e-9)
    assert reply.content[METRICS_KEY][EPSILON_KEY] == pytest.approx(three, rel=1e-9)  # the site's own number


def test_distributed_dp_honest_sites_cannot_exceed_min_sites() -> None:
    with pytest.raises(ConfigError, match="distributed_dp_honest_sites"):
        SitePolicy(min_sites=2, distributed_dp_honest_sites=3)


def test_a_site_that_requires_its_own_noise_refuses_central_dp(tmp_path: Path, cache: Path) -> None:
    """Central DP's noise is the coordinator's promise; a site may accept only noise it adds."""
    policy = SitePolicy(require_dp=True, min_noise_multiplier=0.5, require_site_noise=True)
    central = PrivacyConfig(mode=PrivacyMode.central, central=CentralDPConfig(noise_multiplier=2.0))
    reply = client_train(_plain(_instructions(central)), _context(tmp_path / "state", cache, policy))
    assert reply.has_error() and reply.error.code == POLICY_REFUSED_CODE and "require_site_noise" in reply.error.reason
    message, stage_a = _secure_stage_a(_instructions(_distributed(1.0)))
    assert not stage_a(message, _context(tmp_path / "secure", cache, policy)).has_error()
