"""train.share_heads (issue #11, item 7): the projection head and centres travel with the encoder.

The federations run the coordinator's real round loop in process against the real ClientApp
handlers (plain FedAvg, SecAgg+'s five stages, central DP) on tiny synthetic caches.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from torch.utils.data import Dataset

from ctfed.common import secagg as sa
from ctfed.common.checkpoint import load_checkpoint
from ctfed.common.config import LocalDPConfig, RunConfig, load_run_config
from ctfed.common.exchange import ARRAYS_KEY, CONFIG_KEY, LOCAL_STATE_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, update_norm
from ctfed.common.model import SHARED_HEAD_PREFIX, encoder_part, split_shared_state
from ctfed.server.rounds import initial_global_state, run_federation

NODES = [1, 2, 3]
FAST = ["train.local_steps=1", "monitor.enabled=false", "federation.min_sites=3"]


def _heads(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return split_shared_state(state)[1]


def _federate(
    caches: Path, run_dir: Path, overrides: list[str], secure: bool
) -> tuple[RunConfig, dict[int, Context], dict[tuple[int, int], dict[str, torch.Tensor]], dict[tuple[int, int], int]]:
    """Run the federation; returns the contexts and every site's reply update and weight by (node, round)."""
    from ctfed.client.app import train
    from ctfed.client.secagg import stage_handlers
    from ctfed.simulations.runtime.inprocess import InProcessGrid

    updates: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    weights: dict[tuple[int, int], int] = {}

    def recording(msg: Message, context: Context) -> Message:
        reply = train(msg, context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        key = (context.node_id, int(msg.content[CONFIG_KEY]["server-round"]))
        updates[key] = reply.content[ARRAYS_KEY].to_torch_state_dict()
        weights[key] = int(reply.content[METRICS_KEY][NUM_EXAMPLES_KEY])
        return reply

    cfg = load_run_config([*FAST, f"secagg.enabled={str(secure).lower()}", *overrides])
    contexts = {
        n: Context(run_id=1, node_id=n, node_config={"partition-id": i}, state=RecordDict(),
                   run_config={"data-dir": str(caches), "run-dir": str(run_dir)})
        for i, n in enumerate(NODES)
    }
    handlers: dict[str, Callable[[Message, Context], Message]] = (
        stage_handlers(recording) if secure else {"train": recording}
    )
    run_federation(InProcessGrid(handlers, NODES, contexts=contexts), cfg, run_dir)
    return cfg, contexts, updates, weights


def _checkpoint(run_dir: Path, server_round: int) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / f"global_round_{server_round:04d}.safetensors")[0]


def _weighted_mean(updates: list[dict[str, torch.Tensor]], weights: list[int], name: str) -> torch.Tensor:
    return sum(w * u[name].double() for u, w in zip(updates, weights)) / sum(weights)  # type: ignore[return-value]


def _site_heads(context: Context) -> dict[str, torch.Tensor]:
    local = context.state[LOCAL_STATE_KEY].to_torch_state_dict()
    return {k: v for k, v in local.items() if k.startswith("head.")}


