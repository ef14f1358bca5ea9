"""What travels between coordinator and sites: weights and instructions, and their checks."""

from __future__ import annotations

import math

import pytest
import torch

from ctfed.common.config import ConfigError, ModelConfig, TrainConfig
from ctfed.common.exchange import (
    UpdateRejected,
    apply_delta,
    configs_to_record,
    record_bytes,
    record_to_configs,
    record_to_state,
    state_delta,
    state_to_record,
    update_norm,
)


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4), "steps": torch.tensor(3)}


def test_weights_round_trip_exactly() -> None:
    state = _state()
    back = record_to_state(state_to_record(state), expected=state)
    assert set(back) == set(state)
    for name in state:
        assert torch.equal(back[name], state[name])


def test_bytes_counts_payload() -> None:
    record = state_to_record(_state())
    assert record_bytes(record) >= (12 + 4) * 4 + 8


def test_delta_then_apply_gives_back_the_new_weights() -> None:
    base = {"w": torch.randn(5, 2), "half": torch.randn(3).half()}
    new = {"w": base["w"] + 0.5, "half": (base["half"].float() - 0.25).half()}
    delta = state_delta(new, base)
    assert delta["w"].dtype == torch.float32 and torch.allclose(delta["w"], torch.full((5, 2), 0.5))
    back = apply_delta(base, delta)
    assert back["half"].dtype == torch.float16
    assert torch.allclose(back["w"], new["w"]) and torch.allclose(back["half"].float(), new["half"].float())


def test_update_norm_spans_all_tensors() -> None:
    assert update_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]]), "n": torch.tensor(7)}) == pytest.approx(5.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_update_is_rejected(bad: float) -> None:
    state = _state()
    state["a.bias"][1] = bad
    with pytest.raises(UpdateRejected, match="a.bias"):
        record_to_state(state_to_record(state), expected=_state())


def test_shape_and_name_mismatch_is_rejected() -> None:
    expected = _state()
    wrong_shape = dict(expected, **{"a.bias": torch.zeros(5)})
    with pytest.raises(UpdateRejected, match="shape"):
        record_to_state(state_to_record(wrong_shape), expected=expected)
    extra = dict(expected, **{"b.weight": torch.zeros(1)})
    with pytest.raises(UpdateRejected, match="unexpected"):
        record_to_state(state_to_record(extra), expected=expected)


def test_instructions_round_trip() -> None:
    model = ModelConfig(hidden_size=96, num_heads=4)
    train = TrainConfig(local_steps=7, lr=1e-3, global_crop_scale=[0.4, 1.0])
    record = configs_to_record(model, train, **{"server-round": 3})
    assert record["server-round"] == 3
    got_model, got_train = record_to_configs(record)
    assert got_model == model
    assert got_train == train


def test_instructions_with_unknown_or_invalid_values_are_refused() -> None:
    record = dict(configs_to_record(ModelConfig(), TrainConfig()))
    record["train.evil"] = 1
    with pytest.raises(ConfigError, match="evil"):
        record_to_configs(record)
    record = dict(configs_to_record(ModelConfig(), TrainConfig()))
    record["train.local_steps"] = 0
    with pytest.raises(ConfigError, match="local_steps"):
        record_to_configs(record)
