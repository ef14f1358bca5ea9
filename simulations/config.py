"""The simulation's own config sections and the root ``ctfed simulate`` composes.

``SimulationRunConfig`` extends the coordinator's ``RunConfig`` (ctfed.common.config) with
what only a simulation reads: synthetic hospitals (synth), the engine's resources, site
policies and injected faults (simulation), sites cut from a pooled cache (split), and the
studies run after the federation (compare, sweep). It is the Hydra schema
``simulate_schema`` (conf/simulate.yaml). Dependencies point toward common: nothing in
common, client or server imports this module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ctfed.common.config import (
    FINETUNE_MODES,
    SITE_ID_RULE,
    ConfigError,
    FinetuneConfig,
    NamedSitePolicy,
    RunConfig,
    SitePolicy,
    load_run_config,
    read_run_config,
    register_configs,
    synthetic_finetune,
    to_run_config,
)

SIMULATE_CONFIG_NAME = "simulate"  # conf/simulate.yaml


@dataclass
class SynthConfig:
    """Synthetic hospitals for simulations and demos."""

    # Synthetic hospitals to write, each with its own scanner and haemorrhage profile.
    sites: int = 3
    # CT studies per synthetic hospital (small: a demo federation runs in minutes).
    scans_per_site: int = 4
    # Sites of different sizes: one scan count per site (overrides scans_per_site); empty: all equal.
    scans_per_site_list: list[int] = field(default_factory=list)
    # Seed of every synthetic pixel, identifier and UID: the same seed writes identical files.
    seed: int = 0
    # Multiplies every synthetic finding's size (haematoma radii, collection widths, sulcal
    # lines, dilation of blood-filled ventricles). 1.0: realistic sizes, which at the tiny
    # model's 32^3 input blur into the skull's rim or a few voxels; the compare preset
    # enlarges them so the labels are learnable at that size (docs/simulate.md, "Comparing ...").
    finding_scale: float = 1.0
    # Chance per scan of each structural finding (simulations/data/phantom.py: not bright voxels,
    # each its own label column beside the haemorrhages and `any`), drawn independently of
    # each other and of the haemorrhages (whose rate each site's profile sets). 0.3 gives
    # every task positives and negatives at a few dozen scans; 0 leaves the pixels of a scan
    # without that finding exactly as they were.
    hydrocephalus_prevalence: float = 0.3
    # Chance per scan of mass effect (see hydrocephalus_prevalence).
    mass_effect_prevalence: float = 0.3
    # Chance per scan of an infarct.
    infarct_prevalence: float = 0.3
    # Chance per scan of a skull fracture.
    fracture_prevalence: float = 0.3
    # Chance per scan of atrophy.
    atrophy_prevalence: float = 0.3

    def __post_init__(self) -> None:
        if self.sites < 1 or self.scans_per_site < 1:
            raise ConfigError("synth.sites and synth.scans_per_site must be >= 1")
        if not self.finding_scale > 0:
            raise ConfigError(f"synth.finding_scale must be > 0 (1.0: realistic finding sizes), got {self.finding_scale}")
        for name, prevalence in self.structural_prevalence.items():
            if not 0.0 <= prevalence <= 1.0:
                raise ConfigError(f"synth.{name}_prevalence must be in [0, 1] (a chance per scan), got {prevalence}")
        if self.scans_per_site_list:
            if len(self.scans_per_site_list) != self.sites:
                raise ConfigError(
                    f"synth.scans_per_site_list has {len(self.scans_per_site_list)} entries for "
                    f"synth.sites={self.sites}; give one scan count per site"
                )
            if min(self.scans_per_site_list) < 1:
                raise ConfigError(f"synth.scans_per_site_list entries must be >= 1, got {list(self.scans_per_site_list)}")

    @property
    def scan_counts(self) -> list[int]:
        """Scans to write at each site, in site order."""
        return list(self.scans_per_site_list) or [self.scans_per_site] * self.sites

    @property
    def structural_prevalence(self) -> dict[str, float]:
        """{structural finding: prevalence}, the names simulations/data/phantom.py uses."""
        return {
            "hydrocephalus": self.hydrocephalus_prevalence,
            "mass_effect": self.mass_effect_prevalence,
            "infarct": self.infarct_prevalence,
            "fracture": self.fracture_prevalence,
            "atrophy": self.atrophy_prevalence,
        }


class FaultKind(str, enum.Enum):
    """Site failures a simulation can inject (the ``faults`` preset; tests of the round loop)."""

    crash = "crash"  # the ClientApp raises: the site dies mid-round
    nan_update = "nan_update"  # the update contains NaN (plain "nan" would parse as a float)
    huge_update = "huge_update"  # the update is scaled far beyond any real training step
    straggle = "straggle"  # the reply comes ``delay_s`` late (past the round timeout if long enough)


@dataclass
class FaultConfig:
    """One injected failure of one simulated site."""

    # Simulated site index (0 = the first site cache, as in results.json order of the caches).
    site: int = 0
    kind: FaultKind = FaultKind.crash
    # Rounds in which the fault happens (1-based); empty: every round.
    rounds: list[int] = field(default_factory=list)
    # STRAGGLE only: seconds the site waits before training.
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.site < 0:
            raise ConfigError("simulation.faults[].site must be >= 0")
        if any(r < 1 for r in self.rounds):
            raise ConfigError("simulation.faults[].rounds are 1-based round numbers")
        if self.kind is FaultKind.straggle and self.delay_s <= 0:
            raise ConfigError("a straggle fault needs delay_s > 0")


def ray_address_host_port(address: str) -> tuple[str, int] | None:
    """``simulation.ray_address`` as (host, port); None for "auto" (Ray finds the cluster).

    Raises ConfigError for anything else than "auto" or host:port, e.g. a Ray Client address
    (ray://), which Flower's simulation driver does not use."""
    if address == "auto":
        return None
    host, sep, port = address.rpartition(":")
    if address.startswith("ray://") or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"simulation.ray_address must be \"auto\" or the head's host:port (ray start --head --port PORT), "
            f"got {address!r}"
        )
    return host.strip("[]"), int(port)


