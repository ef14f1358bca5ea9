"""Phase 2: federated progressive-freezing fine-tuning of the pretrained encoder.

After the last SSL round the coordinator builds a classifier (the global encoder plus a new
head from ``finetune.seed``) and runs ``federation.finetune_rounds`` rounds on it. With
``finetune.feature_statistics=federated`` its feature statistics come from the sites once: the
first round's updates carry each site's, the coordinator fixes their mean in the classifier,
and the next round sends it whole so that every site trains with the same fixed ones. Each round
follows ``common/finetune.FederatedFreezingSchedule``: linear probe first, then the top
blocks unfreeze top-down, each group at its discriminative LR.

What travels: a site's first phase-2 round (or the first after it missed one) gets the whole
classifier and the digest of it; afterwards it gets only the round's trainable parameters
(head + unfrozen blocks) and completes them from the classifier it holds (client/
finetune_round.py). Replies are always the trainable parameters' deltas only, so bytes per
round shrink with the frozen part; results.json records them with the round's plan.
Aggregation is the phase-1 machinery (server/collect.py) over the trainable subset: weighted
FedAvg (weights: a site's labelled training scans), secure aggregation, central DP, robust
rules, FedAdam (its moments restart at the phase boundary).

Checkpoints continue the round numbering (``global_round_NNNN``, card kind
``global-classifier``); a resumed run in phase 2 rebuilds the classifier from the last one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ctfed.common.checkpoint import state_digest
from ctfed.common.config import PrivacyMode, RunConfig
from ctfed.common.exchange import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FINETUNE_PHASE,
    STATUS_AGGREGATED,
    RoundInstructions,
    record_bytes,
    state_to_record,
)
from ctfed.common.finetune import (
    STANDARDIZER_PREFIX,
    STATISTICS_PREFIX,
    Classifier,
    FederatedFreezingSchedule,
    build_classifier,
    feature_statistics_like,
    sends_feature_statistics,
    set_feature_statistics,
    trainable_names,
)
from ctfed.common.metrics import OPERATING_POINT_METHOD, OPERATING_POINT_METRIC
from ctfed.common.model import encoder_part
from ctfed.server.aggregation import GlobalUpdate
from ctfed.server.central_dp import CentralDP
from ctfed.server.collect import build_strategy, collect_round, round_instructions
from ctfed.server.results import GLOBAL_CLASSIFIER_KIND, ResumeError, RoundRecord, RunRecorder, SiteRoundRecord

logger = logging.getLogger(__name__)


def phase_two_classifier(cfg: RunConfig, recorder: RunRecorder, global_state: dict[str, torch.Tensor]) -> Classifier:
    """The classifier phase 2 continues from: a new one on the pretrained encoder at the phase
    boundary, or the last phase-2 checkpoint's when a resumed run is already in phase 2."""
    num_outputs = cfg.finetune.num_outputs
    if recorder.last_round <= cfg.federation.rounds:
        return build_classifier(
            cfg.model, num_outputs, encoder_state=encoder_part(global_state), seed=cfg.finetune.seed,
            pooling=cfg.finetune.pooling,
        )  # shared SSL heads (train.share_heads) end with phase 1
    classifier = build_classifier(cfg.model, num_outputs, seed=cfg.finetune.seed, pooling=cfg.finetune.pooling)
    try:
        classifier.load_state_dict(global_state, strict=True)
    except RuntimeError as err:
        raise ResumeError(
            f"round {recorder.last_round} is a phase-2 round, but its checkpoint is not a classifier with "
            f"{num_outputs} output(s) (finetune.label_names): {err}"
        ) from None
    return classifier


