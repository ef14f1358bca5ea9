"""Distributed DP's maths (common/dp.py): the Skellam mechanism's RDP bound and the site's
Skellam sampler on the OS CSPRNG."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import chisquare, poisson, skellam

from ctfed.common.dp import SKELLAM, LedgerEntry, PrivacyLedger, SecureRandom, entries_epsilon, epsilon_for, skellam_rdp


def _exact_rdp(alpha: float, mean: float, shift: int) -> float:
    """Renyi divergence of Skellam(mean, mean) shifted by ``shift`` from itself, summed exactly."""
    width = int(60 * math.sqrt(2 * mean)) + shift + 60
    k = np.arange(-width, width + 1)
    log_p, log_q = skellam.logpmf(k - shift, mean, mean), skellam.logpmf(k, mean, mean)
    both = np.isfinite(log_p) & np.isfinite(log_q)  # beyond, float64 underflows both to 0
    return float(logsumexp(alpha * log_p[both] + (1 - alpha) * log_q[both]) / (alpha - 1))


@pytest.mark.parametrize("z", [0.3, 0.7, 1.0, 2.0])
@pytest.mark.parametrize("sensitivity", [1, 2, 5, 20])
def test_the_skellam_bound_is_above_the_exact_divergence(z: float, sensitivity: int) -> None:
    """In one dimension a shift of D is the worst neighbour (D1 = D2 = D); the bound must hold
    at every order, from the small means where Skellam is far from Gaussian to large ones."""
    mean = (z * sensitivity) ** 2 / 2
    orders = [1.5, 2.0, 4.0, 8.0, 16.0, 32.0]
    bound = skellam_rdp(z, sensitivity, orders)
    for alpha, value in zip(orders, bound):
        assert _exact_rdp(alpha, mean, sensitivity) <= value * (1 + 1e-9)


def test_the_skellam_bound_tends_to_the_gaussian_mechanisms() -> None:
    """For a large sensitivity in steps (a fine grid) the bound is the Gaussian's a / (2 z^2)."""
    orders = [2.0, 8.0, 32.0]
    np.testing.assert_allclose(skellam_rdp(1.0, 2**20, orders), [a / 2 for a in orders], rtol=1e-9)
    # So a round's epsilon is the central Gaussian mechanism's at sample rate 1.
    entry = LedgerEntry(1, 1.2, 1.0, 1, mechanism=SKELLAM, l2_sensitivity=2**20)
    assert entries_epsilon([entry], 1e-5) == pytest.approx(epsilon_for([(1.2, 1.0, 1)], 1e-5), rel=1e-6)
    coarse = LedgerEntry(1, 1.2, 1.0, 1, mechanism=SKELLAM, l2_sensitivity=2)
    assert entries_epsilon([coarse], 1e-5) > entries_epsilon([entry], 1e-5)  # a coarse grid costs more


def test_a_ledger_with_skellam_entries_round_trips_and_old_ledgers_still_read() -> None:
    ledger = PrivacyLedger([LedgerEntry(1, 1.0, 0.1, 10), LedgerEntry(2, 1.5, 1.0, 1, mechanism=SKELLAM, l2_sensitivity=4096)])
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again.entries == ledger.entries and again.epsilon(1e-5) == ledger.epsilon(1e-5)
    old = {"format": "ctfed-privacy-ledger/1", "entries": [{"round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10}]}
    assert PrivacyLedger.from_dict(old).entries == [LedgerEntry(1, 1.0, 0.1, 10)]
    with pytest.raises(ValueError, match="sample rate 1"):
        LedgerEntry(1, 1.0, 0.5, 1, mechanism=SKELLAM, l2_sensitivity=4096)


@pytest.mark.parametrize("mean", [0.7, 4.0, 15.0, 300.0])
def test_poisson_draws_follow_the_pmf(mean: float) -> None:
    draws = SecureRandom().poisson(40_000, mean)
    low, high = int(poisson.ppf(1e-4, mean)), int(poisson.ppf(1 - 1e-4, mean))
    bins = np.arange(low, high + 1)
    observed = np.array([np.count_nonzero(draws <= low), *[np.count_nonzero(draws == k) for k in bins[1:-1]], np.count_nonzero(draws >= high)])
    expected = np.array([poisson.cdf(low, mean), *poisson.pmf(bins[1:-1], mean), poisson.sf(high - 1, mean)]) * draws.size
    assert chisquare(observed, expected).pvalue > 1e-4


def test_skellam_draws_at_a_federations_means_have_its_moments_and_never_repeat() -> None:
    """At the means a site uses (1e9 to 1e15) the draws are integers with mean 0 and variance
    2 x mean; two generators never give the same noise (no seed: the OS CSPRNG)."""
    for mean in (1e9, 1e15):
        draws = SecureRandom().skellam(200_000, mean)
        assert draws.dtype == np.int64
        std = math.sqrt(2 * mean)
        assert abs(draws.mean()) < 5 * std / math.sqrt(draws.size)
        assert draws.std() / std == pytest.approx(1.0, abs=0.01)
        # Kurtosis of a Gaussian (3): the sampler's rejection step is not lopsided.
        assert ((draws / std) ** 4).mean() == pytest.approx(3.0, abs=0.1)
    assert not np.array_equal(SecureRandom().skellam(100, 1e9), SecureRandom().skellam(100, 1e9))
    with pytest.raises(ValueError, match="Poisson mean"):
        SecureRandom().poisson(1, 2.0**60)


def test_distributed_dp_needs_secure_aggregation_with_a_64_bit_sum() -> None:
    from ctfed.common.config import ConfigError, DistributedDPConfig, PrivacyConfig, PrivacyMode, RunConfig, SecAggConfig

    privacy = PrivacyConfig(mode=PrivacyMode.distributed)
    assert RunConfig(privacy=privacy).privacy.mode is PrivacyMode.distributed
    for secagg in (SecAggConfig(enabled=False), SecAggConfig(modulus_bits=32, quantization_range=2)):
        with pytest.raises(ConfigError, match="privacy.mode=distributed"):
            RunConfig(privacy=privacy, secagg=secagg)
    for granularity in (2, 2**31):
        with pytest.raises(ConfigError, match="granularity"):
            DistributedDPConfig(granularity=granularity)