@dataclass
class SimulationConfig:
    """Flower simulation engine resources."""

    # Folder holding one prepared cache per site (``<dir>/<site>/manifest.json``).
    # Empty: synthesise ``synth.sites`` hospitals and prepare them inside the run folder.
    data_dir: str = ""
    # CPU cores reserved per simulated site (Flower's client-resources.num-cpus; Ray runs as many sites at once as fit).
    client_cpus: int = 1
    # Sites that train at the same time: Ray is told the machine has concurrent_sites x
    # client_cpus cores (Flower's init-args.num-cpus); each site still runs client_cpus torch
    # threads. 0: as many as the cores fit (cores / client_cpus): on 2 cores, 3 equal sites
    # train two at once and the third after them, so a round takes two trainings while a core
    # idles half the time. 3 there shares the 2 cores among all 3 sites: 1.5 trainings per round,
    # at the memory of 3 site processes instead of 2.
    concurrent_sites: int = 0
    # GPU share of each simulated site (Flower's client-resources.num-gpus; Ray packs sites
    # onto GPUs by it): 0.5 runs two sites per GPU. 0: CPU only. With train.device=auto a site
    # that gets a share trains on its GPU.
    client_gpus: float = 0.0
    # The Ray cluster the simulated sites run on. "": a private Ray that the run starts on this
    # machine and stops after it (a RAY_ADDRESS in the environment is ignored). "host:port": an
    # existing cluster's head (`ray start --head --port PORT`); "auto": the cluster that
    # `ray start` last started on this machine. ctfed simulate must run on a node of that
    # cluster (Ray's driver joins its local node), and every node needs ctfed's venv and sees
    # the run folder and caches at the same paths (docs/simulate.md, "On a Ray cluster").
    # client_cpus and client_gpus still apply: Ray places each site on a node with them free;
    # concurrent_sites must stay 0 (a cluster's nodes declare their cores: ray start --num-cpus).
    ray_address: str = ""
    # Seconds to wait for the whole federation before giving up.
    timeout_s: float = 3600.0
    # Before round 1 the coordinator sends every site an empty query and waits up to this
    # long for the replies (server/collect.py warm_up_sites): the first message to a site
    # starts its Ray worker (~20 s idle, importing torch and ctfed), which then does not
    # count against round 1's federation.round_timeout_s. 0: no warm-up.
    warmup_timeout_s: float = 600.0
    # Injected site failures; any entry switches the simulated sites to the fault-injecting
    # ClientApp (simulations/runtime/faults.py), which deployed sites never run.
    faults: list[FaultConfig] = field(default_factory=list)
    # Every simulated site's policy (default: permissive; the coordinator is the researcher's
    # own, so the sites send the monitor on the plain path too), and whole replacements for
    # named sites (site = the cache folder's name), e.g.
    # simulation.site_policies=[{site:site_1,max_local_steps:1}]. A list, not a mapping,
    # because Hydra cannot add new keys to a mapping from the command line.
    site_policy: SitePolicy = field(default_factory=lambda: SitePolicy(share_monitor_on_plain_path=True))
    # The named replacements (see site_policy above).
    site_policies: list[NamedSitePolicy] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.warmup_timeout_s >= 0:
            raise ConfigError(f"simulation.warmup_timeout_s must be >= 0 (0: no warm-up), got {self.warmup_timeout_s}")
        if self.concurrent_sites < 0:
            raise ConfigError(f"simulation.concurrent_sites must be >= 0 (0: as many as the cores fit), got {self.concurrent_sites}")
        if self.client_cpus < 1 or self.client_gpus < 0:
            raise ConfigError(
                f"simulation.client_cpus must be >= 1 and simulation.client_gpus >= 0, got "
                f"{self.client_cpus} and {self.client_gpus}"
            )
        self.ray_address = self.ray_address.strip()
        if self.ray_address:
            ray_address_host_port(self.ray_address)  # raises a ConfigError naming what is wrong
            if self.concurrent_sites:
                raise ConfigError(
                    f"simulation.concurrent_sites={self.concurrent_sites} sets the cores of a private Ray; with "
                    f"simulation.ray_address={self.ray_address} the cluster's nodes declare theirs "
                    "(ray start --num-cpus): leave concurrent_sites at 0"
                )
        names = [p.site for p in self.site_policies]
        if any(not name for name in names):
            raise ConfigError("simulation.site_policies: every entry needs 'site' (the site id)")
        if len(set(names)) != len(names):
            raise ConfigError(f"simulation.site_policies names a site twice: {names}")

    def policy_for(self, site_id: str) -> SitePolicy:
        for named in self.site_policies:
            if named.site == site_id:
                return SitePolicy(**{f.name: getattr(named, f.name) for f in fields(SitePolicy)})
        return self.site_policy


