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

from ctfed.common.config import RunConfig, Strategy
from ctfed.common.exchange import (
    ARRAYS_KEY,
    METRICS_KEY,
    SITE_KEY,
    UpdateRejected,
    apply_delta,
    configs_to_record,
    record_bytes,
    record_to_state,
    state_to_record,
    update_norm,
)
from ctfed.common.model import ViTEncoder
from ctfed.server.results import RoundRecord, RunRecorder, SiteRoundRecord
from ctfed.server.secagg import run_secure_round

logger = logging.getLogger(__name__)


def initial_encoder_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """A freshly initialised encoder, reproducible from the run seed."""
    torch.manual_seed(cfg.train.seed)
    return {name: t.detach().clone() for name, t in ViTEncoder(cfg.model).state_dict().items()}


def build_strategy(cfg: RunConfig) -> FedAvg:
    if cfg.federation.strategy is not Strategy.FEDAVG:
        raise NotImplementedError(f"strategy {cfg.federation.strategy.value} is not available yet")
    return FedAvg(
        fraction_train=cfg.federation.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.federation.min_sites,
        min_available_nodes=cfg.federation.min_sites,
    )


def _site_id(reply: Message) -> str:
    site = reply.content.config_records.get(SITE_KEY)
    return str(site["site-id"]) if site and "site-id" in site else f"node-{reply.metadata.src_node_id}"


def _vet_replies(
    replies: list[Message], expected: dict[str, torch.Tensor], max_norm: float
) -> tuple[list[Message], list[SiteRoundRecord]]:
    """Keep replies whose updates are usable; record every site's outcome either way."""
    accepted: list[Message] = []
    records: list[SiteRoundRecord] = []
    for reply in replies:
        site = _site_id(reply)
        if reply.has_error():
            logger.warning("site %s failed this round: %s", site, reply.error.reason)
            records.append(SiteRoundRecord(site=site, status="failed", reason=reply.error.reason))
            continue
        try:
            update = record_to_state(reply.content[ARRAYS_KEY], expected=expected)
            norm = update_norm(update)
            if norm > max_norm:
                raise UpdateRejected(f"update norm {norm:.3g} exceeds federation.max_update_norm={max_norm:g}")
        except (UpdateRejected, KeyError) as err:
            logger.warning("rejected the update of site %s: %s", site, err)
            records.append(SiteRoundRecord(site=site, status="rejected", reason=str(err)))
            continue
        metrics = reply.content[METRICS_KEY]
        accepted.append(reply)
        records.append(
            SiteRoundRecord(
                site=site,
                status="aggregated",
                num_examples=int(metrics["num-examples"]),
                loss_first=float(metrics["loss-first"]),
                loss=float(metrics["loss"]),
                losses=[float(x) for x in metrics["losses"]],
                train_seconds=float(metrics["train-seconds"]),
                data_seconds=float(metrics["data-seconds"]),
                bytes_received=record_bytes(reply.content[ARRAYS_KEY]),
            )
        )
    records.sort(key=lambda record: record.site)
    return accepted, records


def run_federation(grid: Grid, cfg: RunConfig, run_dir: Path) -> RunRecorder:
    """Run ``cfg.federation.rounds`` SSL rounds; returns the recorder holding the results."""
    recorder = RunRecorder(run_dir, cfg)
    strategy = build_strategy(cfg)
    global_state = initial_encoder_state(cfg)
    arrays = state_to_record(global_state)
    recorder.save_global(0, global_state)
    total = cfg.federation.rounds
    for server_round in range(1, total + 1):
        started = time.perf_counter()
        instructions = configs_to_record(cfg.model, cfg.train)
        sent_bytes = record_bytes(arrays)
        messages = list(strategy.configure_train(server_round, arrays, instructions, grid))
        logger.info("[round %d/%d] sent the global encoder to %d sites", server_round, total, len(messages))
        if cfg.secagg.enabled:
            # Secure path (server/secagg.py): only the masked sum of site updates is seen.
            global_state = run_secure_round(grid, messages, global_state, cfg, server_round, recorder, started)
            arrays = state_to_record(global_state)
            continue
        replies = list(grid.send_and_receive(messages, timeout=cfg.federation.round_timeout_s))
        accepted, site_records = _vet_replies(replies, global_state, cfg.federation.max_update_norm)
        missing = len(messages) - len(replies)
        if missing:
            logger.warning("round %d: %d sites did not reply within %.0f s", server_round, missing, cfg.federation.round_timeout_s)

        aggregated: ArrayRecord | None = None
        if len(accepted) >= cfg.federation.min_sites:
            aggregated, _ = strategy.aggregate_train(server_round, accepted)
        if aggregated is None:
            logger.error(
                "round %d: only %d usable updates (need %d); the global encoder is unchanged",
                server_round, len(accepted), cfg.federation.min_sites,
            )
        else:
            # Replies are weighted-mean deltas; the new global model is the old one plus them.
            global_state = apply_delta(global_state, record_to_state(aggregated, expected=global_state))
            arrays = state_to_record(global_state)
        checkpoint = recorder.save_global(server_round, global_state)
        recorder.add_round(
            RoundRecord(
                round=server_round,
                sites=site_records,
                aggregated=aggregated is not None,
                bytes_sent_per_site=sent_bytes,
                seconds=time.perf_counter() - started,
                checkpoint=checkpoint.name,
            )
        )
        losses = ", ".join(f"{s.site} {s.loss:.4f}" for s in site_records if s.loss is not None)
        logger.info("[round %d/%d] done in %.1f s; loss per site: %s", server_round, total, time.perf_counter() - started, losses or "n/a")
    recorder.finish()
    return recorder
