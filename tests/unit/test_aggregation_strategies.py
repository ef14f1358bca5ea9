"""Aggregation strategies: robust rules, FedAdam at the coordinator, FedProx at the sites."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ctfed.common.checkpoint import load_checkpoint
from ctfed.common.config import ConfigError, FederationConfig, Strategy, load_run_config
from ctfed.server.aggregation import GlobalUpdate, ServerAdam, coordinate_median, trimmed_mean
from ctfed.server.results import RoundRecord, RunRecorder
from ctfed.server.rounds import initial_encoder_state
from helpers import tiny_trainer as _trainer  # tests/helpers.py (tests/ is on sys.path)


def _updates(count: int = 5, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(4, 3, generator=generator), "b": torch.randn(2, generator=generator)} for _ in range(count)]


def test_median_and_trimmed_mean_match_numpy_and_ignore_an_outlier() -> None:
    updates = _updates()
    stacked = np.stack([u["w"].numpy() for u in updates])
    assert np.allclose(coordinate_median(updates)["w"].numpy(), np.median(stacked, axis=0))
    trimmed = np.sort(stacked, axis=0)[1:-1].mean(axis=0)  # 0.2 of 5 sites: one at each end
    assert np.allclose(trimmed_mean(updates, 0.2)["w"].numpy(), trimmed)

    poisoned = [*updates[:4], {name: t * 1e6 for name, t in updates[4].items()}]
    for combined in (coordinate_median(poisoned), trimmed_mean(poisoned, 0.2)):
        assert float(combined["w"].abs().max()) < 10  # the mean would be ~1e5
    assert float(trimmed_mean(poisoned, 0.0)["w"].abs().max()) > 1e4


def test_server_adam_is_adam_on_the_negative_mean_delta() -> None:
    cfg = FederationConfig(strategy=Strategy.fedadam, server_lr=0.05, server_beta1=0.8, server_beta2=0.95, server_tau=1e-3)
    start = {"w": torch.randn(4, 3)}
    parameter = torch.nn.Parameter(start["w"].clone())
    reference = torch.optim.Adam([parameter], lr=0.05, betas=(0.8, 0.95), eps=1e-3)
    adam, state = ServerAdam(cfg), dict(start)
    for delta in _updates(3, seed=1):
        state = adam.step(state, {"w": delta["w"]})
        parameter.grad = -delta["w"]
        reference.step()
        assert torch.allclose(state["w"], parameter.detach(), atol=1e-6)


def test_fedadam_state_survives_a_checkpoint_and_resume(tmp_path: Path) -> None:
    cfg = load_run_config(["federation.strategy=fedadam", "federation.rounds=3"])
    start = initial_encoder_state(cfg)
    deltas = [{name: torch.randn_like(t) * 1e-3 if t.is_floating_point() else t for name, t in start.items()} for _ in range(2)]

    straight = GlobalUpdate(cfg.federation)
    expected = straight.apply(straight.apply(start, deltas[0]), deltas[1])

    recorder = RunRecorder(tmp_path, cfg)
    first = GlobalUpdate(cfg.federation)
    after_one = first.apply(start, deltas[0])
    recorder.save_global(1, after_one, first.state())
    recorder.add_round(RoundRecord(round=1, sites=[], aggregated=True, bytes_sent_per_site=0, seconds=0.0, checkpoint=""))
    resumed, state = RunRecorder.resume(tmp_path, cfg)
    assert resumed.strategy_state, "FedAdam's moments were not restored"
    second = GlobalUpdate(cfg.federation, resumed.strategy_state)
    got = second.apply(state, deltas[1])
    for name in expected:
        assert torch.allclose(got[name].float(), expected[name].float(), atol=1e-7), name


def test_fedprox_keeps_a_site_closer_to_the_global_model() -> None:
    distances = {}
    for mu in (0.0, 50.0):
        # Unscaled LR and no warm-up: the second step must start away from the global model.
        trainer = _trainer(proximal_mu=mu, lr=5e-3, lr_reference_batch=2, warmup_fraction=0.0)
        start = trainer.encoder_state()
        trainer.set_global_encoder(start)
        if mu:
            assert float(trainer._proximal_term()) == 0.0
        trainer.train_round(0)
        distances[mu] = sum(float((t - start[n]).pow(2).sum()) for n, t in trainer.encoder_state().items() if t.is_floating_point())
    assert 0 < distances[50.0] < distances[0.0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federation.strategy=median"], "secure aggregation hides"),
        (["federation.strategy=trimmed_mean", "secagg.enabled=false", "privacy.mode=central"], "uniform mean"),
        (["federation.strategy=fedprox"], "proximal_mu > 0"),
        (["federation.trim_fraction=0.5"], r"\[0, 0.5\)"),
    ],
)
def test_strategy_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_run_config(overrides)


def test_unchanged_defaults_are_fedavg() -> None:
    cfg = load_run_config()
    assert cfg.federation.strategy is Strategy.fedavg and GlobalUpdate(cfg.federation).state() == {}
    assert replace(cfg.federation, strategy=Strategy.fedadam).strategy is Strategy.fedadam


def _scripted_site(deltas: dict[int, float]):  # noqa: ANN202 - a Flower handler
    """A site that replies a constant delta per node (the coordinator's side is real)."""
    from flwr.app import Message, RecordDict

    from ctfed.common.exchange import ARRAYS_KEY, SiteReply, state_to_record

    def handle(msg: Message, context) -> Message:  # noqa: ANN001
        node = int(msg.metadata.dst_node_id)
        state = msg.content[ARRAYS_KEY].to_torch_state_dict()
        delta = {n: torch.full_like(t, deltas[node]) if t.is_floating_point() else t for n, t in state.items()}
        reply = SiteReply(f"site-{node}", num_examples=2, loss=1.0, loss_first=1.0, losses=(1.0,), train_seconds=0.0, data_seconds=0.0)
        content = RecordDict({ARRAYS_KEY: state_to_record(delta), **reply.to_records()})
        return Message(content=content, reply_to=msg)

    return handle


@pytest.mark.parametrize("strategy", ["median", "trimmed_mean", "fedavg"])
def test_round_loop_with_a_poisoning_site(tmp_path: Path, strategy: str) -> None:
    from ctfed.server.rounds import run_federation
    from ctfed.simulations.runtime.inprocess import InProcessGrid

    deltas = {1: 1e-3, 2: 2e-3, 3: 3e-3, 4: 4e-3, 5: 5.0}  # site 5 pushes hard, within the norm limit
    grid = InProcessGrid({"train": _scripted_site(deltas)}, list(deltas))
    cfg = load_run_config(
        [f"federation.strategy={strategy}", "secagg.enabled=false", "federation.rounds=1", "federation.min_sites=3",
         "federation.max_update_norm=1e9"]
    )
    recorder = run_federation(grid, cfg, tmp_path / strategy)
    start = initial_encoder_state(cfg)
    end, _, _ = load_checkpoint(tmp_path / strategy / "checkpoints" / "global_round_0001.safetensors")
    name = next(n for n, t in start.items() if t.is_floating_point())
    moved = float((end[name].float() - start[name].float()).mean())
    expected = {"median": 3e-3, "trimmed_mean": 3e-3, "fedavg": (1e-3 + 2e-3 + 3e-3 + 4e-3 + 5.0) / 5}[strategy]
    assert moved == pytest.approx(expected, rel=1e-3)
    assert all(s.status == "aggregated" for s in recorder.rounds[0].sites)
