"""A site's phase-2 round: fine-tune the global classifier on its labelled training scans.

The coordinator sends the whole classifier (pretrained encoder + head) in a site's first
phase-2 round, and afterwards only the parameters that train this round. The site keeps the
whole classifier it last received in ``context.state`` (``CLASSIFIER_BASE_KEY``) and
completes each partial one from it: progressive freezing only ever unfreezes, so every
parameter that changed since then is among the trainable ones the coordinator sends. A
partial state for a base the site does not hold (a restarted node, a resumed run) is an
error reply; the coordinator then sends the whole classifier again in the next round.
That base is the only state phase 2 keeps at a site (each round's optimiser and schedule are
new), and it needs no file: a resumed coordinator knows of no holder and sends every site the
whole classifier in its first round (server/finetune_rounds.py ``BaseHolders``), so a resume
in phase 2 is exact without one.

Order of a round (as in phase 1): policy check on the instructions -> open the cache and
split its labelled scans (a site without usable labels refuses, code
``NO_LABELS_REFUSED_CODE``) -> the head's feature statistics: the ones the classifier carries
(the coordinator's, fixed), or, where it carries none, fitted on the site's whole cache ->
train the plan's trainable set for the plan's local steps -> evaluate on the held-out scans ->
reply the trainable deltas only (clipped under central DP), with the site's statistics while
the coordinator asks for them (``finetune.feature_statistics``), plus metrics -> audit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict

from ctfed.client.local_state import discard_local_state
from ctfed.client.privacy_round import RoundRefused, SitePrivacyRound
from ctfed.client.site import SiteIdentity, open_site_data
from ctfed.common.checkpoint import state_digest
from ctfed.common.config import FinetuneConfig, PrivacyMode
from ctfed.common.exchange import (
    ARRAYS_KEY,
    LOCAL_STATE_KEY,
    METRICS_KEY,
    NO_LABELS_REFUSED_CODE,
    POLICY_REFUSED_CODE,
    RoundInstructions,
    SiteReply,
    UpdateRejected,
    record_bytes,
    record_to_state,
    state_delta,
    state_to_record,
)
from ctfed.common.finetune import (
    Classifier,
    Finetuner,
    build_classifier,
    encode_feature_statistics,
    sends_feature_statistics,
    trainable_names,
    trainable_state,
)
from ctfed.common.labelled import LabelledScans, NotEvaluableError, site_split, standardizer_scans
from ctfed.common.metrics import OPERATING_POINT_METRIC, evaluation_dict, operating_points
from ctfed.common.processes import peak_rss_mb

logger = logging.getLogger(__name__)

# context.state: the whole classifier last received in full, and its digest.
CLASSIFIER_BASE_KEY = "finetune-base"
CLASSIFIER_BASE_INFO_KEY = "finetune-base-info"
_DIGEST = "sha256"
# Per-site, per-round batch order: different at every site and in every round.
_SEED_STRIDE_PER_SITE = 1000


class MissingBaseState(RuntimeError):
    """A partial classifier arrived for a base this site does not hold."""


def labelled_split(identity: SiteIdentity, finetune: FinetuneConfig, image_size: int) -> tuple[LabelledScans, LabelledScans]:
    """The site's (train, held-out) labelled scans; RoundRefused if its labels cannot be split."""
    site = open_site_data(identity)
    try:
        split = site_split(site.dataset, finetune.label_names, finetune.test_fraction, finetune.split_seed)
    except NotEvaluableError as err:
        raise RoundRefused(NO_LABELS_REFUSED_CODE, f"no usable labels for fine-tuning: {err}") from None
    return (
        LabelledScans(site.dataset, split.train, finetune.label_names, image_size),
        LabelledScans(site.dataset, split.test, finetune.label_names, image_size),
    )


def global_classifier(
    msg: Message, context: Context, instructions: RoundInstructions, state_dir: Path | None = None
) -> Classifier:
    """The round's global classifier, with the plan's trainable set; stores a whole one as the base
    (and then removes phase 1's local-state files of the federation from ``state_dir``)."""
    finetune, plan = instructions.finetune, instructions.plan
    assert finetune is not None and plan is not None, "RoundInstructions.from_record requires both in phase 2"
    classifier = build_classifier(instructions.model, finetune.num_outputs, seed=finetune.seed, pooling=finetune.pooling)
    classifier.set_trainable(plan.blocks, stem=plan.stem)
    reference = classifier.state_dict()
    digest = instructions.base_sha256
    if instructions.full_state:
        state = record_to_state(msg.content[ARRAYS_KEY], expected=reference)
        if state_digest(state) != digest:
            raise UpdateRejected("the classifier received does not match the digest the coordinator sent")
        context.state[CLASSIFIER_BASE_KEY] = state_to_record(state)
        context.state[CLASSIFIER_BASE_INFO_KEY] = ConfigRecord({_DIGEST: digest})
        # Phase 1's DINO head, teacher and optimizer are of no further use (nor their files).
        context.state.pop(LOCAL_STATE_KEY, None)
        if instructions.federation_id and state_dir is not None:
            discard_local_state(state_dir, instructions.federation_id)
    else:
        info = context.state.get(CLASSIFIER_BASE_INFO_KEY)
        if CLASSIFIER_BASE_KEY not in context.state or info is None or info[_DIGEST] != digest:
            raise MissingBaseState(
                "received only the trainable part of the classifier, but this site does not hold the classifier "
                "it belongs to; the coordinator sends the whole one next round"
            )
        state = context.state[CLASSIFIER_BASE_KEY].to_torch_state_dict()
        trainable = {name: reference[name] for name in trainable_names(classifier)}
        state.update(record_to_state(msg.content[ARRAYS_KEY], expected=trainable))
    classifier.load_state_dict(state, strict=True)
    # Statistics the coordinator fixed are used as sent (finetune.feature_statistics=federated):
    # a std of 0 or below would divide the features by nothing.
    standardizer = classifier.standardizer
    if standardizer.fitted and not bool((standardizer.std > 0).all()):
        raise UpdateRejected("the classifier's feature statistics hold a std <= 0")
    return classifier


