"""The run folder: ``results.json`` after every round (with report.md and config.yaml beside
it, server/run_folder.py), and a checkpoint per round.

``results.json`` is rewritten atomically after each round, so a run that dies keeps every
round it finished. It holds only site ids chosen by the sites' IT, numbers and file names.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import torch
from omegaconf import OmegaConf

from ctfed.common.checkpoint import load_checkpoint, save_checkpoint
from ctfed.common.config import RunConfig, to_run_config
from ctfed.common.data_summary import card_data_summary, data_metrics_from
from ctfed.common.preprocess import preprocessing_plan
from ctfed.common.exchange import PRETRAIN_PHASE, STATUS_AGGREGATED, SiteReply, check_federation_id, new_federation_id
from ctfed.common.fileio import write_json_atomic
from ctfed.common.monitor import SECONDS_KEY as MONITOR_SECONDS_KEY, monitor_from_metrics
from ctfed.common.preprocess import SPLIT_DIR, SPLIT_SUMMARY
from ctfed.server.metrics_log import CSV_NAME, TENSORBOARD_DIR, TensorBoardLog, write_csv

RESULTS_NAME = "results.json"
CHECKPOINT_DIR = "checkpoints"
GLOBAL_PREFIX = "global_round_"
STRATEGY_PREFIX = "strategy_round_"
# Checkpoint card kinds: phase 1 saves the encoder, phase 2 the classifier (encoder + head).
GLOBAL_ENCODER_KIND = "global-encoder"
GLOBAL_CLASSIFIER_KIND = "global-classifier"

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=RunConfig)


class ResumeError(RuntimeError):
    """A run folder that cannot be continued; the message says why."""


class FederationStopped(RuntimeError):
    """The run stopped before completing (results.json: status "failed"); the message says why."""


# What a resubmission may change without an override: how many rounds the run has.
ROUND_COUNT_KEYS = ("federation.rounds", "federation.finetune_rounds")
# ``train.schedule_rounds`` 0 resolves to ``federation.rounds``: a resubmission with more
# rounds resolves it anew, but the run keeps the schedule it was started with.
DERIVED_SCHEDULE_KEY = "train.schedule_rounds"
OVERRIDE_HINT = "resume-override=true in the run config, or 'ctfed simulate --resume RUN --override-config'"


def config_values(cfg: RunConfig) -> dict[str, Any]:
    """The config as dotted keys -> values, as results.json holds it (lists stay whole)."""

    def flatten(prefix: str, node: Any) -> dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix: node}
        return {k: v for key, value in node.items() for k, v in flatten(f"{prefix}.{key}" if prefix else str(key), value).items()}

    return flatten("", OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True))


def config_changes(saved: RunConfig, submitted: RunConfig) -> dict[str, dict[str, Any]]:
    """Every dotted key whose value differs, ``{key: {"from": saved, "to": submitted}}``.

    A ``train.schedule_rounds`` that each side derived from its own ``federation.rounds``
    is not a change: it is the round count's shadow (and the run keeps its saved one).
    """
    old, new = config_values(saved), config_values(submitted)
    changes = {
        key: {"from": old.get(key), "to": new.get(key)}
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    }
    if (
        DERIVED_SCHEDULE_KEY in changes
        and saved.train.schedule_rounds == saved.federation.rounds
        and submitted.train.schedule_rounds == submitted.federation.rounds
    ):
        del changes[DERIVED_SCHEDULE_KEY]
    return changes


def describe_changes(changes: Mapping[str, Mapping[str, Any]]) -> str:
    return "\n".join(f"  {key}: {change['from']!r} -> {change['to']!r}" for key, change in changes.items())


def resumed_config(
    saved: RunConfig, submitted: RunConfig, override: bool = False, last_round: int = 0
) -> tuple[RunConfig, dict[str, dict[str, Any]]]:
    """The config a resumed run continues with, and what the submission changed.

    Without ``override`` that is the run's saved config with only the submission's round
    counts: a difference in anything else (secure aggregation, privacy, noise...) would
    silently change a running federation, so it raises ResumeError listing each change.
    With ``override`` the submission is taken as it is. The model can never change (the
    checkpoint is that model), nor the SSL round count once phase 2 has begun.
    """
    changes = config_changes(saved, submitted)
    model = {key: change for key, change in changes.items() if key.startswith("model.")}
    if model:
        raise ResumeError(
            "the run config's model differs from the checkpoint's run; a resumed run keeps its model:\n"
            + describe_changes(model)
        )
    if last_round > saved.federation.rounds and "federation.rounds" in changes:
        raise ResumeError(
            f"the run is in phase 2 (after round {last_round}; its SSL phase was federation.rounds="
            f"{saved.federation.rounds}): federation.rounds can no longer change"
        )
    if override:
        return submitted, changes
    refused = {key: change for key, change in changes.items() if key not in ROUND_COUNT_KEYS}
    if refused:
        raise ResumeError(
            "the submitted config differs from the run's saved config (results.json) in:\n"
            + describe_changes(refused)
            + "\nA resumed run continues with its saved config; only "
            + " and ".join(ROUND_COUNT_KEYS)
            + f" may change. Resubmit with the run's own config, or accept these changes with {OVERRIDE_HINT}."
        )
    federation = replace(
        saved.federation, rounds=submitted.federation.rounds, finetune_rounds=submitted.federation.finetune_rounds
    )
    return replace(saved, federation=federation), changes


def saved_run_config(run_dir: Path, schema: type[R] = RunConfig) -> R:  # type: ignore[assignment]
    """The config a run folder's results.json records, as ``schema`` (the root the run was
    started with: RunConfig for a coordinator, the simulation's root for ``ctfed simulate``);
    ResumeError when there is none."""
    results_path = run_dir / RESULTS_NAME
    if not results_path.is_file():
        raise ResumeError(f"nothing to resume: {results_path} does not exist")
    try:
        raw = json.loads(results_path.read_text(encoding="utf-8"))["config"]
        return to_run_config(raw, schema)
    except (ValueError, KeyError, TypeError) as err:  # ConfigError is a ValueError
        raise ResumeError(f"{results_path} holds no usable run config: {err}") from None


@dataclass
class SiteRoundRecord:
    site: str
    status: str  # common.exchange STATUS_*: aggregated, rejected, failed, refused, timeout, dropped, not-aggregated
    reason: str = ""
    num_examples: int = 0
    loss_first: float | None = None
    loss: float | None = None
    losses: list[float] = field(default_factory=list)
    train_seconds: float | None = None
    data_seconds: float | None = None  # of train_seconds, spent loading volumes and cropping
    bytes_received: int = 0
    # Local DP: the site's own epsilon after this round (its accountant, all rounds so far).
    epsilon: float | None = None
    # Peak resident memory of the site's training process so far (MB).
    peak_rss_mb: float | None = None
    # Secure aggregation: bytes the coordinator sent this site over all protocol stages,
    # and how many of its update values were clipped before quantisation.
    bytes_sent: int = 0
    clipped_values: int = 0
    # Phase 2: the site's fine-tuned model of this round on its held-out scans,
    # {task: {metric: {value, low, high}}} (AUROC, AP, balanced accuracy, F1), and
    # operating_point {value}: the site's Youden threshold there (common/metrics.py).
    evaluation: dict[str, dict[str, dict[str, float]]] | None = None
    # Phase 1: the site's data summary metrics (common/data_summary.py: counts and ranges only).
    data: dict[str, Any] | None = None
    # Phase 1: the representation monitor of the global encoder the site received this round,
    # on its labelled scans before local training (common/monitor.py): {knn_accuracy,
    # embedding_std, uniform_std, scans, k}; None when the site has no split labels, its
    # policy keeps the numbers, or monitor.enabled is false. Its seconds are not in train_seconds.
    monitor: dict[str, float | int] | None = None
    monitor_seconds: float | None = None


def site_record(reply: SiteReply, status: str, **fields: Any) -> SiteRoundRecord:
    """A site's outcome for one round from the reply it sent in clear (decoded leniently by
    ``SiteReply.from_metrics``: a site's metrics cannot crash the coordinator)."""
    return SiteRoundRecord(
        site=reply.site_id,
        status=status,
        num_examples=reply.num_examples,
        loss_first=reply.loss_first,
        loss=reply.loss,
        losses=list(reply.losses),
        train_seconds=reply.train_seconds,
        data_seconds=reply.data_seconds,
        epsilon=reply.epsilon,
        peak_rss_mb=reply.peak_rss_mb,
        evaluation=reply.evaluation,
        data=data_metrics_from(reply.aggregates) or None,
        monitor=monitor_from_metrics(reply.aggregates),
        monitor_seconds=_finite(reply.aggregates.get(MONITOR_SECONDS_KEY)),
        **fields,
    )


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def monitor_summary(sites: Sequence[SiteRoundRecord]) -> str:
    """One log line: each site's kNN accuracy and feature spread against the uniform spread."""
    parts = [
        f"{s.site} kNN {s.monitor['knn_accuracy']:.3f} std/uniform {s.monitor['embedding_std'] / s.monitor['uniform_std']:.3f} "
        f"({s.monitor['scans']} scans)"
        for s in sites
        if s.monitor
    ]
    return "; ".join(parts) or "no site reported one"


