"""The coordinator's round loop: send the global model, collect, vet, aggregate, record.

We drive rounds ourselves instead of ``Strategy.start`` so that every round is checkpointed
before the next begins, and every reply is vetted (names, shapes, finite values) before it
can reach the aggregate. Sampling and weighted averaging stay Flower's (``FedAvg``).

A run is ``federation.rounds`` SSL rounds on the encoder (phase 1, here) followed by
``federation.finetune_rounds`` fine-tuning rounds on a classifier (phase 2,
server/finetune_rounds.py); one round counter and one checkpoint series span both.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch
from flwr.serverapp import Grid

from ctfed.common.checkpoint import load_checkpoint
from ctfed.common.config import ConfigError, PrivacyMode, RunConfig
from ctfed.common.dp import PrivacyLedger
from ctfed.common.exchange import record_bytes, state_to_record
from ctfed.common.model import SSLModel, ViTEncoder, encoder_part, shared_head_state, split_shared_state
from ctfed.common.secagg import effective_num_shares, round_threshold
from ctfed.server.aggregation import GlobalUpdate
from ctfed.server.central_dp import CentralDP
from ctfed.server.collect import build_strategy, collect_round, round_instructions
from ctfed.server.finetune_rounds import run_finetune_rounds
from ctfed.server.results import FederationStopped, RoundRecord, RunRecorder, loss_summary, monitor_summary

logger = logging.getLogger(__name__)


def initial_encoder_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Round 0's encoder: ``federation.initial_encoder``'s, or a fresh one from the run seed."""
    torch.manual_seed(cfg.train.seed)
    fresh = ViTEncoder(cfg.model)
    if cfg.federation.initial_encoder:
        try:
            state = encoder_part(load_checkpoint(Path(cfg.federation.initial_encoder))[0])
        except (OSError, ValueError) as err:
            raise ConfigError(f"federation.initial_encoder: {err}") from None
        try:
            fresh.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ConfigError(
                f"federation.initial_encoder {cfg.federation.initial_encoder} is not an encoder of this run's model "
                f"config: {str(err).splitlines()[0]} ..."
            ) from None
    return {name: t.detach().clone() for name, t in fresh.state_dict().items()}