def finetune_train(
    msg: Message, context: Context, identity: SiteIdentity, instructions: RoundInstructions, privacy_round: SitePrivacyRound
) -> Message:
    """One phase-2 round at this site (see the module docstring for the order)."""
    started = time.perf_counter()
    server_round = instructions.server_round
    finetune, plan, local_steps = instructions.finetune, instructions.plan, instructions.plan_local_steps
    assert finetune is not None and plan is not None, "RoundInstructions.from_record requires both in phase 2"
    try:
        privacy_round.check_policy()  # before the cache is opened
        if privacy_round.local_dp is not None:
            raise RoundRefused(POLICY_REFUSED_CODE, "local DP-SGD is not available for phase-2 fine-tuning")
        train_scans, test_scans = labelled_split(identity, finetune, instructions.model.image_size)
        # Central DP: the site's own ledger.
        privacy_round.check_budget(instructions.train, num_volumes=len(train_scans))
    except RoundRefused as refusal:
        logger.warning("site %s declines round %d: %s", identity.site_id, server_round, refusal)
        return Message(error=privacy_round.refuse(refusal), reply_to=msg)

    classifier = global_classifier(msg, context, instructions, identity.state_dir)
    start = trainable_state(classifier)
    round_cfg = replace(finetune, seed=finetune.seed + _SEED_STRIDE_PER_SITE * identity.index + server_round)
    # Without statistics in the classifier, the head's come from the site's whole cache, as
    # `ctfed predict` fits them.
    finetuner = Finetuner(classifier, round_cfg, train_scans,
                          standardizer_scans=standardizer_scans(train_scans.volumes, instructions.model.image_size))
    trained_at = time.perf_counter()
    # Asked for before training: fit_round fits the statistics a classifier arrives without.
    update_dp = instructions.privacy.mode in (PrivacyMode.central, PrivacyMode.distributed)
    statistics = sends_feature_statistics(finetune, update_dp, classifier)
    fit = finetuner.fit_round(plan, local_steps)
    train_seconds = time.perf_counter() - trained_at
    probs, labels = finetuner.predict(test_scans)
    evaluation = evaluation_dict(labels, probs, finetune.label_names, finetune.eval_n_boot, finetune.split_seed)
    # This site's operating point per task (Youden's J on its held-out scans), sent as
    # ``eval/<task>/operating_point``: the coordinator puts the sites' median in the round's
    # classifier card, for `ctfed predict`'s decisions.
    operating = operating_points(labels, probs, finetune.label_names, split="held-out")
    evaluation = {
        task: {**metrics, **({OPERATING_POINT_METRIC: {"value": float(operating[task]["threshold"])}} if task in operating else {})}
        for task, metrics in evaluation.items()
    }
    shared = privacy_round.released_evaluation(evaluation, labels, finetune.label_names)

    # Only what trained travels; its names are exactly the plan's trainable set, and, until the
    # coordinator has fixed them, this site's feature statistics (once per round it asks).
    delta = state_delta(trainable_state(classifier), start)
    if statistics:
        encoded, clipped = encode_feature_statistics(classifier.standardizer)
        if clipped:
            logger.warning("site %s round %d: %d feature statistics clipped to what the update carries",
                           identity.site_id, server_round, clipped)
        delta.update(encoded)
    update = privacy_round.outgoing_update(delta)
    epsilon = privacy_round.after_training(0)
    sent_bytes = record_bytes(update)
    # What may leave the site (client/privacy_round.py): a task's evaluation only over enough
    # held-out scans of each class; under DP no per-step loss, no exact count and no held-out
    # evaluation at all. The site logs what it keeps.
    reply = privacy_round.released(SiteReply(
        site_id=identity.site_id,
        num_examples=len(train_scans),
        loss=float(fit.losses[-1]),
        loss_first=float(fit.losses[0]),
        losses=tuple(float(x) for x in fit.losses),
        train_seconds=float(train_seconds),
        round_seconds=time.perf_counter() - started,
        bytes_sent=sent_bytes,
        trainable_parameters=int(fit.trainable_params[-1]),
        peak_rss_mb=peak_rss_mb(),
        evaluation=shared or None,
        epsilon=epsilon,
    ))
    withheld = {task: metrics for task, metrics in evaluation.items() if task not in (reply.evaluation or {})}
    if withheld:
        why = "a DP round" if instructions.privacy.mode is not PrivacyMode.none else (
            f"fewer than policy.min_reported_count={privacy_round.policy.min_reported_count} held-out positives or negatives"
        )
        logger.info(
            "site %s round %d: held-out evaluation kept at the site (%s): %s", identity.site_id, server_round, why,
            {task: round(metrics["auroc"]["value"], 4) for task, metrics in withheld.items() if "auroc" in metrics},
        )
    logger.info(
        "site %s round %d (fine-tune, %s, blocks %s): %d steps, loss %.4f -> %.4f, %d bytes sent",
        identity.site_id, server_round, plan.stage, list(plan.blocks), len(fit.losses), fit.losses[0], fit.losses[-1],
        sent_bytes,
    )
    records = reply.to_records()
    content = RecordDict({ARRAYS_KEY: update, **records})
    privacy_round.audit_reply(update, records[METRICS_KEY])
    return Message(content=content, reply_to=msg)
