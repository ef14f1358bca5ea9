"""Central (site-level) differential privacy at the coordinator.

Each site clips its whole update to ``clip_norm`` before sending it (``common.dp.clip_update``).
The coordinator averages the accepted updates with *uniform* weights - not FedAvg's
example counts - so that any one site moves the mean by at most ``clip_norm / n``
(n = sites aggregated this round), and adds N(0, sigma^2) with
sigma = noise_multiplier * clip_norm / n to every coordinate of the mean. Example-count
weights would let a large site move the mean further and would make the weights themselves
depend on private data.

Accounting: one sampled Gaussian mechanism per aggregated round, noise multiplier
``noise_multiplier``, sampling rate = sites asked this round / sites available (Flower
samples a fixed number of sites; treating that as Poisson sampling at the same rate is
the usual DP-FedAvg approximation, and exact when every site is asked). The ledger is a
``PrivacyLedger`` saved with every round's results and checkpoint card, so a resumed run
can continue it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ctfed.common.config import CentralDPConfig
from ctfed.common.dp import LedgerEntry, PrivacyLedger, SecureRandom, add_gaussian_noise, central_noise_std

# Sites clip in float32; allow that much rounding above the bound before calling it a breach.
CLIP_TOLERANCE = 1e-4


def uniform_mean(updates: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean of the updates, every site weighted the same."""
    if not updates:
        raise ValueError("no updates to average")
    names = list(updates[0])
    return {name: torch.stack([u[name].float() for u in updates]).mean(dim=0) for name in names}


class CentralDP:
    """Uniform averaging, Gaussian noise and the coordinator's privacy ledger."""

    def __init__(self, cfg: CentralDPConfig, ledger: PrivacyLedger | None = None) -> None:
        self.cfg = cfg
        self.ledger = ledger if ledger is not None else PrivacyLedger()
        # Noise must not be reproducible by anyone who knows the run config: the OS CSPRNG.
        self.rng = SecureRandom()

    def max_update_norm(self, federation_max: float) -> float:
        """An update above the clip bound breaks the sensitivity argument: reject it."""
        return min(federation_max, self.cfg.clip_norm * (1 + CLIP_TOLERANCE))

    def noise_std(self, num_sites: int) -> float:
        return central_noise_std(self.cfg.noise_multiplier, self.cfg.clip_norm, num_sites)

    def aggregate(
        self, updates: Sequence[Mapping[str, torch.Tensor]], server_round: int, sample_rate: float
    ) -> tuple[dict[str, torch.Tensor], float]:
        """The noised uniform mean of clipped updates and the noise std; records the round."""
        return self.noise_mean(uniform_mean(updates), len(updates), server_round, sample_rate)

    def noise_mean(
        self, mean: Mapping[str, torch.Tensor], num_sites: int, server_round: int, sample_rate: float
    ) -> tuple[dict[str, torch.Tensor], float]:
        """Noise a uniform mean of ``num_sites`` clipped updates (also what secure aggregation
        hands over, with every site weighted 1); records the round in the ledger."""
        std = self.noise_std(num_sites)
        noisy = add_gaussian_noise(mean, std, self.rng)
        self.ledger.record(
            LedgerEntry(round=server_round, noise_multiplier=self.cfg.noise_multiplier, sample_rate=sample_rate, steps=1)
        )
        return noisy, std

    def epsilon(self) -> float:
        return self.ledger.epsilon(self.cfg.delta)