@pytest.mark.parametrize("share", [True, False])
def test_sites_start_each_round_from_the_aggregated_heads_only_when_shared(
    three_site_caches: Path, tmp_path: Path, share: bool
) -> None:
    run_dir = tmp_path / "run"
    _, contexts, updates, weights = _federate(
        three_site_caches, run_dir, ["federation.rounds=2", f"train.share_heads={str(share).lower()}"], secure=False
    )
    start, after_one = _checkpoint(run_dir, 0), _checkpoint(run_dir, 1)
    if not share:
        # The heads stay at the sites: nothing of them on the wire or in a checkpoint, and
        # after two rounds every site holds its own.
        assert not _heads(start) and not _heads(after_one)
        assert not any(name.startswith(SHARED_HEAD_PREFIX) for u in updates.values() for name in u)
        heads = [_site_heads(contexts[n]) for n in NODES]
        assert not torch.equal(heads[0]["head.last_layer.weight"], heads[1]["head.last_layer.weight"])
        return
    shared = [name for name in start if name.startswith(SHARED_HEAD_PREFIX)]
    assert {f"{SHARED_HEAD_PREFIX}last_layer.weight", f"{SHARED_HEAD_PREFIX}center.dino",
            f"{SHARED_HEAD_PREFIX}center.ibot"} <= set(shared)
    # Round 1's aggregate is FedAvg of the sites' head (and centre) deltas, as for the encoder.
    round_one = [updates[(n, 1)] for n in NODES]
    for name in [*shared, "norm.weight"]:
        expected = start[name].double() + _weighted_mean(round_one, [weights[(n, 1)] for n in NODES], name)
        torch.testing.assert_close(after_one[name].double(), expected, rtol=0, atol=1e-6)
    moved = after_one[f"{SHARED_HEAD_PREFIX}mlp.0.weight"] - start[f"{SHARED_HEAD_PREFIX}mlp.0.weight"]
    assert moved.abs().max() > 0
    # Round 2: every site started from that aggregate (its head after the round minus what it sent).
    for node in NODES:
        head_after_two = _site_heads(contexts[node])
        sent = updates[(node, 2)]
        for local_name, tensor in head_after_two.items():
            started_from = tensor - sent[SHARED_HEAD_PREFIX + local_name[len("head."):]]
            torch.testing.assert_close(started_from, after_one[SHARED_HEAD_PREFIX + local_name[len("head."):]], rtol=0, atol=1e-6)