def initial_shared_heads(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The projection head every site builds from ``train.seed`` (after the encoder, as
    ``LocalTrainer`` does) and zero centres, under ``SHARED_HEAD_PREFIX``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = SSLModel(cfg.model)
    zeros = torch.zeros(1, cfg.model.head_prototypes)
    return shared_head_state(model.head, zeros, zeros.clone())


def initial_global_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Round 0's global state: the encoder, and with ``train.share_heads`` the heads after it."""
    state = initial_encoder_state(cfg)
    if cfg.train.share_heads:
        state.update(initial_shared_heads(cfg))
    return state


def _heads_card(cfg: RunConfig) -> dict[str, bool]:
    """The card entry of a checkpoint that carries the shared heads beside the encoder."""
    return {"shared_heads": True} if cfg.train.share_heads else {}


def with_shared_heads(cfg: RunConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A (resumed) global state made to match ``train.share_heads``: heads added from round 0's
    when the checkpoint has none, dropped when the run no longer shares them (logged)."""
    encoder, heads = split_shared_state(state)
    if cfg.train.share_heads and not heads:
        logger.warning("the checkpoint carries no shared heads; the sites start from the initial heads")
        return {**encoder, **initial_shared_heads(cfg)}
    if heads and not cfg.train.share_heads:
        logger.warning("train.share_heads=false: the checkpoint's shared heads are dropped, the sites keep their own")
        return encoder
    return state


def dropout_tolerance(cfg: RunConfig, sites: int) -> int:
    """How many of ``sites`` may drop out of a round, at any stage, and it still aggregates.

    Plain path: down to ``federation.min_sites``. Secure aggregation also needs every site's
    neighbourhood (fixed after training, from the sites that trained) to keep
    ``reconstruction_threshold`` live members when sites drop after that.
    """
    if not cfg.secagg.enabled:
        return max(0, sites - cfg.federation.min_sites)
    return _secure_tolerance(cfg.secagg.num_shares, cfg.secagg.reconstruction_threshold, cfg.federation.min_sites, sites)


def _secure_tolerance(num_shares: int, threshold: int, min_sites: int, sites: int) -> int:
    """``threshold`` 0 is the automatic one (above 2n/3 of each round's neighbourhood n),
    taken over the neighbourhood the round actually forms."""

    def survives(dropped: int) -> bool:
        left = sites - dropped
        # Dropped before the neighbourhoods form: they form from the sites that are left.
        formed = effective_num_shares(num_shares, left)
        at_training = left >= min_sites and formed >= round_threshold(threshold, formed)
        # Dropped after: each neighbourhood (formed from every site) must keep its threshold.
        full = effective_num_shares(num_shares, sites)
        later = left >= min_sites and full - dropped >= round_threshold(threshold, full)
        return at_training and later

    tolerated = 0
    while tolerated < sites and survives(tolerated + 1):
        tolerated += 1
    return tolerated


# The smallest SecAgg+ neighbourhood whose automatic threshold (above 2n/3, the sites' default
# floor) leaves room for a dropout: 3 of 4.
TOLERANT_SHARES, TOLERANT_THRESHOLD = 4, 0


def dropout_warning(cfg: RunConfig, sites: int) -> str | None:
    """A warning when secure aggregation with ``sites`` sites tolerates no dropout (None: it does)."""
    if not cfg.secagg.enabled or sites < 1 or dropout_tolerance(cfg, sites):
        return None
    sa = cfg.secagg
    advice = (
        "more sites: with the sites' default threshold floor (above 2/3 of a neighbourhood) a "
        "dropout needs neighbourhoods of 4 or more"
    )
    if _secure_tolerance(TOLERANT_SHARES, TOLERANT_THRESHOLD, cfg.federation.min_sites, sites):
        advice = f"secagg.num_shares={TOLERANT_SHARES} (automatic threshold), or more sites"
    return (
        f"secure aggregation over {sites} sites tolerates no dropout (secagg.num_shares={sa.num_shares}, "
        f"reconstruction_threshold={sa.reconstruction_threshold or 'automatic'}, federation.min_sites={cfg.federation.min_sites}): "
        f"a round any site drops out of aggregates nothing; use {advice}"
    )


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    run_dir: Path,
    resume: bool = False,
    override_config: bool = False,
    before_rounds: Callable[[Grid, RunConfig], None] | None = None,
) -> RunRecorder:
    """Run phase 1 and then phase 2 (if any); returns the recorder holding the results.

    With ``resume`` the run folder's last completed round is the starting point: its
    checkpoint becomes the global model (an encoder in phase 1, a classifier in phase 2)
    and the round counter continues after it, with the run's saved config (``cfg`` may
    change the round counts only, unless ``override_config``; server/results.py).
    After ``federation.max_failed_rounds`` consecutive rounds that aggregate nothing the
    run ends "failed" with the reason in results.json, and FederationStopped is raised.
    ``before_rounds(grid, cfg)`` (a simulation's site warm-up) runs once the run folder is set
    up, before the first round.
    """
    if resume:
        recorder, global_state = RunRecorder.resume(run_dir, cfg, override_config=override_config)
        cfg = recorder.cfg
        logger.info("resuming %s after round %d", run_dir, recorder.last_round)
    else:
        recorder = RunRecorder(run_dir, cfg)
        global_state = initial_global_state(cfg)
        recorder.save_global(0, global_state, **_heads_card(cfg))
    logger.info("federation id %s (the sites keep their local training state under it)", recorder.federation_id)
    central = None
    if cfg.privacy.mode is PrivacyMode.central:
        saved = recorder.central_privacy_ledger
        central = CentralDP(cfg.privacy.central, ledger=PrivacyLedger.from_dict(saved) if saved else None)
        recorder.central_privacy_ledger = central.ledger.to_dict()
    known_sites: dict[int, str] = {}
    if before_rounds is not None:  # e.g. a simulation's warm-up, once a resume's checks passed
        before_rounds(grid, cfg)
    try:
        if recorder.last_round < cfg.federation.rounds:
            global_state = run_pretraining(grid, cfg, recorder, global_state, central, known_sites)
        if cfg.federation.finetune_rounds:
            run_finetune_rounds(grid, cfg, recorder, global_state, central, known_sites)
    except FederationStopped as err:
        logger.error("the federation stopped: %s", err)
        recorder.finish("failed", str(err))
        raise
    recorder.finish()
    return recorder


# The global encoder while a secure round runs (park_global_state): beside results.json, removed
# after the round; a crash leaves it behind, and the next round overwrites it.
PARKED_GLOBAL = ".global_in_round.pt"


def park_global_state(run_dir: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` written to the run folder and mapped back from it: the same tensors, paged in
    only when read. While the sites train and the masked sum builds up the coordinator then
    holds no copy of the global encoder in memory (at 89M values that is 340 MB of the 2 GB
    goal, docs/benchmarks.md); the caller must drop its own references to ``state``."""
    path = run_dir / PARKED_GLOBAL
    torch.save(state, path)
    return torch.load(path, mmap=True, weights_only=True)


def unpark_global_state(run_dir: Path, state: dict[str, torch.Tensor], parked: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` in memory again: the tensors it still shares with ``parked`` (all of them when the
    round did not aggregate) copied; the file removed."""
    in_memory = {name: tensor.clone() if tensor is parked.get(name) else tensor for name, tensor in state.items()}
    (run_dir / PARKED_GLOBAL).unlink(missing_ok=True)
    return in_memory


def run_pretraining(
    grid: Grid,
    cfg: RunConfig,
    recorder: RunRecorder,
    global_state: dict[str, torch.Tensor],
    central: CentralDP | None,
    known_sites: dict[int, str],
) -> dict[str, torch.Tensor]:
    """Phase 1: SSL rounds after ``recorder.last_round`` up to ``federation.rounds``; returns the encoder."""
    strategy = build_strategy(cfg)
    updater = GlobalUpdate(cfg.federation, recorder.strategy_state)
    global_state = with_shared_heads(cfg, global_state)
    total = cfg.federation.rounds
    for server_round in range(recorder.last_round + 1, total + 1):
        started = time.perf_counter()
        instructions = round_instructions(cfg, server_round, federation_id=recorder.federation_id).to_record()
        arrays = state_to_record(global_state)
        messages = list(strategy.configure_train(server_round, arrays, instructions, grid))
        bytes_sent = record_bytes(arrays)
        del arrays  # the messages carry it; secure aggregation frees them once they are pushed
        logger.info("[round %d/%d] sent the global encoder to %d sites", server_round, total, len(messages))
        warning = dropout_warning(cfg, len(messages)) if server_round == recorder.session_first_round else None
        if warning:
            logger.warning(warning)
        parked = park_global_state(recorder.run_dir, global_state) if cfg.secagg.enabled else None
        if parked is not None:
            global_state = parked
        outcome = collect_round(grid, messages, global_state, cfg, strategy, server_round, known_sites, central)
        if outcome.mean_delta is None:
            logger.error("round %d: not aggregated (%s); the global encoder is unchanged", server_round, outcome.reason)
        else:
            # The combined site deltas; the strategy turns them into the next global model.
            global_state = updater.apply(global_state, outcome.mean_delta)
        if parked is not None:
            global_state = unpark_global_state(recorder.run_dir, global_state, parked)
            parked = None  # unmaps the file
        if central is not None:
            recorder.central_privacy_ledger = central.ledger.to_dict()
        checkpoint = recorder.save_global(
            server_round, global_state, updater.state(), data_summary=recorder.data_summary(outcome.sites),
            **_heads_card(cfg),
        )
        recorder.add_round(
            RoundRecord(
                round=server_round,
                sites=outcome.sites,
                aggregated=outcome.mean_delta is not None,
                bytes_sent_per_site=bytes_sent,
                seconds=time.perf_counter() - started,
                checkpoint=checkpoint.name,
                central_epsilon=central.epsilon() if central is not None else None,
                central_noise_std=outcome.central_noise_std,
                secure_aggregation=outcome.secure_aggregation,
                reason=outcome.reason,
            )
        )
        logger.info(
            "[round %d/%d] done in %.1f s; loss per site: %s",
            server_round, total, time.perf_counter() - started, loss_summary(outcome.sites),
        )
        if cfg.monitor.enabled:
            logger.info(
                "[round %d/%d] representation monitor of the encoder sent (global_round_%04d): %s",
                server_round, total, server_round - 1, monitor_summary(outcome.sites),
            )
        recorder.stop_if_stalled(cfg.federation.max_failed_rounds)
    return global_state
