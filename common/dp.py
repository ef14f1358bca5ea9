"""Differential-privacy maths shared by sites and coordinator: clipping, noise, accounting.

Randomness: every DP draw (DP-SGD noise and Poisson batches at a site, central noise at the
coordinator) comes from ``SecureRandom``, the ChaCha20 keystream under a key from the OS
CSPRNG; no seed, config or instruction can make it reproducible.

Accounting uses Opacus' RDP analysis of the sampled Gaussian mechanism. A ``PrivacyLedger``
is the accountant's whole history as plain numbers (noise multiplier, sample rate, steps per
round), so it can be written to JSON, read back after a restart and extended: epsilon then
accumulates over every round a site (or the coordinator) ever ran, which a fresh
``PrivacyEngine`` per round would silently forget.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from ctfed.common.fileio import write_json_atomic

# The orders of Opacus' RDPAccountant.DEFAULT_ALPHAS, so our numbers match it exactly (a
# test checks they are equal). Opacus itself is imported only where epsilon is computed:
# its import costs seconds in every site process.
RDP_ORDERS: list[float] = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
LEDGER_FORMAT = "ctfed-privacy-ledger/1"


class PrivacyBudgetExceeded(RuntimeError):
    """A round would take the privacy spend past the budget; the message gives the numbers."""


@dataclass(frozen=True)
class LedgerEntry:
    """One round of one sampled Gaussian mechanism, repeated ``steps`` times."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    run_id: str = ""

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


@dataclass
class PrivacyLedger:
    """Everything an RDP accountant needs to know, as a small serialisable object."""

    entries: list[LedgerEntry] = field(default_factory=list)

    def record(self, entry: LedgerEntry) -> None:
        self.entries.append(entry)

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self.entries)

    def epsilon(self, delta: float, planned: LedgerEntry | None = None) -> float:
        """Epsilon at ``delta`` after every recorded entry (and ``planned``, if given)."""
        entries = self.entries + ([planned] if planned is not None else [])
        return epsilon_for(
            [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries], delta
        )

    def check_budget(self, planned: LedgerEntry, max_epsilon: float, delta: float) -> float:
        """The epsilon after ``planned``; raises PrivacyBudgetExceeded if it passes ``max_epsilon``."""
        spent = self.epsilon(delta)
        after = self.epsilon(delta, planned)
        if after > max_epsilon:
            raise PrivacyBudgetExceeded(
                f"privacy budget: epsilon spent {spent:.4g}, this round would make it {after:.4g}, "
                f"which exceeds max_epsilon {max_epsilon:g} at delta {delta:g} by {after - max_epsilon:.4g}"
            )
        return after

    def to_dict(self) -> dict[str, Any]:
        return {"format": LEDGER_FORMAT, "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyLedger:
        if data.get("format") != LEDGER_FORMAT:
            raise ValueError(f"not a privacy ledger (format {data.get('format')!r}, expected {LEDGER_FORMAT!r})")
        return cls([LedgerEntry(**entry) for entry in data.get("entries", [])])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        return cls.from_dict(json.loads(text))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        """The ledger in ``path``; an empty one if the file does not exist yet."""
        if not path.exists():
            return cls()
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError, KeyError) as err:
            # Never start again from zero silently: that would reset the privacy spend.
            raise ValueError(f"privacy ledger {path} is unreadable ({err}); restore it from a backup") from None


def epsilon_for(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of (noise multiplier, sample rate, steps) compositions (RDP)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    rdp = sum(
        compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=steps, orders=RDP_ORDERS)
        for sigma, sample_rate, steps in history
    )
    epsilon, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(epsilon)


