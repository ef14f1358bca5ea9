"""How the coordinator turns site updates into the next global encoder, per strategy.

Two steps, kept apart so secure aggregation can share the second:
1. combine: site deltas -> one delta. FedAvg/FedProx/FedAdam use the example-weighted mean
   (Flower's FedAvg on the plain path, the unmasked sum on the secure path); the robust
   rules (coordinate-wise median, trimmed mean) need every delta in clear.
2. apply: global + delta for FedAvg/FedProx and the robust rules; FedAdam treats the mean
   delta as a pseudo-gradient and takes an Adam step (Reddi et al. 2021), whose moments
   are saved with every checkpoint so a resumed run continues them.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ctfed.common.config import FederationConfig, Strategy
from ctfed.common.exchange import apply_delta


def coordinate_median(updates: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per coordinate, the median over sites (the lower middle value for an even count)."""
    return {name: torch.stack([u[name].float() for u in updates]).median(dim=0).values for name in updates[0]}


def trimmed_mean(updates: Sequence[Mapping[str, torch.Tensor]], fraction: float) -> dict[str, torch.Tensor]:
    """Per coordinate, the mean after dropping the ``fraction`` largest and smallest values."""
    cut = math.floor(fraction * len(updates))
    kept = slice(cut, len(updates) - cut)
    return {
        name: torch.stack([u[name].float() for u in updates]).sort(dim=0).values[kept].mean(dim=0)
        for name in updates[0]
    }


def robust_combine(strategy: Strategy, updates: Sequence[Mapping[str, torch.Tensor]], cfg: FederationConfig) -> dict[str, torch.Tensor]:
    if not updates:
        raise ValueError("no updates to combine")
    if strategy is Strategy.median:
        return coordinate_median(updates)
    if strategy is Strategy.trimmed_mean:
        return trimmed_mean(updates, cfg.trim_fraction)
    raise ValueError(f"{strategy.value} is not a robust rule")


class ServerAdam:
    """Adam on the global encoder with the mean site delta as the (negative) gradient."""

    def __init__(self, cfg: FederationConfig, state: Mapping[str, torch.Tensor] | None = None) -> None:
        self.cfg = cfg
        self.moments: dict[str, torch.Tensor] = dict(state or {})

    def step(self, global_state: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        step = int(self.moments.get("step", torch.zeros(())).item()) + 1
        new_state: dict[str, torch.Tensor] = {}
        for name, weights in global_state.items():
            if not weights.is_floating_point():
                new_state[name] = weights
                continue
            delta = mean_delta[name].float()
            m = self.moments.get(f"m.{name}", torch.zeros_like(delta))
            v = self.moments.get(f"v.{name}", torch.zeros_like(delta))
            m = cfg.server_beta1 * m + (1 - cfg.server_beta1) * delta
            v = cfg.server_beta2 * v + (1 - cfg.server_beta2) * delta * delta
            self.moments[f"m.{name}"], self.moments[f"v.{name}"] = m, v
            # Bias correction, so the first rounds are not damped towards zero.
            m_hat = m / (1 - cfg.server_beta1**step)
            v_hat = v / (1 - cfg.server_beta2**step)
            new_state[name] = (weights.float() + cfg.server_lr * m_hat / (v_hat.sqrt() + cfg.server_tau)).to(weights.dtype)
        self.moments["step"] = torch.tensor(step, dtype=torch.int64)
        return new_state


class GlobalUpdate:
    """The coordinator's second step (apply), with whatever state the strategy keeps."""

    def __init__(self, cfg: FederationConfig, saved_state: Mapping[str, torch.Tensor] | None = None) -> None:
        self.adam = ServerAdam(cfg, saved_state) if cfg.strategy is Strategy.fedadam else None

    def apply(self, global_state: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.adam is not None:
            return self.adam.step(global_state, mean_delta)
        return apply_delta(global_state, mean_delta)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint with the global encoder (empty for stateless strategies)."""
        return dict(self.adam.moments) if self.adam is not None else {}