def loss_summary(sites: Sequence[SiteRoundRecord]) -> str:
    """One log line: the loss of each site in the aggregate, then who is not in it and why (a
    site that trained and dropped out of secure aggregation later has a loss, but its update
    is not in the model)."""
    kept = ", ".join(f"{s.site} {s.loss:.4f}" for s in sites if s.status == STATUS_AGGREGATED and s.loss is not None)
    left = ", ".join(f"{s.site} ({s.status})" for s in sites if s.status != STATUS_AGGREGATED)
    return (kept or "n/a") + (f"; not in the aggregate: {left}" if left else "")


@dataclass
class RoundRecord:
    round: int
    sites: list[SiteRoundRecord]
    aggregated: bool
    bytes_sent_per_site: int
    seconds: float
    checkpoint: str
    # Central DP: the coordinator's epsilon after this round, and the noise std it added.
    central_epsilon: float | None = None
    central_noise_std: float | None = None
    secure_aggregation: bool = False
    reason: str = ""  # why the round was not aggregated
    # common.exchange PRETRAIN_PHASE or FINETUNE_PHASE. Phase 2 also records the round's
    # plan (stage, trainable blocks top first) and how many parameter elements trained and
    # travelled back: the frozen part does not, so bytes per round shrink with it.
    phase: str = PRETRAIN_PHASE
    finetune_stage: str | None = None
    trainable_blocks: list[int] | None = None
    trainable_parameters: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RoundRecord":
        return cls(**{**raw, "sites": [SiteRoundRecord(**site) for site in raw["sites"]]})


