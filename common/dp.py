"""Differential-privacy maths shared by sites and coordinator: clipping, noise, accounting.

Randomness: every DP draw (DP-SGD noise and Poisson batches at a site, central noise at the
coordinator) comes from ``SecureRandom``, the ChaCha20 keystream under a key from the OS
CSPRNG; no seed, config or instruction can make it reproducible.

Accounting uses Opacus' RDP analysis of the sampled Gaussian mechanism, and for distributed
DP the Skellam mechanism's RDP bound (``skellam_rdp``). A ``PrivacyLedger``
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
LEDGER_FORMAT = "ctfed-privacy-ledger/2"
# /1 ledgers hold sampled Gaussian entries only; they read as such.
_LEDGER_FORMATS = ("ctfed-privacy-ledger/1", LEDGER_FORMAT)
# LedgerEntry.mechanism: Opacus' sampled Gaussian (local DP-SGD, central DP) or the Skellam
# mechanism on integers (distributed DP: the sites' noise, summed under secure aggregation).
SAMPLED_GAUSSIAN = "sampled_gaussian"
SKELLAM = "skellam"
MECHANISMS = (SAMPLED_GAUSSIAN, SKELLAM)


class PrivacyBudgetExceeded(RuntimeError):
    """A round would take the privacy spend past the budget; the message gives the numbers."""


@dataclass(frozen=True)
class LedgerEntry:
    """One round of one mechanism, repeated ``steps`` times: a sampled Gaussian (noise
    ``noise_multiplier`` x the sensitivity, ``sample_rate``), or a Skellam mechanism whose
    noise has ``noise_multiplier`` x its L2 sensitivity as std, that sensitivity being at
    least ``l2_sensitivity`` integer steps (``skellam_rdp``; sample rate 1)."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    run_id: str = ""
    mechanism: str = SAMPLED_GAUSSIAN
    l2_sensitivity: float = 0.0

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {', '.join(MECHANISMS)}, got {self.mechanism!r}")
        if self.mechanism == SKELLAM and (self.sample_rate != 1 or not self.l2_sensitivity >= 1):
            raise ValueError("a Skellam entry has sample rate 1 and an L2 sensitivity >= 1 integer step")
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
        return entries_epsilon(entries, delta)

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
        if data.get("format") not in _LEDGER_FORMATS:
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
    """Epsilon at ``delta`` of (noise multiplier, sample rate, steps) sampled Gaussian compositions (RDP)."""
    return entries_epsilon([LedgerEntry(0, sigma, rate, steps) for sigma, rate, steps in history], delta)


def skellam_rdp(noise_multiplier: float, l2_sensitivity: float, orders: list[float] = RDP_ORDERS) -> np.ndarray:
    """RDP at ``orders`` of adding symmetric Skellam noise (Poisson(mu) - Poisson(mu) per value)
    to an integer vector whose L2 sensitivity is at least ``l2_sensitivity`` steps, with
    mu = (noise_multiplier x the sensitivity)^2 / 2 (the noise's std is noise_multiplier x it).

    Agarwal, Kairouz and Liu 2021 (arXiv:2110.04995, Theorem 3.5): for L1 and L2
    sensitivities D1, D2, eps(a) = a D2^2 / (4 mu) + min(((2a - 1) D2^2 + 6 D1) / (16 mu^2),
    3 D1 / (4 mu)), mu each Poisson's mean (tests/unit/test_distributed_dp.py checks it
    against the exact one-dimensional Renyi divergence). With D1 <= D2^2 (an integer vector's
    L1 norm is at most its squared L2 norm) and mu = (z D2)^2 / 2 this is at most
    a / (2 z^2) + min((2a + 5) / (4 z^4 D2^2), 3 / (2 z^2)), which only falls as D2 grows: so
    the bound at the smallest D2 a site can have (its grid's steps per clip norm) holds
    whatever the model's size. The first term is the Gaussian mechanism's."""
    z, d2 = float(noise_multiplier), float(l2_sensitivity)
    if not z > 0 or not d2 >= 1:
        raise ValueError(f"noise_multiplier must be > 0 and l2_sensitivity >= 1, got {z}, {d2}")
    alphas = np.asarray(orders, dtype=np.float64)
    tail = np.minimum((2 * alphas + 5) / (4 * z**4 * d2**2), 3 / (2 * z**2))
    return alphas / (2 * z**2) + tail