def fix_feature_statistics(
    classifier: Classifier, state: dict[str, torch.Tensor], mean_of_sites: dict[str, torch.Tensor],
    sites: list[SiteRoundRecord],
) -> None:
    """The sites' mean feature statistics become the classifier's, fixed from the next round on
    (``state`` is what the next rounds send and checkpoint)."""
    aggregated = sum(1 for record in sites if record.status == STATUS_AGGREGATED)
    set_feature_statistics(classifier, mean_of_sites, max(aggregated, 1))
    for name, tensor in classifier.standardizer.state_dict().items():
        state[STANDARDIZER_PREFIX + name] = tensor.detach().clone()
    logger.info("phase 2: the head's feature statistics fixed from %d sites' (sent once, in this round's update)", aggregated)


class BaseHolders:
    """Which node holds which whole classifier (by digest), so it can be sent only the trainable part.

    A node counts as holding what it was last sent in full once it has trained on it; one
    that failed, refused or went silent is sent the whole classifier again. A restarted
    coordinator (resume) knows of no holder.
    """

    def __init__(self) -> None:
        self.digests: dict[int, str] = {}

    def messages(
        self,
        node_ids: list[int],
        state: dict[str, torch.Tensor],
        trainable: dict[str, torch.Tensor],
        instructions: RoundInstructions,
    ) -> tuple[list[Message], dict[int, str]]:
        """One train message per node, and the digest each one's base will have."""
        partial = state_to_record(trainable)
        full: ArrayRecord | None = None
        digest = ""
        messages: list[Message] = []
        sent_digests: dict[int, str] = {}
        for node in node_ids:
            held = self.digests.get(node)
            if held is None:
                if full is None:
                    full, digest = state_to_record(state), state_digest(state)
                arrays, mine = full, replace(instructions, full_state=True, base_sha256=digest)
            else:
                arrays, mine = partial, replace(instructions, full_state=False, base_sha256=held)
            sent_digests[node] = mine.base_sha256
            content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: mine.to_record()})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        return messages, sent_digests

    def update(self, sent_digests: dict[int, str], sites: list[SiteRoundRecord], known_sites: dict[int, str]) -> None:
        """Keep the nodes that trained this round (their reply had metrics); forget the others."""
        trained = {record.site for record in sites if record.loss is not None}
        for node, digest in sent_digests.items():
            if known_sites.get(node) in trained:
                self.digests[node] = digest
            else:
                self.digests.pop(node, None)