def clip_update(
    delta: Mapping[str, torch.Tensor], max_norm: float
) -> tuple[dict[str, torch.Tensor], float, bool]:
    """Scale a whole update so its L2 norm (all tensors together) is at most ``max_norm``.

    Returns (clipped update, scale applied, whether it was clipped). The direction is kept;
    an update within the bound is returned unchanged (scale 1). Central DP's sensitivity
    argument needs this on exactly what leaves the site, before any aggregation path
    (plain or secure) sees it.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm = math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in delta.values() if t.is_floating_point()))
    if norm <= max_norm:
        return {name: t.clone() for name, t in delta.items()}, 1.0, False
    scale = max_norm / norm
    clipped = {name: (t * scale).to(t.dtype) if t.is_floating_point() else t.clone() for name, t in delta.items()}
    return clipped, scale, True


def central_noise_std(noise_multiplier: float, clip_norm: float, num_sites: int) -> float:
    """Std of the Gaussian noise on the uniform mean of ``num_sites`` clipped updates.

    One site moves the mean by at most clip_norm / num_sites, so the noise scales with that.
    """
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    return noise_multiplier * clip_norm / num_sites


class SecureRandom:
    """Uniform and Gaussian draws from the operating system's CSPRNG, for DP only.

    The bits are the ChaCha20 keystream under a 256-bit key and nonce from ``os.urandom``,
    fresh per object (``cryptography``, as the SecAgg masks), so nobody can reproduce or
    predict them: not the coordinator, not anyone who knows every config and seed. A
    torch or numpy generator seeded from a config value would make the noise subtractable.

    Uniforms carry 53 random bits in (0, 1); normals are Box-Muller pairs in float64. A
    Gaussian sample is the sum of four such normals divided by 2, Opacus' ``secure_mode``
    construction against floating-point attacks on the noise's low bits (Opacus'
    ``_generate_noise``; Holohan et al. 2021, arXiv:2107.10138, section 5.1). Cost: about 6M
    noise values per second on one busy core (docs/security.md).
    """

    _CHUNK = 1 << 20  # values per keystream request, to bound memory

    def __init__(self) -> None:
        self._stream = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None).encryptor()

    def uniform(self, count: int) -> np.ndarray:
        """``count`` i.i.d. uniforms in the open interval (0, 1), float64."""
        words = np.frombuffer(self._stream.update(bytes(8 * count)), dtype=np.uint64)
        return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    def _box_muller(self, count: int) -> np.ndarray:
        pairs = (count + 1) // 2
        u = self.uniform(2 * pairs)
        radius = np.sqrt(-2.0 * np.log(u[:pairs]))
        angle = (2.0 * np.pi) * u[pairs:]
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]

    def standard_normal(self, count: int) -> np.ndarray:
        """``count`` i.i.d. N(0, 1) draws, float64 (each the mean-free sum of four, over 2)."""
        out = np.empty(count, dtype=np.float64)
        for start in range(0, count, self._CHUNK):
            size = min(self._CHUNK, count - start)
            total = self._box_muller(size)
            for _ in range(3):
                total += self._box_muller(size)
            out[start : start + size] = total / 2.0
        return out

    def normal(self, shape: torch.Size | tuple[int, ...], std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor of i.i.d. N(0, std^2) of ``shape`` and ``dtype``."""
        count = math.prod(shape)
        return torch.from_numpy(self.standard_normal(count) * std).to(dtype).reshape(shape)

    def bernoulli(self, count: int, probability: float) -> torch.Tensor:
        """``count`` independent coin flips with success ``probability`` (a bool tensor)."""
        return torch.from_numpy(self.uniform(count) < probability)


def add_gaussian_noise(
    state: Mapping[str, torch.Tensor], std: float, rng: SecureRandom | None = None
) -> dict[str, torch.Tensor]:
    """``state`` plus i.i.d. N(0, std^2) on every floating-point element, from ``rng``
    (a fresh ``SecureRandom`` if none is given; there is no seeded alternative)."""
    rng = rng if rng is not None else SecureRandom()
    noisy: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if tensor.is_floating_point() and std > 0:
            noise = rng.normal(tensor.shape, std, dtype=torch.float32)
            noisy[name] = (tensor.float() + noise).to(tensor.dtype)
        else:
            noisy[name] = tensor.clone()
    return noisy
