"""The coordinator's round loop: send the global encoder, collect, vet, aggregate, record.

We drive rounds ourselves instead of ``Strategy.start`` so that every round is checkpointed
before the next begins, and every reply is vetted (names, shapes, finite values) before it
can reach the aggregate. Sampling and weighted averaging stay Flower's (``FedAvg``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ctfed.common.config import ROBUST_STRATEGIES, PrivacyMode, RunConfig
from ctfed.common.exchange import (
    ARRAYS_KEY,
    METRICS_KEY,
    MIN_SITES_KEY,
    PHASE_KEY,
    PRETRAIN_PHASE,
    REFUSAL_CODES,
    SECURE_AGGREGATION_KEY,
    SITE_KEY,
    STATUS_AGGREGATED,
    STATUS_FAILED,
    STATUS_REFUSED,
    STATUS_REJECTED,
    STATUS_TIMEOUT,
    UpdateRejected,
    configs_to_record,
    record_bytes,
    record_to_state,
    refusing_site,
    state_to_record,
    update_norm,
)
from ctfed.common.dp import PrivacyLedger
from ctfed.common.model import ViTEncoder
from ctfed.server.aggregation import GlobalUpdate, robust_combine
from ctfed.server.central_dp import CentralDP
from ctfed.server.results import RoundRecord, RunRecorder, SiteRoundRecord, site_record
from ctfed.server.secagg import run_secure_round

logger = logging.getLogger(__name__)


def initial_encoder_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """A freshly initialised encoder, reproducible from the run seed."""
    torch.manual_seed(cfg.train.seed)
    return {name: t.detach().clone() for name, t in ViTEncoder(cfg.model).state_dict().items()}


def build_strategy(cfg: RunConfig) -> FedAvg:
    """Flower's FedAvg samples the sites and takes the example-weighted mean for every
    strategy; what differs (robust combination, FedAdam's step) is in server/aggregation.py."""
    return FedAvg(
        fraction_train=cfg.federation.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.federation.min_sites,
        min_available_nodes=cfg.federation.min_sites,
    )


def _site_id(reply: Message, known_sites: dict[int, str]) -> str:
    """The site id a reply carries; error replies carry none, so use what the node said before."""
    node = reply.metadata.src_node_id
    if reply.has_content():
        site = reply.content.config_records.get(SITE_KEY)
        if site and "site-id" in site:
            known_sites[node] = str(site["site-id"])
    return known_sites.get(node, f"node-{node}")


def _vet_replies(
    replies: list[Message], expected: dict[str, torch.Tensor], max_norm: float, known_sites: dict[int, str]
) -> tuple[list[Message], list[SiteRoundRecord]]:
    """Keep replies whose updates are usable; record every site's outcome either way."""
    accepted: list[Message] = []
    records: list[SiteRoundRecord] = []
    for reply in replies:
        site = _site_id(reply, known_sites)
        if reply.has_error():
            reason = reply.error.reason or ""
            if reply.error.code in REFUSAL_CODES:
                site = refusing_site(reason) or site
                logger.warning("site %s refused this round: %s", site, reason)
                records.append(SiteRoundRecord(site=site, status=STATUS_REFUSED, reason=reason))
            else:
                logger.warning("site %s failed this round: %s", site, reason)
                records.append(SiteRoundRecord(site=site, status=STATUS_FAILED, reason=reason))
            continue
        try:
            update = record_to_state(reply.content[ARRAYS_KEY], expected=expected)
            norm = update_norm(update)
            if norm > max_norm:
                raise UpdateRejected(f"update norm {norm:.3g} exceeds federation.max_update_norm={max_norm:g}")
        except (UpdateRejected, KeyError) as err:
            logger.warning("rejected the update of site %s: %s", site, err)
            records.append(SiteRoundRecord(site=site, status=STATUS_REJECTED, reason=str(err)))
            continue
        accepted.append(reply)
        records.append(
            site_record(
                site, STATUS_AGGREGATED, reply.content.metric_records.get(METRICS_KEY, {}),
                bytes_received=record_bytes(reply.content[ARRAYS_KEY]),
            )
        )
    records.sort(key=lambda record: record.site)
    return accepted, records


def _missing_records(messages: list[Message], replies: list[Message], known_sites: dict[int, str]) -> list[SiteRoundRecord]:
    """A record for every sampled node that did not answer in time (named if seen before)."""
    answered = {reply.metadata.src_node_id for reply in replies}
    return [
        SiteRoundRecord(site=known_sites.get(node, f"node-{node}"), status=STATUS_TIMEOUT, reason="no reply before federation.round_timeout_s")
        for node in (m.metadata.dst_node_id for m in messages)
        if node not in answered
    ]


def _sample_rate(grid: Grid, messages: list[Message]) -> float:
    """Sites asked this round / sites available: the sampling rate central DP accounts for."""
    return len(messages) / max(len(list(grid.get_node_ids())), len(messages))


def run_federation(grid: Grid, cfg: RunConfig, run_dir: Path, resume: bool = False) -> RunRecorder:
    """Run ``cfg.federation.rounds`` SSL rounds; returns the recorder holding the results.

    With ``resume`` the run folder's last completed round is the starting point: its
    checkpoint becomes the global encoder and the round counter continues after it.
    """
    strategy = build_strategy(cfg)
    if resume:
        recorder, global_state = RunRecorder.resume(run_dir, cfg)
        logger.info("resuming %s after round %d", run_dir, recorder.last_round)
    else:
        recorder = RunRecorder(run_dir, cfg)
        global_state = initial_encoder_state(cfg)
        recorder.save_global(0, global_state)
    updater = GlobalUpdate(cfg.federation, recorder.strategy_state)
    arrays = state_to_record(global_state)
    central = None
    if cfg.privacy.mode is PrivacyMode.central:
        saved = recorder.central_privacy_ledger
        central = CentralDP(cfg.privacy.central, ledger=PrivacyLedger.from_dict(saved) if saved else None)
    max_update_norm = cfg.federation.max_update_norm
    if central is not None:
        max_update_norm = central.max_update_norm(max_update_norm)
        recorder.central_privacy_ledger = central.ledger.to_dict()
    total = cfg.federation.rounds
    known_sites: dict[int, str] = {}
    for server_round in range(recorder.last_round + 1, total + 1):
        started = time.perf_counter()
        instructions = configs_to_record(
            cfg.model, cfg.train, cfg.privacy,
            **{
                PHASE_KEY: PRETRAIN_PHASE,
                MIN_SITES_KEY: cfg.federation.min_sites,
                SECURE_AGGREGATION_KEY: cfg.secagg.enabled,
            },
        )
        sent_bytes = record_bytes(arrays)
        messages = list(strategy.configure_train(server_round, arrays, instructions, grid))
        logger.info("[round %d/%d] sent the global encoder to %d sites", server_round, total, len(messages))
        if cfg.secagg.enabled:
            # Secure path (server/secagg.py): only the masked sum of site updates is seen.
            global_state = run_secure_round(
                grid, messages, global_state, cfg, server_round, recorder, started, known_sites,
                central, _sample_rate(grid, messages), updater,
            )
            arrays = state_to_record(global_state)
            continue
        replies = list(grid.send_and_receive(messages, timeout=cfg.federation.round_timeout_s))
        accepted, site_records = _vet_replies(replies, global_state, max_update_norm, known_sites)
        missing = _missing_records(messages, replies, known_sites)
        if missing:
            logger.warning(
                "round %d: no reply within %.0f s from %s",
                server_round, cfg.federation.round_timeout_s, ", ".join(r.site for r in missing),
            )
            site_records = sorted(site_records + missing, key=lambda record: record.site)

        aggregated: ArrayRecord | None = None
        noise_std: float | None = None
        if len(accepted) >= cfg.federation.min_sites:
            if cfg.federation.strategy in ROBUST_STRATEGIES:
                updates = [record_to_state(r.content[ARRAYS_KEY], expected=global_state) for r in accepted]
                aggregated = state_to_record(robust_combine(cfg.federation.strategy, updates, cfg.federation))
            elif central is None:
                aggregated, _ = strategy.aggregate_train(server_round, accepted)
            else:
                updates = [record_to_state(r.content[ARRAYS_KEY], expected=global_state) for r in accepted]
                noisy_mean, noise_std = central.aggregate(updates, server_round, _sample_rate(grid, messages))
                aggregated = state_to_record(noisy_mean)
                recorder.central_privacy_ledger = central.ledger.to_dict()
        if aggregated is None:
            logger.error(
                "round %d: only %d usable updates (need %d); the global encoder is unchanged",
                server_round, len(accepted), cfg.federation.min_sites,
            )
        else:
            # The combined site deltas; the strategy turns them into the next global model.
            global_state = updater.apply(global_state, record_to_state(aggregated, expected=global_state))
            arrays = state_to_record(global_state)
        checkpoint = recorder.save_global(server_round, global_state, updater.state())
        recorder.add_round(
            RoundRecord(
                round=server_round,
                sites=site_records,
                aggregated=aggregated is not None,
                bytes_sent_per_site=sent_bytes,
                seconds=time.perf_counter() - started,
                checkpoint=checkpoint.name,
                central_epsilon=central.epsilon() if central is not None else None,
                central_noise_std=noise_std,
            )
        )
        losses = ", ".join(f"{s.site} {s.loss:.4f}" for s in site_records if s.loss is not None)
        logger.info("[round %d/%d] done in %.1f s; loss per site: %s", server_round, total, time.perf_counter() - started, losses or "n/a")
    recorder.finish()
    return recorder