def entries_epsilon(entries: list[LedgerEntry], delta: float) -> float:
    """Epsilon at ``delta`` of the composition of ``entries`` (RDP, Opacus' conversion)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    entries = [e for e in entries if e.steps > 0]
    if not entries:
        return 0.0
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    rdp = np.zeros(len(RDP_ORDERS))
    for e in entries:
        if e.mechanism == SKELLAM:
            rdp = rdp + e.steps * skellam_rdp(e.noise_multiplier, e.l2_sensitivity)
        else:
            rdp = rdp + compute_rdp(q=e.sample_rate, noise_multiplier=e.noise_multiplier, steps=e.steps, orders=RDP_ORDERS)
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


# The largest Poisson mean SecureRandom draws: its draws stay exact integers in float64
# (below 2**53 with room for the tail).
POISSON_MAX_MEAN = 2.0**50


def _log_poisson_pmf(k: np.ndarray, mean: float) -> np.ndarray:
    """log(mean^k e^-mean / k!) for k >= 1 by Stirling's series with x = k/mean - 1:
    -mean((1 + x) log1p(x) - x) - log(2 pi k)/2 - 1/(12k) + 1/(360k^3) (error below 1e-9 from
    k = 10; PTRS reaches k = 0 only at means where that is rejected anyway)."""
    k = np.maximum(k, 1.0)
    x = k / mean - 1.0
    return -mean * ((1.0 + x) * np.log1p(x) - x) - 0.5 * np.log(2 * np.pi * k) - 1.0 / (12 * k) + 1.0 / (360 * k**3)


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

    def poisson(self, count: int, mean: float) -> np.ndarray:
        """``count`` i.i.d. Poisson(``mean``) draws, int64, exact up to float64 arithmetic.

        Inversion below mean 10; above, Hormann's transformed rejection (PTRS, 1993; numpy's
        algorithm) on this object's uniforms, its acceptance test on log f(k) written
        through log1p so it stays accurate at means of 1e15 (where k log(mean) - lgamma(k+1)
        would cancel 16 digits away)."""
        if not 0 < mean <= POISSON_MAX_MEAN:
            raise ValueError(f"a Poisson mean must be in (0, {POISSON_MAX_MEAN:g}], got {mean}")
        if mean < 10:
            return self._poisson_inversion(count, mean)
        out = np.empty(count, dtype=np.int64)
        smu = math.sqrt(mean)
        b = 0.931 + 2.53 * smu
        a = -0.059 + 0.02483 * b
        log_inv_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
        vr = 0.9277 - 3.6224 / (b - 2)
        todo = np.arange(count)
        while todo.size:
            u = self.uniform(todo.size) - 0.5
            v = self.uniform(todo.size)
            us = 0.5 - np.abs(u)
            k = np.floor((2 * a / us + b) * u + mean + 0.43)
            quick = (us >= 0.07) & (v <= vr)
            possible = ~quick & (k >= 0) & ~((us < 0.013) & (v > us))
            slow = np.zeros(todo.size, dtype=bool)
            if possible.any():
                kk, uu, vv = k[possible], us[possible], v[possible]
                lhs = np.log(vv) + log_inv_alpha - np.log(a / (uu * uu) + b)
                slow[possible] = lhs <= _log_poisson_pmf(kk, mean)
            accepted = quick | slow
            out[todo[accepted]] = k[accepted].astype(np.int64)
            todo = todo[~accepted]
        return out

    def _poisson_inversion(self, count: int, mean: float) -> np.ndarray:
        u = self.uniform(count)
        k = np.zeros(count, dtype=np.int64)
        term = np.full(count, math.exp(-mean))
        cdf = term.copy()
        while True:
            below = u > cdf
            if not below.any():
                return k
            k[below] += 1
            term[below] *= mean / k[below]
            cdf[below] += term[below]
            # Far tail (a cdf that float64 rounds below u forever): stop at a count no draw reaches.
            if k.max() > 10 * mean + 100:
                return k

    def skellam(self, count: int, mean: float) -> np.ndarray:
        """``count`` i.i.d. symmetric Skellam draws, Poisson(``mean``) - Poisson(``mean``), int64
        (variance 2 x mean)."""
        return self.poisson(count, mean) - self.poisson(count, mean)

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
