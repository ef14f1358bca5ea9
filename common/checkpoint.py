"""Encoder checkpoints: safetensors weights beside a JSON model card.

The card records what a later reader needs to rebuild and trust the weights (model
config, round, content hash) and nothing about patients.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ctfed.common.config import ModelConfig, to_section
from ctfed.common.fileio import write_json_atomic

CARD_SUFFIX = ".json"
WEIGHTS_SUFFIX = ".safetensors"


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Order-independent SHA-256 of names, shapes and values (for audit and equality)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(
    stem: Path, state: Mapping[str, torch.Tensor], model: ModelConfig, **card: Any
) -> Path:
    """Save ``<stem>.safetensors`` and ``<stem>.json``; returns the weights path."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_suffix(WEIGHTS_SUFFIX)
    tmp = weights.with_name(f".{weights.name}.tmp")
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    save_file(tensors, str(tmp))
    os.replace(tmp, weights)
    write_json_atomic(
        stem.with_suffix(CARD_SUFFIX),
        {"model": asdict(model), "sha256": state_digest(tensors), **card},
    )
    return weights


def load_checkpoint(weights: Path) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, Any]]:
    """Load weights and card; checks the weights against the card's hash."""
    card_path = weights.with_suffix(CARD_SUFFIX)
    if not weights.is_file() or not card_path.is_file():
        raise FileNotFoundError(f"checkpoint needs both {weights} and {card_path}")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    try:
        state = load_file(str(weights))
    except SafetensorError as err:  # truncated or overwritten file
        raise ValueError(f"checkpoint {weights} is unreadable: {err}") from None
    if state_digest(state) != card.get("sha256"):
        raise ValueError(f"checkpoint {weights} does not match the hash in its card")
    model = dict(card["model"])
    if "input_mean" not in model:  # written before the encoder standardised its inputs
        channels = int(model.get("in_channels", 3))
        model.update(input_mean=[0.0] * channels, input_std=[1.0] * channels)
    return state, to_section(ModelConfig, model), card


def card_preprocessing_plan(card: Mapping[str, Any]) -> dict[str, Any] | None:
    """The preprocessing plan a model was trained with, from its card's data summary (``ctfed
    finetune`` and ``pretrain``: the cache's plan; a federation's: ``as_configured``); None if absent."""
    plan = (card.get("data_summary") or {}).get("preprocessing")
    if isinstance(plan, dict) and isinstance(plan.get("as_configured"), dict):
        plan = plan["as_configured"]
    return dict(plan) if isinstance(plan, dict) and plan else None