class SplitMethod(str, enum.Enum):
    """How ``split`` divides a pooled cache into simulated sites."""

    iid = "iid"  # a seeded shuffle cut into near-equal parts
    dirichlet = "dirichlet"  # label skew: per class, site shares ~ Dir(alpha) (Hsu et al. 2019)
    by_site = "by_site"  # the natural split: each entry stays with the site it came from


@dataclass
class SplitConfig:
    """Simulated sites cut from one pooled prepared cache (``split.pooled_cache``).

    The pool is either one cache (``<dir>/manifest.json``, e.g. ``ctfed prepare`` on a whole
    archive) or a folder of caches (``<dir>/<site>/manifest.json``), whose entries then carry
    their origin site (needed by ``by_site``). Each simulated site gets a manifest view in
    the run folder that points at the pooled volumes; nothing is copied.
    """

    # Empty: no split (synthesise hospitals, or simulation.data_dir).
    pooled_cache: str = ""
    method: SplitMethod = SplitMethod.iid
    # Simulated sites for iid and dirichlet; by_site takes them from the pool (0, or their number).
    sites: int = 4
    # Dirichlet concentration: small -> each site sees few classes, large -> close to iid.
    alpha: float = 0.5
    # Manifest label column the Dirichlet split skews (entries without it form their own class).
    label: str = "any"
    # Seed of the shuffle (iid) and the Dirichlet draws.
    seed: int = 0
    # Fewest scans a site may get; a Dirichlet draw that leaves a site below it is redrawn.
    min_scans: int = 2
    # Dirichlet redraws before giving up with an error that says what to change.
    max_draws: int = 1000

    def __post_init__(self) -> None:
        if self.alpha <= 0:
            raise ConfigError(f"split.alpha must be > 0, got {self.alpha}")
        if self.min_scans < 1:
            raise ConfigError(f"split.min_scans must be >= 1, got {self.min_scans}")
        if self.max_draws < 1:
            raise ConfigError(f"split.max_draws must be >= 1, got {self.max_draws}")
        if self.method is SplitMethod.by_site:
            if self.sites < 0:
                raise ConfigError(f"split.sites must be >= 0 for by_site (0: one per origin site), got {self.sites}")
        elif self.sites < 1:
            raise ConfigError(f"split.sites must be >= 1 for split.method={self.method.value}, got {self.sites}")
        if not self.label.strip():
            raise ConfigError("split.label must name a manifest label column, e.g. 'any'")

    @property
    def enabled(self) -> bool:
        return bool(self.pooled_cache)


