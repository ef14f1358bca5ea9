"""The run root the coordinator reads (``RunConfig``) and its cross-section rules.

Simulation-only sections (synthetic hospitals, faults, splits, studies) are not here: they
live in ``ctfed.simulations.config``, whose ``SimulationRunConfig`` extends this root.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ctfed.common.config.errors import ConfigError
from ctfed.common.config.federation import ROBUST_STRATEGIES, FederationConfig, SecAggConfig, Strategy, Transport
from ctfed.common.config.travel import (
    FinetuneConfig,
    ModelConfig,
    MonitorConfig,
    PreprocessConfig,
    PrivacyConfig,
    PrivacyMode,
    TrainConfig,
)


def synthetic_finetune() -> FinetuneConfig:
    """The fine-tuning task of the synthetic hospitals (label "any"); also compare's default."""
    # The synthetic hospitals' labels.csv has one column per finding plus "any".
    return FinetuneConfig(label_names=["any"])


@dataclass
class RunConfig:
    """Everything the coordinator's run needs: what travels to the sites, the federation and
    secure aggregation, and the rules between them. ``ctfed simulate`` extends it with its own
    sections (``ctfed.simulations.config.SimulationRunConfig``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    # Phase 2 (federation.finetune_rounds > 0): the downstream task and its recipe. Label
    # names are columns of the sites' labels.csv (the synthetic hospitals: findings and "any").
    finetune: FinetuneConfig = field(default_factory=synthetic_finetune)
    # Phase 1: each site's kNN / feature-spread monitor of the global encoder, every round
    # (its split and features follow ``finetune``: label_names, test_fraction, split_seed, pooling).
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    # Parent folder for run folders; each run gets ``<output_dir>/<run_name>``.
    output_dir: str = "runs"
    # `ctfed simulate`'s run folder name under output_dir (empty: sim-<timestamp>); a deployed
    # ServerApp names its own (flwr-run-<timestamp>) unless its run config gives a folder.
    run_name: str = ""

    def __post_init__(self) -> None:
        # Training crops are resized to model.image_size, so a larger cache works with any
        # model; a smaller one would only upsample what the cache already lost.
        if self.preprocess.output_size < self.model.image_size:
            raise ConfigError(
                f"preprocess.output_size ({self.preprocess.output_size}) is smaller than "
                f"model.image_size ({self.model.image_size}); prepare caches at least that large"
            )
        if len(self.preprocess.windows) != self.model.in_channels:
            raise ConfigError(
                f"model.in_channels ({self.model.in_channels}) must equal the number of "
                f"preprocess.windows ({len(self.preprocess.windows)})"
            )
        if self.train.schedule_rounds == 0:
            self.train.schedule_rounds = self.federation.rounds
        self._check_strategy()
        if self.federation.transport is not Transport.float32 and self.secagg.enabled:
            raise ConfigError(
                f"federation.transport={self.federation.transport.value} compresses the plain path's updates; with "
                "secure aggregation the sites send quantised integers: use secagg.modulus_bits=32 to halve them "
                "(or secagg.enabled=false)"
            )
        self._check_finetune_rounds()

    def _check_finetune_rounds(self) -> None:
        if not self.federation.finetune_rounds:
            return
        if self.privacy.mode is PrivacyMode.local:
            raise ConfigError(
                "federation.finetune_rounds > 0 with privacy.mode=local: per-volume DP-SGD is implemented for SSL "
                "pretraining only; use privacy.mode=central or none for phase 2"
            )
        if self.federation.strategy is Strategy.fedprox:
            raise ConfigError(
                "federation.strategy=fedprox has no proximal term in phase-2 fine-tuning; "
                "use fedavg or fedadam with federation.finetune_rounds > 0"
            )

    def _check_strategy(self) -> None:
        strategy = self.federation.strategy
        if strategy in ROBUST_STRATEGIES and self.secagg.enabled:
            raise ConfigError(
                f"federation.strategy={strategy.value} needs every site's update, which secure aggregation hides; "
                "set secagg.enabled=false or use fedavg, fedprox or fedadam"
            )
        if strategy in ROBUST_STRATEGIES and self.privacy.mode is PrivacyMode.central:
            raise ConfigError(f"central DP calibrates its noise to a uniform mean; it cannot follow {strategy.value}")
        if self.privacy.mode is PrivacyMode.distributed and not (self.secagg.enabled and self.secagg.modulus_bits == 64):
            raise ConfigError(
                "privacy.mode=distributed adds each site's noise under secure aggregation's masks: it needs "
                "secagg.enabled=true and secagg.modulus_bits=64 (the noisy integer sum must not wrap)"
            )
        if strategy is Strategy.fedprox and self.train.proximal_mu <= 0:
            raise ConfigError("federation.strategy=fedprox needs train.proximal_mu > 0 (e.g. 0.01)")
        if self.train.proximal_mu > 0 and self.privacy.mode is PrivacyMode.local:
            raise ConfigError("train.proximal_mu is not available with local DP-SGD (per-volume clipping)")
        if self.train.koleo_weight > 0 and self.privacy.mode is PrivacyMode.local:
            raise ConfigError(
                "train.koleo_weight > 0 is not available with local DP-SGD: KoLeo couples the volumes of a batch "
                "(each is pushed from its nearest neighbour), so there is no per-volume gradient to clip; "
                "set train.koleo_weight=0 with privacy.mode=local"
            )
