"""What the coordinator runs: rounds, aggregation strategy, transport and secure aggregation."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ctfed.common.config.errors import ConfigError


# Config enums have lower-case member names: OmegaConf parses a value by member *name*, so
# `federation.strategy=fedavg` on the command line must be a name.
class Strategy(str, enum.Enum):
    """Aggregation strategies the coordinator offers."""

    fedavg = "fedavg"  # example-weighted mean of the site updates
    fedprox = "fedprox"  # FedAvg, with a proximal term in each site's loss (train.proximal_mu)
    fedadam = "fedadam"  # Adam at the coordinator, the mean update as its pseudo-gradient
    median = "median"  # coordinate-wise median: robust, needs each site's update in clear
    trimmed_mean = "trimmed_mean"  # mean after dropping federation.trim_fraction at each end


# Robust rules look at every site's update: they cannot run on a securely aggregated sum.
ROBUST_STRATEGIES = (Strategy.median, Strategy.trimmed_mean)


class Transport(str, enum.Enum):
    """Float format of the plain path's update on the wire (sites cast, the coordinator
    upcasts to float32 before aggregating). Secure aggregation sends quantised integers
    instead; its size is ``secagg.modulus_bits``."""

    float32 = "float32"
    float16 = "float16"  # half the bytes; 11-bit mantissa, values beyond 65504 overflow
    bfloat16 = "bfloat16"  # half the bytes; float32's range, 8-bit mantissa


@dataclass
class FederationConfig:
    """Rounds and aggregation run by the coordinator."""

    # Phase-1 (self-supervised pretraining) rounds; train's schedules span them (train.schedule_rounds 0).
    # 0 (with finetune_rounds > 0): phase 2 only, on initial_encoder.
    rounds: int = 2
    # Phase 2 after the SSL rounds: federated progressive-freezing fine-tuning rounds on the
    # sites' labelled scans (``finetune:`` section); 0: no phase 2.
    finetune_rounds: int = 0
    # A checkpoint whose encoder is round 0's global model (a run's global_round_NNNN.safetensors,
    # or `ctfed pretrain`'s), e.g. to fine-tune an encoder pretrained elsewhere; "": a fresh
    # encoder from train.seed.
    initial_encoder: str = ""
    # How the coordinator combines the accepted site updates.
    strategy: Strategy = Strategy.fedavg
    # Share of the connected sites sampled for each round (Flower FedAvg's fraction_train; 1: all).
    fraction_train: float = 1.0
    # Fewest sites a round waits for and aggregates: fewer usable updates abort it. Sent to the
    # sites, whose policy.min_sites may refuse a smaller aggregate.
    min_sites: int = 2
    # Seconds the coordinator waits for site replies in one round, from when it sends them.
    # Deployed, a site's ClientApp processes are forked from one that imported the ClientApp
    # when the site started (client/clientapp_executor.py), and a simulation starts its sites'
    # workers before round 1 (simulation.warmup_timeout_s): either way it need only cover a
    # round's training and messages, not a process start per message.
    round_timeout_s: float = 600.0
    # A site update (weights minus the global weights) with a larger L2 norm is rejected:
    # far beyond what a few local optimiser steps can produce, so a bug or an attack.
    max_update_norm: float = 100.0
    # fedadam: the coordinator's Adam (Reddi et al. 2021, "Adaptive Federated Optimization").
    server_lr: float = 1e-2
    # fedadam: decay of the first-moment (mean) estimate.
    server_beta1: float = 0.9
    # fedadam: decay of the second-moment estimate.
    server_beta2: float = 0.99
    # fedadam: added to sqrt(v) in the denominator; bounds the step where v is tiny.
    server_tau: float = 1e-3
    # trimmed_mean: fraction of the site values dropped at each end, per coordinate.
    trim_fraction: float = 0.2
    # Plain path (secagg.enabled=false): float format of each site's update on the wire.
    transport: Transport = Transport.float32
    # Stop the run (status "failed", non-zero exit) after this many consecutive rounds that
    # aggregated nothing: the sites would go on training for a model that never changes.
    # 3 rides out a site restarting; 0: never stop.
    max_failed_rounds: int = 3

    def __post_init__(self) -> None:
        if self.rounds < 0 or (self.rounds == 0 and self.finetune_rounds <= 0):
            raise ConfigError("federation.rounds must be >= 1 (0 only with federation.finetune_rounds > 0: phase 2 alone)")
        if self.max_failed_rounds < 0:
            raise ConfigError(f"federation.max_failed_rounds must be >= 0 (0: never stop), got {self.max_failed_rounds}")
        if self.finetune_rounds < 0:
            raise ConfigError(f"federation.finetune_rounds must be >= 0 (0: no phase 2), got {self.finetune_rounds}")
        if self.server_lr <= 0 or self.server_tau <= 0:
            raise ConfigError("federation.server_lr and federation.server_tau must be > 0")
        if not (0 <= self.server_beta1 < 1 and 0 <= self.server_beta2 < 1):
            raise ConfigError("federation.server_beta1 and federation.server_beta2 must be in [0, 1)")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError("federation.trim_fraction must be in [0, 0.5)")
        if not self.max_update_norm > 0:
            raise ConfigError("federation.max_update_norm must be > 0")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError("federation.fraction_train must be in (0, 1]")
        if self.min_sites < 1:
            raise ConfigError("federation.min_sites must be >= 1")


@dataclass
class SecAggConfig:
    """Secure aggregation (SecAgg+ on ctfed's own round loop; see common/secagg.py).

    With ``enabled`` the coordinator only ever sees the sum of masked, quantised site
    deltas. ``num_shares`` is a site's neighbourhood size (itself included); any
    ``reconstruction_threshold`` of them can rebuild its masks if it drops out, and
    fewer learn nothing. Against a coordinator that deviates from the protocol the
    threshold must exceed 2/3 of the neighbourhood (Bonawitz et al. 2017), which sites
    enforce themselves (``SitePolicy.min_secagg_threshold_fraction``). Deltas are clipped
    to +-``clipping_range`` per value and quantised to ``quantization_range`` steps over
    [-c, c]; sums are taken modulo 2**``modulus_bits``.
    """

    # Rounds go through SecAgg+ (on by default: the coordinator never sees one site's update);
    # false: the plain path, each update in clear (needed by the robust strategies).
    enabled: bool = True
    # A site's neighbourhood size n in SecAgg+, itself included (>= 3): a larger one rides out
    # more drop-outs, at more key agreements and shares per site.
    num_shares: int = 5
    # 0: the smallest integer above 2/3 of each round's neighbourhood size n (4 of 5, 3 of 3
    # or 4, 2 of 2), so n - t neighbours may drop out. An explicit value is used as given;
    # sites refuse a round whose threshold is not above their floor (2/3 of n by default).
    reconstruction_threshold: int = 0
    # Per-value bound c of a delta before quantisation: values outside +-c are clipped.
    clipping_range: float = 1.0
    # Quantisation levels over [-c, c] (even): a step of 2c / range; 2**40 makes the rounding
    # error ~1e-12 and still fits max_sites x max_weight in a 64-bit sum.
    quantization_range: int = 2**40
    # Sums are taken modulo 2**modulus_bits (32 or 64): the size of each masked value on the wire.
    modulus_bits: int = 64
    # A site's weight is its number of training examples, capped here.
    max_weight: int = 4096
    # Most sites one secure round may include; with max_weight it bounds the modular sum.
    max_sites: int = 64
    # Seconds the coordinator waits for replies in each protocol stage after training.
    stage_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.num_shares < 3:
            raise ConfigError(f"secagg.num_shares must be >= 3, got {self.num_shares}")
        # A strict majority is the least that stops a coordinator telling one half of a
        # site's neighbours it dropped and the other half it survived. It is NOT enough
        # against a coordinator that deviates: that needs t > 2n/3 of the round's actual
        # neighbourhood n (Bonawitz et al. 2017), which each site checks itself before it
        # reveals anything (SitePolicy.min_secagg_threshold_fraction); the default (0) is
        # always above 2n/3.
        if self.reconstruction_threshold and not self.num_shares / 2 < self.reconstruction_threshold <= self.num_shares:
            raise ConfigError(
                f"secagg.reconstruction_threshold ({self.reconstruction_threshold}) must be more than half "
                f"of secagg.num_shares ({self.num_shares}) and at most num_shares (0: above 2/3, automatic)"
            )
        if not self.clipping_range > 0:
            raise ConfigError("secagg.clipping_range must be > 0")
        if self.modulus_bits not in (32, 64):
            raise ConfigError(f"secagg.modulus_bits must be 32 or 64, got {self.modulus_bits}")
        if self.quantization_range < 2 or self.quantization_range % 2:
            raise ConfigError("secagg.quantization_range must be an even integer >= 2")
        if self.max_weight < 1 or self.max_sites < 2:
            raise ConfigError("secagg.max_weight must be >= 1 and secagg.max_sites >= 2")
        # Each site adds weight * q with |q| <= quantization_range / 2; the signed sum must
        # stay inside (-2**(bits-1), 2**(bits-1)) or it wraps and the mean is garbage.
        worst_sum = self.max_sites * self.max_weight * (self.quantization_range // 2)
        if worst_sum >= 2 ** (self.modulus_bits - 1):
            fits = self.largest_quantization_range()
            advice = (
                f"the largest quantization_range that fits is {fits} (2**{fits.bit_length() - 1}, a step of "
                f"{2 * self.clipping_range / fits:.2g})" if fits else "no quantization_range fits"
            )
            raise ConfigError(
                f"secagg: max_sites * max_weight * quantization_range / 2 = {worst_sum} does not fit in "
                f"a signed {self.modulus_bits}-bit sum (limit 2**{self.modulus_bits - 1}); with max_sites="
                f"{self.max_sites} and max_weight={self.max_weight}, {advice}; lower quantization_range, "
                "max_weight or max_sites, or use modulus_bits=64"
            )
        if not self.stage_timeout_s > 0:
            raise ConfigError("secagg.stage_timeout_s must be > 0")

    def largest_quantization_range(self) -> int:
        """The largest power-of-two quantization_range whose worst-case signed sum fits in
        ``modulus_bits`` with ``max_sites`` sites of weight ``max_weight`` (0: none does)."""
        half = (2 ** (self.modulus_bits - 1) - 1) // (self.max_sites * self.max_weight)
        # quantization_range / 2 may be at most ``half``: the largest power of two below it, doubled.
        return 0 if half < 1 else 2 ** half.bit_length()