def test_secure_aggregation_sums_the_shared_heads_like_the_encoder(three_site_caches: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg, _, updates, weights = _federate(
        three_site_caches, run_dir, ["federation.rounds=1", "train.share_heads=true"], secure=True
    )
    start, after = _checkpoint(run_dir, 0), _checkpoint(run_dir, 1)
    sent = [updates[(n, 1)] for n in NODES]
    # The site's held delta (the reply of stage (a)'s local training) covers encoder and heads.
    assert all(set(u) == set(start) for u in sent)
    bound = sa.aggregation_error_bound(cfg.secagg) + 1e-6  # plus float32 rounding
    heads = [name for name in start if name.startswith(SHARED_HEAD_PREFIX)]
    assert heads
    for name in start:  # heads and encoder alike: the unmasked sum is the weighted mean
        expected = start[name].double() + _weighted_mean(sent, [weights[(n, 1)] for n in NODES], name)
        assert (after[name].double() - expected).abs().max() <= bound, name
    assert any((after[n] - start[n]).abs().max() > 1e-4 for n in heads)


def test_central_dp_clips_the_whole_update_heads_included(three_site_caches: Path, tmp_path: Path) -> None:
    clip = 0.02
    _, _, updates, _ = _federate(
        three_site_caches, tmp_path / "run",
        ["federation.rounds=1", "train.share_heads=true", "privacy.mode=central",
         f"privacy.central.clip_norm={clip}", "privacy.central.noise_multiplier=0.5"],
        secure=False,
    )
    for node in NODES:
        update = updates[(node, 1)]
        heads = {k: v for k, v in update.items() if k.startswith(SHARED_HEAD_PREFIX)}
        assert heads and update_norm(heads) > 0
        # One clip over the whole vector: the heads' share plus the encoder's stay within it.
        assert update_norm(update) <= clip * (1 + 1e-5)
        assert update_norm(encoder_part(update)) < update_norm(update)


class _Volumes(Dataset):
    def __init__(self, count: int, size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.volumes = [torch.rand(3, size, size, size, generator=generator) for _ in range(count)]

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.volumes[index]


def test_local_dp_sgd_clips_and_noises_the_shared_head() -> None:
    from ctfed.client.train import LocalTrainer

    cfg = load_run_config(["train.share_heads=true", "train.local_steps=2", "train.batch_size=2"])
    trainer = LocalTrainer(cfg.model, cfg.train, _Volumes(4, cfg.model.image_size), dp=LocalDPConfig())
    initial = initial_global_state(cfg)
    trainer.set_global_state(initial)
    trainer.train_round(0)
    sent = trainer.shared_state()
    assert set(sent) == set(initial)
    # Every shared head parameter is one of the parameters DP-SGD clips per volume and noises;
    # the centres are EMAs on public reference heads (post-processing, client/train.py).
    dp_params = {id(p) for p in trainer.dp.params}  # type: ignore[union-attr]
    for name, param in trainer.student.head.named_parameters():
        assert id(param) in dp_params, name
        assert not torch.equal(sent[SHARED_HEAD_PREFIX + name], initial[SHARED_HEAD_PREFIX + name])
    assert trainer.loss_fn.center_from_batch is False and trainer.ibot_loss.center_from_batch is False


@pytest.mark.parametrize("policy", ["reset", "keep"])
def test_teacher_heads_follow_the_global_heads_by_the_teacher_policy(policy: str) -> None:
    from ctfed.client.train import LocalTrainer

    cfg = load_run_config(["train.share_heads=true", "train.local_steps=1", f"train.teacher_on_new_global={policy}"])
    trainer = LocalTrainer(cfg.model, cfg.train, _Volumes(2, cfg.model.image_size))
    first = initial_global_state(cfg)
    trainer.set_global_state(first)  # the first global state initialises the teacher either way
    assert torch.equal(trainer.teacher.head.last_layer.weight, first[f"{SHARED_HEAD_PREFIX}last_layer.weight"])
    trainer.train_round(0)
    teacher_ema = trainer.teacher.head.last_layer.weight.clone()
    second = {k: v + 0.01 if k.startswith(SHARED_HEAD_PREFIX) else v for k, v in first.items()}
    trainer.set_global_state(second)
    assert torch.equal(trainer.student.head.last_layer.weight, second[f"{SHARED_HEAD_PREFIX}last_layer.weight"])
    assert torch.equal(trainer.loss_fn.center, second[f"{SHARED_HEAD_PREFIX}center.dino"])
    assert torch.equal(trainer.ibot_loss.center, second[f"{SHARED_HEAD_PREFIX}center.ibot"])
    teacher_now = trainer.teacher.head.last_layer.weight
    if policy == "reset":
        assert torch.equal(teacher_now, second[f"{SHARED_HEAD_PREFIX}last_layer.weight"])
    else:
        assert torch.equal(teacher_now, teacher_ema)
    # A global state that does not match the site's train.share_heads is refused by name.
    with pytest.raises(ValueError, match="lacks the shared heads"):
        trainer.set_global_state(encoder_part(first))


def test_fine_tuning_and_phase_two_load_only_the_encoder_of_a_checkpoint_with_heads(tmp_path: Path) -> None:
    from ctfed.client.finetune_cli import _pretrained_encoder
    from ctfed.common.finetune import build_classifier
    from ctfed.server.finetune_rounds import phase_two_classifier
    from ctfed.server.results import RunRecorder

    cfg = load_run_config(["train.share_heads=true"])
    recorder = RunRecorder(tmp_path / "run", cfg)
    state = initial_global_state(cfg)
    weights = recorder.save_global(0, state, shared_heads=True)
    assert _heads(load_checkpoint(weights)[0]), "the global checkpoint carries the shared heads"
    encoder, _, source = _pretrained_encoder(weights, cfg, [])
    assert source["kind"] == "global-encoder" and not _heads(encoder)
    classifier = build_classifier(cfg.model, 1, encoder)
    torch.testing.assert_close(classifier.encoder.state_dict()["norm.weight"], state["norm.weight"])
    classifier = phase_two_classifier(cfg, recorder, state)
    assert not any(name.startswith(SHARED_HEAD_PREFIX) for name in classifier.state_dict())
    assert math.isfinite(float(classifier.encoder.state_dict()["norm.weight"].sum()))


def test_a_resumed_state_is_made_to_match_share_heads(caplog: pytest.LogCaptureFixture) -> None:
    from ctfed.server.rounds import with_shared_heads

    shared = load_run_config(["train.share_heads=true"])
    unshared = load_run_config(["train.share_heads=false"])
    with_heads = initial_global_state(shared)
    assert with_shared_heads(shared, with_heads) is with_heads
    dropped = with_shared_heads(unshared, with_heads)
    assert set(dropped) == set(initial_global_state(unshared))
    restored = with_shared_heads(shared, dropped)
    assert list(restored) == list(with_heads)  # the order SecAgg+'s flattening relies on
    assert all(torch.equal(restored[k], with_heads[k]) for k in with_heads)
    assert "no shared heads" in caplog.text and "dropped" in caplog.text