@dataclass
class CompareConfig:
    """The ``compare`` study: federated vs centralized vs local-only vs scratch encoders.

    With ``enabled``, ``ctfed simulate`` trains the other arms after the federation, on the same
    sites and the same pretraining budget, and fine-tunes every arm at every site
    (simulations/studies/compare.py). Targets are AUROC differences the verdicts are checked against.
    """

    # Run the compare study after the federation.
    enabled: bool = False
    # Downstream task; finetune.mode is the primary mode the verdicts use.
    finetune: FinetuneConfig = field(default_factory=synthetic_finetune)
    # Further fine-tuning modes reported as baselines (each costs one fine-tune per arm and site).
    baseline_modes: list[str] = field(default_factory=list)
    # Share of each site's labelled scans held out for testing, per class (stratified).
    test_fraction: float = 0.5
    # Seed of that split and of the bootstrap.
    split_seed: int = 0
    # Bootstrap resamples of every AUROC's confidence interval.
    n_boot: int = 1000
    # Neighbours of the kNN representation monitor (capped at the training scans of a site).
    knn_k: int = 3
    # Local-only pretraining at every site, or only at the smallest one.
    local_only_all_sites: bool = True
    # One more federation with the other train.teacher_on_new_global policy ("reset" vs
    # "keep"), evaluated like the federated arm: compare.md's "Teacher policy" section.
    teacher_policies: bool = False
    # Verdict targets in AUROC: pretrained must beat scratch, federated must beat local-only at
    # the smallest site, by more than these; centralized may lead federated by at most this.
    target_gain_over_scratch: float = 0.0
    # Federated over local-only at the smallest site, AUROC.
    target_gain_over_local_only: float = 0.0
    # Largest lead of centralized over federated, AUROC.
    max_gap_to_centralized: float = 0.05

    def __post_init__(self) -> None:
        unknown = [m for m in self.baseline_modes if m not in FINETUNE_MODES]
        if unknown:
            raise ConfigError(f"compare.baseline_modes must be among {', '.join(FINETUNE_MODES)}, got {unknown}")
        if self.finetune.mode in self.baseline_modes or len(set(self.baseline_modes)) != len(self.baseline_modes):
            raise ConfigError(
                f"compare.baseline_modes {list(self.baseline_modes)} must be unique and must not repeat "
                f"compare.finetune.mode '{self.finetune.mode}'"
            )
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"compare.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.n_boot < 1 or self.knn_k < 1:
            raise ConfigError("compare.n_boot and compare.knn_k must be >= 1")
        if self.max_gap_to_centralized < 0:
            raise ConfigError("compare.max_gap_to_centralized must be >= 0")

    @property
    def modes(self) -> list[str]:
        """Fine-tuning modes to run, the primary one first."""
        return [self.finetune.mode, *self.baseline_modes]


# label_efficiency.heads (simulations/studies/label_efficiency.py, Heads).
STUDY_HEADS = ("site", "pooled_labels", "federated_phase2")


def _study_finetune() -> FinetuneConfig:
    # 300 steps of batch 8 (120 head only, then 180): chosen on the tuning seed (few_label_finetune
    # --recipe study, docs/studies.md), where the pretrained encoder's best mode peaks at 300
    # with 8 and 24 labelled scans (100 gave 0.02-0.04 less at 24; scratch gains 0.02 more at 1,000).
    return FinetuneConfig(probe_steps=120, stage_steps=180, batch_size=8)


