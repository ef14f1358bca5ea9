"""A site's local training state outlives a Flower run (issue #14 point 3): the real ``train``
ClientApp handler writes it under the coordinator's federation id and loads it in a fresh
Context (a resumed federation), and a hostile id cannot steer it out of the state folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context

from ctfed.client.app import train as client_train
from ctfed.client.local_state import (
    KEPT_FEDERATIONS,
    LOCAL_STATE_DIR,
    load_local_state,
    save_local_state,
    saved_rounds,
    state_file,
)
from ctfed.client.train import (
    CENTER_KEY,
    IBOT_CENTER_KEY,
    OPTIMIZER_PREFIX,
    TEACHER_PREFIX,
    LocalTrainer,
)
from ctfed.common.config import ConfigError, ModelConfig, SitePolicy, TrainConfig, load_run_config
from ctfed.common.exchange import (
    FEDERATION_ID_KEY,
    LOCAL_STATE_KEY,
    POLICY_REFUSED_CODE,
    RoundInstructions,
    new_federation_id,
)
from ctfed.common.model import ViTEncoder
from ctfed.server.results import RESULTS_NAME, ResumeError, RunRecorder

from helpers import read_results, site_context, train_message  # tests/helpers.py

MODEL = ModelConfig()
ONE_STEP = TrainConfig(local_steps=1, batch_size=2, num_local_crops=1)
SITE = "hospital-a"
FEDERATION = "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity: None) -> None:
    """Every message here is built outside a SuperNode (tests/conftest.py)."""


def _context(cache: Path, state_dir: Path) -> Context:
    """A fresh Context: what a SuperNode hands the ClientApp in a new Flower run."""
    return site_context(cache, state_dir, SITE, policy=SitePolicy())


def _round(context: Context, server_round: int, federation_id: str = FEDERATION) -> Any:
    torch.manual_seed(server_round)  # another global encoder every round
    encoder = ViTEncoder(MODEL).state_dict()
    instructions = RoundInstructions(server_round=server_round, model=MODEL, train=ONE_STEP, federation_id=federation_id)
    return client_train(train_message(instructions, encoder), context)


@pytest.fixture
def site_log() -> Any:
    """The messages client/local_state.py logs (``ctfed`` does not propagate to pytest's caplog)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger, handler = logging.getLogger("ctfed.client.local_state"), Collect(logging.INFO)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """The trainer's local state right after each ``LocalTrainer.load_local_state`` (the real one)."""
    seen: list[dict[str, torch.Tensor]] = []
    real = LocalTrainer.load_local_state

    def spy(self: LocalTrainer, state: Any) -> None:
        real(self, state)
        seen.append(self.local_state())

    monkeypatch.setattr(LocalTrainer, "load_local_state", spy)
    return seen


def test_a_fresh_context_continues_from_the_state_saved_after_the_round_before(
    tmp_path: Path, one_site_cache: Path, loaded: list[dict[str, torch.Tensor]], site_log: list[str]
) -> None:
    state_dir = tmp_path / "state"
    first = _context(one_site_cache, state_dir)
    assert not _round(first, 1).has_error()
    saved = first.state[LOCAL_STATE_KEY].to_torch_state_dict()
    assert state_file(state_dir, FEDERATION, 1).is_file()
    # What must come back: teacher, both centres, AdamW moments (and the head).
    assert any(k.startswith(TEACHER_PREFIX) for k in saved) and any(k.startswith(OPTIMIZER_PREFIX) for k in saved)
    assert saved[CENTER_KEY].abs().sum() > 0 and saved[IBOT_CENTER_KEY].abs().sum() > 0

    resumed = _context(one_site_cache, state_dir)  # the resumed federation: a new Flower run
    assert not _round(resumed, 2).has_error()
    assert len(loaded) == 1, "the fresh context did not load the saved state"
    (restored,) = loaded
    assert set(restored) == set(saved)
    assert all(torch.equal(restored[k], saved[k]) for k in saved)
    assert "resumed its local training state of round 1 of federation 01234567" in "\n".join(site_log)
    # Written again after round 2; round 1's is kept too (a coordinator may resume from it).
    assert saved_rounds(state_dir, FEDERATION) == [1, 2]


@pytest.mark.parametrize(
    ("federation_id", "server_round", "logged"),
    [
        ("f" * 32, 2, "no local training state of round 1 of federation ffffffff on disk (it holds none of it)"),
        (FEDERATION, 3, "no local training state of round 2 of federation 01234567 on disk (it holds rounds [1] of it)"),
    ],
    ids=["another-federation", "not-the-round-before"],
)
def test_a_state_of_another_federation_or_round_is_not_loaded_and_the_reason_logged(
    tmp_path: Path, one_site_cache: Path, loaded: list[dict[str, torch.Tensor]], site_log: list[str],
    federation_id: str, server_round: int, logged: str,
) -> None:
    state_dir = tmp_path / "state"
    assert not _round(_context(one_site_cache, state_dir), 1).has_error()
    assert not _round(_context(one_site_cache, state_dir), server_round, federation_id).has_error()
    assert loaded == []
    assert logged in "\n".join(site_log)


def test_in_one_flower_run_the_memory_copy_is_used_and_the_disk_holds_two_rounds(
    tmp_path: Path, one_site_cache: Path
) -> None:
    state_dir = tmp_path / "state"
    context = _context(one_site_cache, state_dir)
    for server_round in (1, 2, 3):
        assert not _round(context, server_round).has_error()
    assert saved_rounds(state_dir, FEDERATION) == [2, 3]
    assert sorted(p.name for p in (state_dir / LOCAL_STATE_DIR / FEDERATION).iterdir()) == ["round_0002.pt", "round_0003.pt"]


def test_without_a_federation_id_nothing_is_written(tmp_path: Path, one_site_cache: Path) -> None:
    state_dir = tmp_path / "state"
    assert not _round(_context(one_site_cache, state_dir), 1, federation_id="").has_error()
    assert not (state_dir / LOCAL_STATE_DIR).exists()


# -- a hostile coordinator ----------------------------------------------------------------

# ABSOLUTE stands for an absolute path outside the state folder (made under the test's tmp_path).
ABSOLUTE = "<absolute>"
HOSTILE_IDS = ["../../x", "../" + "0" * 29, ABSOLUTE, "a" * 33, "a" * 4096, "A" * 32, "0" * 31 + "/", ""]


def _files(root: Path) -> set[Path]:
    return {Path(d, f) for d, _, files in os.walk(root) for f in files}


@pytest.mark.parametrize("hostile", HOSTILE_IDS[:-1], ids=["traversal", "traversal-32", "absolute", "33-hex", "long", "upper", "slash"])
def test_a_hostile_federation_id_is_refused_and_writes_nothing_outside_the_state_folder(
    tmp_path: Path, one_site_cache: Path, hostile: str
) -> None:
    state_dir = tmp_path / "deep" / "state"
    context = _context(one_site_cache, state_dir)
    record = RoundInstructions(server_round=2, model=MODEL, train=ONE_STEP).to_record()
    outside = tmp_path / "outside"
    record[FEDERATION_ID_KEY] = str(outside) if hostile == ABSOLUTE else hostile  # what the attacker writes
    before = _files(tmp_path)
    torch.manual_seed(0)
    reply = client_train(train_message(record, ViTEncoder(MODEL).state_dict()), context)

    assert reply.has_error() and reply.error.code == POLICY_REFUSED_CODE
    assert f"'{FEDERATION_ID_KEY}'" in reply.error.reason and "32 lowercase hex digits" in reply.error.reason
    new = _files(tmp_path) - before
    assert all(path.is_relative_to(state_dir) for path in new), sorted(new)
    assert not (state_dir / LOCAL_STATE_DIR).exists()
    assert not outside.exists()
    assert LOCAL_STATE_KEY not in context.state


@pytest.mark.parametrize("hostile", HOSTILE_IDS)
def test_the_site_module_itself_refuses_a_hostile_id(tmp_path: Path, hostile: str) -> None:
    """The second line: the files' own functions take no id that is not one."""
    state_dir = tmp_path / "a" / "state"
    hostile = str(tmp_path / "outside") if hostile == ABSOLUTE else hostile
    with pytest.raises(ConfigError, match="32 lowercase hex digits"):
        save_local_state(state_dir, hostile, 1, {"w": torch.zeros(2)})
    with pytest.raises(ConfigError, match="32 lowercase hex digits"):
        load_local_state(state_dir, hostile, 2, SITE)
    assert _files(tmp_path) == set()


def test_a_forged_or_unreadable_file_is_not_loaded(tmp_path: Path, site_log: list[str]) -> None:
    state_dir = tmp_path / "state"
    save_local_state(state_dir, FEDERATION, 1, {"w": torch.ones(2)})
    # A file copied under another round's name is refused by what it records.
    path = state_file(state_dir, FEDERATION, 1)
    path.rename(state_file(state_dir, FEDERATION, 4))
    assert load_local_state(state_dir, FEDERATION, 5, SITE) is None
    assert "records federation 01234567 round 1" in "\n".join(site_log)
    state_file(state_dir, FEDERATION, 2).write_bytes(b"not a torch file")
    assert load_local_state(state_dir, FEDERATION, 3, SITE) is None
    assert "round_0002.pt is unusable" in "\n".join(site_log)
    save_local_state(state_dir, FEDERATION, 6, {"w": torch.full((2,), 6.0)})
    assert torch.equal(load_local_state(state_dir, FEDERATION, 7, SITE)["w"], torch.full((2,), 6.0))  # type: ignore[index]


def test_only_the_most_recent_federations_keep_files(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    ids = [new_federation_id() for _ in range(KEPT_FEDERATIONS + 2)]
    for age, federation_id in enumerate(ids):
        save_local_state(state_dir, federation_id, 1, {"w": torch.zeros(2)})
        folder = state_dir / LOCAL_STATE_DIR / federation_id
        os.utime(folder, (1_000_000 + age, 1_000_000 + age))  # file times one second apart
    (state_dir / LOCAL_STATE_DIR / "notes").mkdir()  # not a federation's: left alone
    kept = sorted(p.name for p in (state_dir / LOCAL_STATE_DIR).iterdir())
    assert kept == sorted([*ids[-KEPT_FEDERATIONS:], "notes"])


# -- the coordinator's side ---------------------------------------------------------------


def test_the_coordinator_makes_one_federation_id_and_keeps_it_on_resume(tmp_path: Path) -> None:
    from ctfed.server.collect import round_instructions
    from ctfed.server.rounds import initial_global_state

    cfg = load_run_config(["federation.rounds=2"])
    recorder = RunRecorder(tmp_path, cfg)
    recorder.save_global(0, initial_global_state(cfg))
    federation_id = read_results(tmp_path)["federation_id"]
    assert federation_id == recorder.federation_id and len(federation_id) == 32
    assert RunRecorder(tmp_path / "other", cfg).federation_id != federation_id

    resumed, _ = RunRecorder.resume(tmp_path, cfg)
    assert resumed.federation_id == federation_id == read_results(tmp_path)["federation_id"]
    sent = round_instructions(cfg, 1, federation_id=resumed.federation_id).to_record()
    assert RoundInstructions.from_record(sent).federation_id == federation_id

    # A results file whose id was edited into a path is not resumed.
    text = (tmp_path / RESULTS_NAME).read_text().replace(federation_id, "../../elsewhere")
    (tmp_path / RESULTS_NAME).write_text(text)
    with pytest.raises(ResumeError, match="results.json's federation_id is '../../elsewhere', not 32 lowercase hex"):
        RunRecorder.resume(tmp_path, cfg)


def test_phase_two_removes_the_federations_local_state_files(tmp_path: Path) -> None:
    """The first phase-2 round (the whole classifier arrives) ends phase 1's local state: the
    memory copy and this federation's files; another federation's stay."""
    from ctfed.client.finetune_round import global_classifier
    from ctfed.common.checkpoint import state_digest
    from ctfed.common.config import FinetuneConfig
    from ctfed.common.exchange import FINETUNE_PHASE
    from ctfed.common.finetune import FederatedFreezingSchedule, build_classifier

    tiny = ModelConfig(name="tiny", image_size=32, patch_size=8, hidden_size=48, num_layers=4, num_heads=3, mlp_dim=96)
    finetune = FinetuneConfig(label_names=["any"])
    plan = FederatedFreezingSchedule(finetune, tiny.num_layers, rounds=3, local_steps=2).plan(1)
    state = build_classifier(tiny, 1, seed=0).state_dict()
    state_dir, other = tmp_path / "state", new_federation_id()
    for federation_id in (FEDERATION, other):
        save_local_state(state_dir, federation_id, 2, {"w": torch.zeros(2)})
    instructions = RoundInstructions(
        server_round=3, model=tiny, train=TrainConfig(), phase=FINETUNE_PHASE, finetune=finetune, plan=plan,
        plan_local_steps=2, full_state=True, base_sha256=state_digest(state), federation_id=FEDERATION,
    )
    context = site_context(tmp_path / "cache", state_dir)
    global_classifier(train_message(instructions, state), context, instructions, state_dir)
    assert sorted(p.name for p in (state_dir / LOCAL_STATE_DIR).iterdir()) == [other]