def _saved_federation_id(saved: Mapping[str, Any], results_path: Path) -> str | None:
    """The federation id a results file records; None (a new one is made) for a run from
    before federation ids, whose sites hold no state on disk that a new id would miss."""
    if "federation_id" not in saved:
        logger.warning("%s records no federation_id (a run from before them): the resumed run gets a new one", results_path)
        return None
    try:
        return check_federation_id(saved["federation_id"], source=f"{results_path}'s federation_id")
    except ValueError as err:
        raise ResumeError(str(err)) from None


class RunRecorder:
    """Collects per-round records and keeps the run folder's files current."""

    def __init__(
        self,
        run_dir: Path,
        cfg: RunConfig,
        rounds: Sequence[RoundRecord] = (),
        earlier_wall_seconds: float = 0.0,
        resumes: Sequence[dict[str, Any]] = (),
        federation_id: str | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        # The federation's identity (common/exchange.py FEDERATION_ID_KEY): new with the run,
        # the same after every resume; sent every round, the sites key their local state by it.
        self.federation_id = federation_id or new_federation_id()
        self.rounds: list[RoundRecord] = list(rounds)
        self.started = time.time()
        self.earlier_wall_seconds = earlier_wall_seconds  # spent before the last resume
        self.resumes: list[dict[str, Any]] = list(resumes)
        self.status = "running"
        self.reason = ""  # why a run that stopped early did not complete
        # Rounds after this one are this process's: consecutive failures count from here.
        self.session_first_round = self.last_round + 1
        # Central DP: the coordinator's privacy ledger (PrivacyLedger.to_dict), kept current.
        self.central_privacy_ledger: dict[str, Any] | None = None
        # Strategy state to continue from (set by ``resume``; FedAdam's moments).
        self.strategy_state: dict[str, torch.Tensor] = {}
        self._tensorboard: TensorBoardLog | None = None  # opened with the first new round
        # A simulation on sites cut from a pooled cache: how they were cut (simulations/data/split.py).
        split_summary = run_dir / SPLIT_DIR / SPLIT_SUMMARY
        self.data_split: dict[str, Any] | None = (
            json.loads(split_summary.read_text(encoding="utf-8")) if split_summary.is_file() else None
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        self._config_written = False  # config.yaml, with the first results.json
        self._write()

    @property
    def last_round(self) -> int:
        return self.rounds[-1].round if self.rounds else 0

    @classmethod
    def resume(
        cls, run_dir: Path, cfg: RunConfig, override_config: bool = False
    ) -> tuple["RunRecorder", dict[str, torch.Tensor]]:
        """Continue a run folder after its last round with a verified checkpoint.

        Rounds recorded after that checkpoint (a crash between writing results and the
        checkpoint cannot produce one, but a hand-edited folder can) are dropped, so the
        results always describe the model the run continues from. The run continues with
        its saved config (``resumed_config``: ``cfg`` may change the round counts only,
        unless ``override_config``); ``recorder.cfg`` is the config to run with, and the
        resume's entry in ``resumes`` records what the submission changed.
        """
        saved_cfg = saved_run_config(run_dir, type(cfg))
        results_path = run_dir / RESULTS_NAME
        try:
            saved = json.loads(results_path.read_text(encoding="utf-8"))
            rounds = [RoundRecord.from_dict(r) for r in saved["rounds"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ResumeError(f"{results_path} is not a ctfed results file: {err}") from None
        while True:
            last = rounds[-1].round if rounds else 0
            weights = run_dir / CHECKPOINT_DIR / f"{GLOBAL_PREFIX}{last:04d}.safetensors"
            strategy_file = run_dir / CHECKPOINT_DIR / f"{STRATEGY_PREFIX}{last:04d}.safetensors"
            try:
                state, model_cfg, card = load_checkpoint(weights)
                strategy_state = load_checkpoint(strategy_file)[0] if strategy_file.exists() else {}
                break
            except (FileNotFoundError, ValueError) as err:
                if not rounds:
                    raise ResumeError(f"no usable checkpoint in {run_dir / CHECKPOINT_DIR}: {err}") from None
                logger.warning("round %d's checkpoint is unusable (%s); resuming from the round before", last, err)
                rounds.pop()
        cfg, changes = resumed_config(saved_cfg, cfg, override_config, last_round=last)
        if model_cfg != cfg.model:
            raise ResumeError(
                f"the run config's model differs from the checkpoint's ({weights.name}); resume with the run's own config"
            )
        if changes:
            what = "config changes accepted by override" if override_config else "new round counts"
            logger.warning("resume after round %d, %s:\n%s", last, what, describe_changes(changes))
        resumed = {
            "after_round": last, "checkpoint_sha256": card["sha256"], "time": time.time(),
            "config_changes": changes, "config_override": override_config,
        }
        recorder = cls(
            run_dir,
            cfg,
            rounds=rounds,
            earlier_wall_seconds=float(saved.get("wall_seconds", 0.0)),
            resumes=[*saved.get("resumes", []), resumed],
            federation_id=_saved_federation_id(saved, results_path),
        )
        # The coordinator's epsilon continues from the checkpoint we resume from, not from
        # results.json, which may describe a later round whose checkpoint was unusable.
        recorder.central_privacy_ledger = card.get("central_privacy_ledger")
        recorder.strategy_state = strategy_state
        recorder._write()
        return recorder, state

    @property
    def results_path(self) -> Path:
        return self.run_dir / RESULTS_NAME

    def save_global(
        self,
        server_round: int,
        state: dict[str, torch.Tensor],
        strategy_state: Mapping[str, torch.Tensor] | None = None,
        kind: str = GLOBAL_ENCODER_KIND,
        **card: Any,
    ) -> Path:
        """The global encoder after ``server_round``, with what a resume needs to continue:
        the coordinator's privacy ledger (in the card) and the strategy's state (FedAdam's
        moments, in ``strategy_round_NNNN.safetensors``), written before the weights so a
        verified weights file implies its strategy state is complete."""
        checkpoints = self.run_dir / CHECKPOINT_DIR
        if strategy_state:
            save_checkpoint(
                checkpoints / f"{STRATEGY_PREFIX}{server_round:04d}", strategy_state, self.cfg.model,
                round=server_round, kind="strategy-state", strategy=self.cfg.federation.strategy.value,
            )
        extra = {} if self.central_privacy_ledger is None else {"central_privacy_ledger": self.central_privacy_ledger}
        return save_checkpoint(
            checkpoints / f"{GLOBAL_PREFIX}{server_round:04d}", state, self.cfg.model,
            round=server_round, kind=kind, **card, **extra,
        )

    def data_summary(self, current: Sequence[SiteRoundRecord] = ()) -> dict[str, Any] | None:
        """The card's data summary: each site's latest reported data metrics (this round's
        ``current`` first, then earlier rounds); None before any site reported."""
        latest: dict[str, dict[str, Any]] = {}
        for site in [*current, *(s for r in reversed(self.rounds) for s in r.sites)]:
            if site.data and site.site not in latest:
                latest[site.site] = site.data
        if not latest:
            return None
        return card_data_summary(latest, {"as_configured": preprocessing_plan(self.cfg.preprocess)})

    def add_round(self, record: RoundRecord) -> None:
        self.rounds.append(record)
        self._write()
        write_csv(self.run_dir / CSV_NAME, self.rounds)
        if self._tensorboard is None:
            self._tensorboard = TensorBoardLog(self.run_dir / TENSORBOARD_DIR, first_round=record.round)
        self._tensorboard.add(record)

    def finish(self, status: str = "completed", reason: str = "") -> None:
        """Mark the run ended: ``completed``, or ``failed`` with the reason it stopped."""
        self.status, self.reason = status, reason
        self._write()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def stop_if_stalled(self, max_failed_rounds: int) -> None:
        """Raise FederationStopped after ``max_failed_rounds`` consecutive rounds (0: never)
        that aggregated nothing: the global model has not moved, and more rounds of the same
        federation would not move it either (e.g. secure aggregation that tolerates no dropout)."""
        streak = self.failed_streak()
        if max_failed_rounds and streak >= max_failed_rounds:
            last = self.rounds[-1]
            raise FederationStopped(
                f"stopped after round {last.round}: {streak} consecutive rounds aggregated nothing "
                f"(federation.max_failed_rounds={max_failed_rounds}); last reason: {last.reason or 'unknown'}"
            )

    def failed_streak(self) -> int:
        """Consecutive rounds at the end, run by this process, that aggregated nothing."""
        streak = 0
        for record in reversed(self.rounds):
            if record.round < self.session_first_round or record.aggregated:
                break
            streak += 1
        return streak

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            **({"reason": self.reason} if self.reason else {}),
            "federation_id": self.federation_id,
            "config": OmegaConf.to_container(OmegaConf.structured(self.cfg), enum_to_str=True),
            "wall_seconds": self.earlier_wall_seconds + time.time() - self.started,
            "resumes": self.resumes,
            "secure_aggregation": self.cfg.secagg.enabled,
            "rounds": [asdict(r) for r in self.rounds],
            **({} if self.central_privacy_ledger is None else {"central_privacy_ledger": self.central_privacy_ledger}),
            **({} if self.data_split is None else {"data_split": self.data_split}),
        }

    def _write(self) -> None:
        results = self.to_dict()
        write_json_atomic(self.results_path, results)
        # Imported here: the report reads this module's record types.
        from ctfed.server.run_folder import update_report, write_config

        if not self._config_written:  # a recorder's config never changes: once is enough
            write_config(self.run_dir, self.cfg)
            self._config_written = True
        update_report(self.run_dir, results)
