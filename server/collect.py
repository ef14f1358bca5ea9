"""One round's collection, shared by both phases: send, collect, vet, combine into a mean delta.

Whatever a round exchanges (phase 1: the whole encoder; phase 2: the classifier's trainable
part), ``collect_round`` turns the sites' replies into one combined delta over exactly the
names of ``like``, by the configured path: secure aggregation (server/secagg.py: only the
masked sum is seen), or plain vetted replies combined by FedAvg / a robust rule / central DP.
What the delta does to the global model (FedAvg step, FedAdam) is the caller's business.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Mapping

import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ctfed.common.config import ROBUST_STRATEGIES, RunConfig, Transport
from ctfed.common.exchange import (
    ARRAYS_KEY,
    FINETUNE_PHASE,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    PRETRAIN_PHASE,
    REFUSAL_CODES,
    IncompatibleProtocol,
    RoundInstructions,
    SiteReply,
    STATUS_AGGREGATED,
    STATUS_DROPPED,
    STATUS_FAILED,
    STATUS_REFUSED,
    STATUS_REJECTED,
    STATUS_TIMEOUT,
    WARMUP_MESSAGE_TYPE,
    UpdateRejected,
    decode_update,
    record_bytes,
    record_to_state,
    refusing_site,
    state_to_record,
    update_norm,
)
from ctfed.common.finetune import FinetuneRoundPlan
from ctfed.server.aggregation import robust_combine
from ctfed.server.central_dp import CentralDP
from ctfed.server.results import SiteRoundRecord, site_record
from ctfed.server.replies import LOST_REASON, destinations, replying_node, site_lost
from ctfed.server.secagg import secure_round

logger = logging.getLogger(__name__)


def round_instructions(
    cfg: RunConfig, server_round: int, plan: FinetuneRoundPlan | None = None, plan_local_steps: int = 0,
    federation_id: str = "",
) -> RoundInstructions:
    """The one builder of a round's instructions, for both phases: phase 1 (no ``plan``) with
    the representation monitor's settings, phase 2 with the recipe and the round's plan.
    ``federation_id``: the run's (``RunRecorder.federation_id``), under which the sites keep
    their local training state across a resume."""
    monitor_on = plan is None and cfg.monitor.enabled
    return RoundInstructions(
        server_round=server_round,
        model=cfg.model,
        train=cfg.train,
        privacy=cfg.privacy,
        phase=PRETRAIN_PHASE if plan is None else FINETUNE_PHASE,
        min_sites=cfg.federation.min_sites,
        secure_aggregation=cfg.secagg.enabled,
        transport=cfg.federation.transport,
        monitor=cfg.monitor if plan is None else None,
        finetune=cfg.finetune if plan is not None or monitor_on else None,
        plan=plan,
        plan_local_steps=plan_local_steps,
        federation_id=federation_id,
    )


def build_strategy(cfg: RunConfig) -> FedAvg:
    """Flower's FedAvg samples the sites and takes the example-weighted mean for every
    strategy; what differs (robust combination, FedAdam's step) is in server/aggregation.py."""
    return FedAvg(
        fraction_train=cfg.federation.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.federation.min_sites,
        min_available_nodes=cfg.federation.min_sites,
    )


def _arrays_and_weights(replies: list[Message]) -> list[Message]:
    """What FedAvg needs of each accepted reply: its arrays and its example count.

    Flower refuses to aggregate replies whose MetricRecords have different keys, and sites
    legitimately report different metrics (a site whose labels cannot be split sends no
    representation monitor; a site's policy may keep its data summary). Every site's metrics
    are already in its SiteRoundRecord, so the strategy gets only the weight.
    """
    for reply in replies:
        metrics = reply.content.metric_records[METRICS_KEY]
        reply.content[METRICS_KEY] = MetricRecord({NUM_EXAMPLES_KEY: metrics[NUM_EXAMPLES_KEY]})
    return replies


def decode_reply(content: RecordDict, node: int, known_sites: dict[int, str]) -> SiteReply:
    """A site's reply content, decoded once (IncompatibleProtocol: another or no protocol
    version); the site id it names is remembered for its later error replies."""
    reply = SiteReply.from_records(content, fallback_site_id=known_sites.get(node, f"node-{node}"))
    known_sites[node] = reply.site_id
    return reply


def vet_replies(
    replies: list[Message],
    expected: Mapping[str, torch.Tensor],
    max_norm: float,
    known_sites: dict[int, str] | None = None,
    transport: Transport = Transport.float32,
    sent_to: Mapping[str, int] | None = None,
) -> tuple[list[Message], list[SiteRoundRecord]]:
    """Keep replies whose updates are usable; record every site's outcome either way.

    An update must arrive in the round's ``transport`` format; an accepted reply's arrays
    are replaced by their float32 form, so every combination rule downstream sees float32.
    Accepted replies come in site order, not arrival order: float sums depend on the order
    of their terms, and a rerun's replies arrive in another. ``sent_to``
    (``destinations``) names the node of each reply, the SuperLink's own ones included."""
    known_sites = {} if known_sites is None else known_sites
    sent_to = {} if sent_to is None else sent_to
    accepted: list[tuple[str, Message]] = []
    records: list[SiteRoundRecord] = []
    for reply in replies:
        node = replying_node(reply, sent_to)
        site = known_sites.get(node, f"node-{node}")
        if site_lost(reply):
            logger.warning("site %s dropped out: %s", site, LOST_REASON)
            records.append(SiteRoundRecord(site=site, status=STATUS_DROPPED, reason=LOST_REASON))
            continue
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
            decoded = decode_reply(reply.content, node, known_sites)
        except IncompatibleProtocol as err:
            logger.warning("rejected the reply of %s: %s", site, err)
            records.append(SiteRoundRecord(site=site, status=STATUS_REJECTED, reason=str(err)))
            continue
        site = decoded.site_id
        try:
            sent = reply.content[ARRAYS_KEY]
            update = decode_update(sent, expected, transport)
            norm = update_norm(update)
            if norm > max_norm:
                raise UpdateRejected(f"update norm {norm:.3g} exceeds federation.max_update_norm={max_norm:g}")
            examples = reply.content.metric_records.get(METRICS_KEY, {}).get(NUM_EXAMPLES_KEY)
            if isinstance(examples, bool) or not isinstance(examples, (int, float)) or not examples > 0:
                # FedAvg weighs by it: without a positive count the update cannot be combined.
                raise UpdateRejected(f"reply carries no positive '{NUM_EXAMPLES_KEY}' metric (got {examples!r})")
        except (UpdateRejected, KeyError) as err:
            logger.warning("rejected the update of site %s: %s", site, err)
            records.append(SiteRoundRecord(site=site, status=STATUS_REJECTED, reason=str(err)))
            continue
        reply.content[ARRAYS_KEY] = state_to_record(update)
        accepted.append((site, reply))
        records.append(site_record(decoded, STATUS_AGGREGATED, bytes_received=record_bytes(sent)))
    records.sort(key=lambda record: record.site)
    accepted.sort(key=lambda pair: pair[0])
    return [reply for _, reply in accepted], records


def warm_up_sites(grid: Grid, timeout_s: float) -> set[int]:
    """Send every connected site an empty query and wait up to ``timeout_s`` for the replies.

    In a simulation the first message to a site starts its Ray worker, which imports torch
    and ctfed (~20 s on an idle 2-core machine, minutes under load); sent before round 1,
    that start no longer counts against ``federation.round_timeout_s``, which can then be
    as short as a round's training. A site that does not answer is logged and round 1 goes
    on without waiting further (it then times out as usual). Returns the nodes that answered."""
    nodes = list(grid.get_node_ids())
    started = time.perf_counter()
    messages = [Message(RecordDict(), dst_node_id=node, message_type=WARMUP_MESSAGE_TYPE) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    sent_to = destinations(messages)
    answered = {replying_node(reply, sent_to) for reply in replies if not reply.has_error()}
    seconds = time.perf_counter() - started
    if len(answered) < len(nodes):
        logger.warning("warm-up: %d of %d sites answered within %.0f s", len(answered), len(nodes), timeout_s)
    else:
        logger.info("warm-up: all %d sites answered in %.1f s", len(nodes), seconds)
    return answered


def missing_records(messages: list[Message], replies: list[Message], known_sites: dict[int, str]) -> list[SiteRoundRecord]:
    """A record for every sampled node that did not answer in time (named if seen before)."""
    sent_to = destinations(messages)
    answered = {replying_node(reply, sent_to) for reply in replies}
    return [
        SiteRoundRecord(site=known_sites.get(node, f"node-{node}"), status=STATUS_TIMEOUT, reason="no reply before federation.round_timeout_s")
        for node in (m.metadata.dst_node_id for m in messages)
        if node not in answered
    ]


def sample_rate(grid: Grid, messages: list[Message]) -> float:
    """Sites asked this round / sites available: the sampling rate central DP accounts for."""
    return len(messages) / max(len(list(grid.get_node_ids())), len(messages))


@dataclass
class RoundOutcome:
    """What a round's sites produced: the combined delta over ``like``'s names (None: the
    global model stays as it is, ``reason`` says why) and every site's record."""

    mean_delta: dict[str, torch.Tensor] | None
    sites: list[SiteRoundRecord]
    secure_aggregation: bool
    reason: str = ""
    central_noise_std: float | None = None


def collect_round(
    grid: Grid,
    messages: list[Message],
    like: Mapping[str, torch.Tensor],
    cfg: RunConfig,
    strategy: FedAvg,
    server_round: int,
    known_sites: dict[int, str],
    central: CentralDP | None,
) -> RoundOutcome:
    """Send ``messages`` and combine the sites' deltas of ``like``'s names (see the module docstring)."""
    rate = sample_rate(grid, messages)
    sent = {int(m.metadata.dst_node_id): record_bytes(m.content[ARRAYS_KEY]) for m in messages}
    if cfg.secagg.enabled:
        result = secure_round(grid, messages, dict(like), cfg, server_round, known_sites, central is not None)
        mean_delta, noise_std = result.mean_delta, None
        if mean_delta is not None and central is not None:
            # Sites clipped before masking and weigh 1 each: the unmasked mean is the uniform
            # mean the noise is calibrated for.
            mean_delta, noise_std = central.noise_mean(mean_delta, result.included_sites, server_round, rate)
        return RoundOutcome(mean_delta, result.sites, True, result.reason, noise_std)

    max_update_norm = cfg.federation.max_update_norm
    if central is not None:
        max_update_norm = central.max_update_norm(max_update_norm)
    replies = list(grid.send_and_receive(messages, timeout=cfg.federation.round_timeout_s))
    accepted, site_records = vet_replies(
        replies, like, max_update_norm, known_sites, cfg.federation.transport, destinations(messages)
    )
    sent_by_site = {known_sites[node]: size for node, size in sent.items() if node in known_sites}
    for record in site_records:
        record.bytes_sent = sent_by_site.get(record.site, 0)
    missing = missing_records(messages, replies, known_sites)
    if missing:
        logger.warning(
            "round %d: no reply within %.0f s from %s",
            server_round, cfg.federation.round_timeout_s, ", ".join(r.site for r in missing),
        )
        site_records = sorted(site_records + missing, key=lambda record: record.site)

    if len(accepted) < cfg.federation.min_sites:
        reason = f"only {len(accepted)} usable updates (need federation.min_sites={cfg.federation.min_sites})"
        return RoundOutcome(None, site_records, False, reason)
    if cfg.federation.strategy in ROBUST_STRATEGIES:
        updates = [record_to_state(r.content[ARRAYS_KEY], expected=like) for r in accepted]
        return RoundOutcome(robust_combine(cfg.federation.strategy, updates, cfg.federation), site_records, False)
    if central is None:
        aggregated, _ = strategy.aggregate_train(server_round, _arrays_and_weights(accepted))
        return RoundOutcome(record_to_state(aggregated, expected=like), site_records, False)
    updates = [record_to_state(r.content[ARRAYS_KEY], expected=like) for r in accepted]
    noisy_mean, noise_std = central.aggregate(updates, server_round, rate)
    return RoundOutcome(noisy_mean, site_records, False, central_noise_std=noise_std)