def run_finetune_rounds(
    grid: Grid,
    cfg: RunConfig,
    recorder: RunRecorder,
    global_state: dict[str, torch.Tensor],
    central: CentralDP | None,
    known_sites: dict[int, str],
) -> dict[str, torch.Tensor]:
    """Phase 2 after ``recorder.last_round`` up to the last phase-2 round; returns the classifier state."""
    pretrain_rounds = cfg.federation.rounds
    total = pretrain_rounds + cfg.federation.finetune_rounds
    local_steps = cfg.finetune.local_steps or cfg.train.local_steps
    classifier = phase_two_classifier(cfg, recorder, global_state)
    schedule = FederatedFreezingSchedule(cfg.finetune, classifier.num_blocks, cfg.federation.finetune_rounds, local_steps)
    # FedAdam's phase-1 moments belong to the encoder's SSL objective: phase 2 starts afresh.
    in_phase_two = recorder.last_round > pretrain_rounds
    updater = GlobalUpdate(cfg.federation, recorder.strategy_state if in_phase_two else None)
    strategy = build_strategy(cfg)
    holders = BaseHolders()
    state = {name: tensor.detach().clone() for name, tensor in classifier.state_dict().items()}
    for server_round in range(max(recorder.last_round, pretrain_rounds) + 1, total + 1):
        started = time.perf_counter()
        plan = schedule.plan(server_round - pretrain_rounds)
        classifier.set_trainable(plan.blocks, stem=plan.stem)
        trainable = {name: state[name] for name in trainable_names(classifier)}
        # Until one round has aggregated them, the sites' feature statistics travel in the update.
        update_dp = central is not None or cfg.privacy.mode is PrivacyMode.distributed
        statistics = sends_feature_statistics(cfg.finetune, update_dp, classifier)
        expected = {**trainable, **feature_statistics_like(classifier)} if statistics else trainable
        instructions = round_instructions(cfg, server_round, plan, local_steps, federation_id=recorder.federation_id)
        sampled = strategy.configure_train(server_round, ArrayRecord(), instructions.to_record(), grid)
        node_ids = [int(m.metadata.dst_node_id) for m in sampled]
        messages, sent_digests = holders.messages(node_ids, state, trainable, instructions)
        logger.info(
            "[round %d/%d] fine-tune (%s, trainable blocks %s, %d trainable values) sent to %d sites",
            server_round, total, plan.stage, list(plan.blocks), sum(t.numel() for t in trainable.values()), len(messages),
        )
        bytes_sent = max((record_bytes(m.content[ARRAYS_KEY]) for m in messages), default=0)
        # Secure aggregation owns the messages from here (it frees them once they are pushed).
        outcome = collect_round(grid, messages, expected, cfg, strategy, server_round, known_sites, central)
        holders.update(sent_digests, outcome.sites, known_sites)
        if outcome.mean_delta is None:
            logger.error("round %d: not aggregated (%s); the global classifier is unchanged", server_round, outcome.reason)
        else:
            delta = {name: value for name, value in outcome.mean_delta.items() if not name.startswith(STATISTICS_PREFIX)}
            state.update(updater.apply(trainable, delta))
            if statistics:
                fix_feature_statistics(classifier, state, outcome.mean_delta, outcome.sites)
                holders.digests.clear()  # the classifier every site holds lacks them: send it whole
        if central is not None:
            recorder.central_privacy_ledger = central.ledger.to_dict()
        checkpoint = recorder.save_global(
            server_round, state, updater.state(), kind=GLOBAL_CLASSIFIER_KIND,
            label_names=list(cfg.finetune.label_names), pooling=cfg.finetune.pooling.value,
            finetune_stage=plan.stage, trainable_blocks=list(plan.blocks),
            data_summary=recorder.data_summary(),
            operating_point=operating_point(outcome.sites, list(cfg.finetune.label_names)),
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
                phase=FINETUNE_PHASE,
                finetune_stage=plan.stage,
                trainable_blocks=list(plan.blocks),
                trainable_parameters=sum(t.numel() for t in trainable.values()),
            )
        )
        scores = ", ".join(_site_summary(s) for s in outcome.sites if s.loss is not None)
        logger.info("[round %d/%d] done in %.1f s; %s", server_round, total, time.perf_counter() - started, scores or "n/a")
        recorder.stop_if_stalled(cfg.federation.max_failed_rounds)
    return state


def operating_point(sites: list[SiteRoundRecord], label_names: list[str]) -> dict[str, dict]:
    """Per task, the median of the thresholds the aggregated sites chose on their held-out scans
    (Youden's J, ``eval/<task>/operating_point``) and each site's: the card's operating point.
    A median, so one site's odd validation split does not move the federation's threshold."""
    points: dict[str, dict] = {}
    for task in label_names:
        chosen = {
            s.site: float(s.evaluation[task][OPERATING_POINT_METRIC]["value"])
            for s in sites
            if s.status == STATUS_AGGREGATED and s.evaluation and OPERATING_POINT_METRIC in s.evaluation.get(task, {})
            and 0.0 <= s.evaluation[task][OPERATING_POINT_METRIC].get("value", -1.0) <= 1.0
        }
        if chosen:
            points[task] = {
                "threshold": float(np.median(list(chosen.values()))),
                "method": f"{OPERATING_POINT_METHOD}, median over sites",
                "split": "each site's held-out scans",
                "sites": dict(sorted(chosen.items())),
            }
    return points


def _site_summary(record: SiteRoundRecord) -> str:
    """``site loss 0.69 auroc 0.75`` (first task's AUROC) for the round's log line."""
    text = f"{record.site} loss {record.loss:.4f}"
    if record.evaluation:
        task, metrics = next(iter(record.evaluation.items()))
        text += f" {task} auroc {metrics.get('auroc', {}).get('value', float('nan')):.3f}"
    return text