@dataclass
class LabelEfficiencyConfig:
    """The ``label_efficiency`` study: does a pretrained encoder pay off when labels are scarce?

    With ``enabled``, ``ctfed simulate`` first holds out each site's test and validation scans
    (the federation pretrains on the rest, without labels), then pretrains the centralized,
    local-only (smallest site) and local-DP arms on the same scans and budget, fine-tunes every
    arm at every site on a few labelled scans per level and tests on the held-out scans
    (simulations/studies/label_efficiency.py; docs/studies.md).
    """

    # Run the label-efficiency study (its federation pretrains without the held-out scans; excludes compare and sweep).
    enabled: bool = False
    # Binary tasks, columns of the sites' labels (one multi-label head learns them together);
    # empty: every label column the sites' scans carry.
    tasks: list[str] = field(default_factory=list)
    # Labelled scans per site, smallest first; nested (the first 4 are among the 8, ...).
    labels_per_site: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    # Share of each site's scans held out as its test split: never pretrained on, never used
    # for any choice (scans are ordered by content hash, then shuffled with split_seed).
    test_fraction: float = 0.5
    # Share of the remaining scans held out as validation: it picks each arm's fine-tuning mode
    # and draws the pretraining curve. The labelled scans of every level come from the rest.
    val_fraction: float = 0.2
    # Seed of the test/validation/labelled cut of each site and of the bootstrap.
    split_seed: int = 0
    # Fine-tuning modes tried per arm and level; the verdicts use each arm's best on validation.
    modes: list[str] = field(default_factory=lambda: ["linear_probe", "progressive", "full"])
    # The recipe (its label_names are replaced by the tasks); seed: the head's init and batches.
    finetune: FinetuneConfig = field(default_factory=_study_finetune)
    # Who fine-tunes a level's head, each judged on its own: "site" (every site its own head on
    # its own labelled scans, what a hospital does alone), "pooled_labels" (one head on every
    # site's labelled scans of the level: centralised fine-tuning, the ceiling of a federated
    # phase 2 that sees the same labels) and "federated_phase2" (that phase 2 itself: a Flower
    # federation of the sites fine-tunes one head, at phase2_levels only). Local-only, one
    # site's encoder, has neither of the last two.
    heads: list[str] = field(default_factory=lambda: ["site", "pooled_labels", "federated_phase2"])
    # Levels of the federated_phase2 heads: one federation per arm, level and phase2 mode.
    phase2_levels: list[int] = field(default_factory=lambda: [8])
    # Modes of those federations; each arm's best on its own validation predictions is judged,
    # as for the other heads. Not the pooled head's choice: the mode that suits a pooled head
    # need not suit a federation of few labels per site (docs/studies.md, session 15).
    phase2_modes: list[str] = field(default_factory=lambda: ["linear_probe", "progressive", "full"])
    # Head learning rates of those federations (finetune.head_lr; every mode is run with each,
    # and each arm's best mode and rate on its own validation is judged). A federation averages
    # three heads each fitted to 8 scans, and their steps partly cancel: on the tuning seed the
    # pretrained encoder's federated linear probe gained 0.10 validation AUROC from 1e-3 to 3e-2,
    # scratch's fully trained phase 2 lost 0.01-0.02 (docs/studies.md, session 16). One entry:
    # one federation per mode, named by the mode alone.
    phase2_head_lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-2])
    # Rounds of each of those federations; finetune's steps are split evenly over them (a site's
    # local steps per round), so a site trains as many steps as a pooled head does.
    phase2_rounds: int = 10
    # Processes the fine-tunes run in, one torch thread each (0: one per core). Each fine-tune is
    # seeded by the recipe alone, so the count changes the wall time, not a result.
    finetune_workers: int = 0
    # Overrides of one more federation, the local-DP arm, on the same scans and budget (empty: no
    # DP arm). Noise 3.5 keeps epsilon <= 8 at delta 1e-5 for 60 scans, batch 8, 1,200 steps
    # (the label_efficiency preset's smallest site).
    dp_overrides: list[str] = field(
        default_factory=lambda: ["privacy.mode=local", "privacy.local.noise_multiplier=3.5"]
    )
    # The DP arm's per-site budget: the study reports the ledger's epsilon against it.
    max_dp_epsilon: float = 8.0
    # Encoders along pretraining (federated: round checkpoints) probed on the validation split.
    curve_points: int = 6
    # Bootstrap resamples of every AUROC's confidence interval.
    n_boot: int = 1000
    # The level the targets are stated at (it must be one of labels_per_site).
    judged_labels_per_site: int = 8
    # Targets in AUROC (issue #11): pretrained beats scratch by more than target_gain_over_scratch
    # on at least min_tasks_beating_scratch tasks; federated beats local-only at the smallest
    # site; centralized leads federated by at most max_gap_to_centralized; DP costs at most
    # max_dp_cost; pretrained features beat the model-free probes on the structural tasks.
    target_gain_over_scratch: float = 0.05
    # Tasks on which pretrained must beat scratch.
    min_tasks_beating_scratch: int = 3
    # Federated over local-only at the smallest site, AUROC.
    target_gain_over_local_only: float = 0.0
    # Largest lead of centralized over federated, AUROC.
    max_gap_to_centralized: float = 0.02
    # Largest AUROC the local-DP arm may lose against the federated arm.
    max_dp_cost: float = 0.05
    # Pretrained features over the model-free probes on the structural tasks, AUROC.
    target_gain_over_model_free: float = 0.0

    def __post_init__(self) -> None:
        for name, allowed in (("modes", FINETUNE_MODES), ("phase2_modes", FINETUNE_MODES), ("heads", STUDY_HEADS)):
            values = list(getattr(self, name))
            if not values or any(v not in allowed for v in values) or len(set(values)) != len(values):
                raise ConfigError(f"label_efficiency.{name} must be unique entries of {', '.join(allowed)}, got {values}")
        levels = list(self.labels_per_site)
        if not levels or levels != sorted(set(levels)) or levels[0] < 1:
            raise ConfigError(f"label_efficiency.labels_per_site must be increasing counts >= 1, got {levels}")
        if "federated_phase2" in self.heads and (not self.phase2_levels or not set(self.phase2_levels) <= set(levels)):
            raise ConfigError(f"label_efficiency.phase2_levels must be levels of labels_per_site {levels}, got {list(self.phase2_levels)}")
        rates = list(self.phase2_head_lrs)
        if not rates or any(not rate > 0 for rate in rates) or len(set(rates)) != len(rates):
            raise ConfigError(f"label_efficiency.phase2_head_lrs must be distinct learning rates > 0, got {rates}")
        if not 1 <= self.phase2_rounds <= self.finetune.total_steps:
            raise ConfigError(
                f"label_efficiency.phase2_rounds must be in [1, finetune's {self.finetune.total_steps} steps], got {self.phase2_rounds}"
            )
        if self.judged_labels_per_site not in levels:
            raise ConfigError(
                f"label_efficiency.judged_labels_per_site ({self.judged_labels_per_site}) must be one of labels_per_site {levels}"
            )
        for name in ("test_fraction", "val_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"label_efficiency.{name} must be in (0, 1), got {getattr(self, name)}")
        if self.finetune_workers < 0:
            raise ConfigError(f"label_efficiency.finetune_workers must be >= 0 (0: one per core), got {self.finetune_workers}")
        if self.curve_points < 2 or self.n_boot < 1 or self.min_tasks_beating_scratch < 1:
            raise ConfigError("label_efficiency.curve_points must be >= 2, n_boot and min_tasks_beating_scratch >= 1")
        if min(self.max_gap_to_centralized, self.max_dp_cost) < 0 or not self.max_dp_epsilon > 0:
            raise ConfigError("label_efficiency.max_gap_to_centralized and max_dp_cost must be >= 0, max_dp_epsilon > 0")


@dataclass
class SweepArm:
    """One federation of a sweep: a name and the overrides that make it differ from the base run."""

    # The arm's name in the tables and its folder name (letters, digits, '.', '_', '-').
    name: str = ""
    # Dotlist overrides of the base config, e.g. privacy.mode=local (federation, train, privacy, secagg only).
    overrides: list[str] = field(default_factory=list)


@dataclass
class SweepConfig:
    """The ``privacy`` study (or any sweep): after the base federation, one more federation per
    arm on the same site caches, each fine-tuned and tested at every site as in ``compare``
    (its ``compare.finetune`` settings), epsilon against AUROC in sweep.md
    (simulations/studies/sweep.py)."""

    # Run the sweep's arms after the base federation.
    enabled: bool = False
    # Name of the base run's arm in the tables.
    base_name: str = "base"
    # One extra federation each (the privacy preset lists them).
    arms: list[SweepArm] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [self.base_name, *(arm.name for arm in self.arms)]
        bad = [n for n in names if not SITE_ID_RULE.match(n)]
        if bad:
            raise ConfigError(f"sweep arm names become folder names; use letters, digits, '.', '_' or '-': {bad}")
        if len(set(names)) != len(names):
            raise ConfigError(f"sweep arm names must be unique (the base is '{self.base_name}'): {names}")
        for arm in self.arms:
            forbidden = [o for o in arm.overrides if o.split("=", 1)[0].split(".")[0] in ("model", "synth", "simulation", "sweep", "compare")]
            if forbidden:
                raise ConfigError(
                    f"sweep arm '{arm.name}': {forbidden} would change what the arms are compared on; "
                    "an arm may change federation, train, privacy and secagg settings"
                )


@dataclass
class SimulationRunConfig(RunConfig):
    """Everything one ``ctfed simulate`` run needs; written to the run folder (config.yaml)
    and, by the simulation's ServerApp, into results.json."""

    synth: SynthConfig = field(default_factory=SynthConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    # Sites cut from one pooled cache (empty split.pooled_cache: off).
    split: SplitConfig = field(default_factory=SplitConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    label_efficiency: LabelEfficiencyConfig = field(default_factory=LabelEfficiencyConfig)
    # A new simulation-only section (e.g. a study beside compare) goes here, its dataclass
    # above, and its name into common's SIMULATION_SECTIONS (tests/unit/test_config_loading.py checks both
    # agree), so that a coordinator still reads the files this root writes.

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.label_efficiency.enabled and (self.compare.enabled or self.sweep.enabled):
            # The study's federation pretrains without the held-out scans; compare's and the
            # sweep's federations pretrain on whole caches, so they cannot share it.
            raise ConfigError("label_efficiency.enabled runs its own arms; turn off compare.enabled and sweep.enabled")
        simulated_sites = self._simulated_sites()
        if self.secagg.enabled and simulated_sites and simulated_sites > self.secagg.max_sites:
            raise ConfigError(
                f"{simulated_sites} simulated sites exceed secagg.max_sites={self.secagg.max_sites}, which the "
                "quantisation bound is sized for; raise secagg.max_sites (with modulus_bits=32, lower "
                "quantization_range to fit)"
            )
        if self.split.enabled and self.simulation.data_dir:
            raise ConfigError(
                "split.pooled_cache and simulation.data_dir both name the sites' data; set one of them"
            )
        if self.split.enabled and self.split.method is not SplitMethod.by_site:
            beyond = sorted({f.site for f in self.simulation.faults if f.site >= self.split.sites})
            if beyond:
                raise ConfigError(f"simulation.faults name sites {beyond}, but split.sites is {self.split.sites}")
        elif not self.simulation.data_dir and not self.split.enabled:
            beyond = sorted({f.site for f in self.simulation.faults if f.site >= self.synth.sites})
            if beyond:
                raise ConfigError(f"simulation.faults name sites {beyond}, but synth.sites is {self.synth.sites}")

    def _simulated_sites(self) -> int:
        """Sites ``ctfed simulate`` will run, when the config alone says (0: not known here)."""
        if self.simulation.data_dir:
            return 0
        if self.split.enabled:
            return 0 if self.split.method is SplitMethod.by_site else self.split.sites
        return self.synth.sites


def register_simulation_configs() -> None:
    """Make the simulation's root known to Hydra as ``simulate_schema`` (idempotent)."""
    register_configs()
    ConfigStore.instance().store(name="simulate_schema", node=SimulationRunConfig)


def load_simulation_config(overrides: Sequence[str] = (), config_name: str = SIMULATE_CONFIG_NAME) -> SimulationRunConfig:
    """Compose ``conf/simulate.yaml`` (or another root over ``simulate_schema``) with overrides."""
    register_simulation_configs()
    return load_run_config(overrides, config_name, SimulationRunConfig)


def to_simulation_config(cfg: DictConfig | dict) -> SimulationRunConfig:
    """Validate a composed or saved simulation config (results.json ``config``, an arm's merge)."""
    return to_run_config(cfg, SimulationRunConfig)


def with_overrides(base: SimulationRunConfig, overrides: Sequence[str], what: str) -> SimulationRunConfig:
    """``base`` with Hydra-style dot-list ``overrides``, validated; a bad override is a one-line
    ConfigError that starts with ``what`` and the overrides."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), OmegaConf.from_dotlist(list(overrides)))
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"{what} {list(overrides)}: {str(err).splitlines()[0]}") from None
    try:
        return to_simulation_config(merged)
    except ConfigError as err:
        raise ConfigError(f"{what} {list(overrides)}: {err}") from None


def read_simulation_config(path: Path) -> SimulationRunConfig:
    """A run folder's config.yaml (or any saved simulation config)."""
    return read_run_config(path, SimulationRunConfig)
