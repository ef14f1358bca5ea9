"""The site's Flower ClientApp: one round of local self-supervised training (phase 1) or of
fine-tuning on the site's labelled scans (phase 2, ``client/finetune_round.py``), by the
instructions' phase.

A site receives the global encoder and the round's instructions, trains on its own cache,
and replies with the change of its student encoder (local weights minus the global
weights it started from), and with ``train.share_heads`` of its projection head and centres.
Everything else the site learns (EMA teacher, the unshared head and
centre) stays in the node's ``context.state`` between rounds, and on disk in the site's state
folder under the federation's id (``client/local_state.py``) for a resumed federation, which is
a new Flower run with an empty ``context.state``.

Order of a round, so that nothing is read that a refused round should not touch: the
instructions are decoded once (``common.exchange.RoundInstructions``: another protocol
version, an unknown or missing key is a refusal), the site's policy is checked against
them (``client/policy.py``), then the cache is opened and the privacy budget checked
(``client/privacy_round.py``), then the representation monitor of the received global
encoder (``client/monitor_round.py``), then training. Every outgoing message, refusals
included, is written to the site's audit log (``client/audit.py``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ctfed.client.finetune_round import finetune_train
from ctfed.client.local_state import load_local_state, save_local_state
from ctfed.client.monitor_round import first_monitor_of_round, hold_for_secure_round, monitor_allowed, monitor_metrics
from ctfed.client.privacy_round import RoundRefused, SitePrivacyRound
from ctfed.client.site import SiteData, identify_site, open_site_data
from ctfed.client.secagg import register_secagg
from ctfed.client.train import LocalTrainer
from ctfed.common.data_summary import site_data_metrics
from ctfed.common.secagg import STAGE_TRAIN
from ctfed.common.secagg import message_type as secagg_message_type
from ctfed.common.logs import console_logging
from ctfed.common.model import encoder_part
from ctfed.common.processes import peak_rss_mb
from ctfed.common.config import ConfigError
from ctfed.common.exchange import (
    ARRAYS_KEY,
    CONFIG_KEY,
    LOCAL_STATE_KEY,
    FINETUNE_PHASE,
    METRICS_KEY,
    RoundInstructions,
    WARMUP_ACTION,
    SiteReply,
    record_bytes,
    record_to_state,
    state_delta,
)

logger = logging.getLogger(__name__)

# Node config key with which a site pins its training device (auto, cpu, cuda, cuda:N) over
# the coordinator's train.device.
DEVICE_NODE_KEY = "device"


app = ClientApp()


def register_warmup(client_app: ClientApp) -> None:
    """Answer the coordinator's warm-up query (a simulation's, before round 1) with an empty
    reply: it reads no data and sends nothing of the site's, so it is not audited. Its only
    effect is that the site's process is up and has imported ctfed when round 1 starts."""

    @client_app.query(WARMUP_ACTION)
    def warmup(msg: Message, context: Context) -> Message:
        return Message(RecordDict(), reply_to=msg)


register_warmup(app)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally from the global model and reply with the change of what trained.

    Two ways in: Flower routes a ``train`` message here (the plain path: the reply carries
    the update in clear), and stage (a) of secure aggregation (``train.secagg_train``,
    client/secagg.py) calls this with its own message and keeps the update at the site.
    Which one it is comes from the message type Flower dispatched on, never from an
    instruction the coordinator writes."""
    console_logging()
    started = time.perf_counter()
    identity = identify_site(context)
    secure_path = msg.metadata.message_type == secagg_message_type(STAGE_TRAIN)
    # The one decoding of the round's instructions; everything below gets the typed object.
    record = msg.content[CONFIG_KEY]
    try:
        instructions: RoundInstructions | None = RoundInstructions.from_record(record)
        undecodable = ""
    except ConfigError as err:  # another protocol version included: refused, audited
        instructions, undecodable = None, f"instructions: {err}"
    server_round = instructions.server_round if instructions else RoundInstructions.round_of(record)
    privacy_round = SitePrivacyRound(
        identity, context, instructions, secure_path=secure_path, server_round=server_round, instructions_error=undecodable
    )
    if instructions is not None and instructions.phase == FINETUNE_PHASE:
        return finetune_train(msg, context, identity, instructions, privacy_round)
    try:
        privacy_round.check_policy()  # before the cache is opened
        assert instructions is not None  # check_policy refuses undecodable instructions
        model_cfg, train_cfg = instructions.model, instructions.train
        site: SiteData = open_site_data(identity)
        volumes = privacy_round.privacy_units(site.dataset)  # local DP: one volume per person
        privacy_round.check_budget(train_cfg, num_volumes=len(volumes))
    except RoundRefused as refusal:
        logger.warning("site %s declines round %d: %s", identity.site_id, server_round, refusal)
        return Message(error=privacy_round.refuse(refusal), reply_to=msg)

    def new_trainer() -> LocalTrainer:
        return LocalTrainer(
            model_cfg, train_cfg, volumes, seed=train_cfg.seed + site.index, dp=privacy_round.local_dp,
            device=str(context.node_config.get(DEVICE_NODE_KEY, "")) or None,  # the hospital's pin wins
        )

    trainer = new_trainer()
    if LOCAL_STATE_KEY in context.state:
        trainer.load_local_state(context.state[LOCAL_STATE_KEY].to_torch_state_dict())
    elif instructions.federation_id:  # a new Flower run: a resumed federation continues from disk
        if not _resume_local_state(trainer, identity.state_dir, instructions.federation_id, server_round, site.site_id):
            trainer = new_trainer()  # a state that failed to load may have been loaded in part
    # The encoder, and with train.share_heads the projection head and centres (client/train.py).
    global_state = record_to_state(msg.content[ARRAYS_KEY], expected=trainer.shared_state())
    trainer.set_global_state(global_state)
    # Before training, on the encoder every site received. Only for an encoder the federation
    # published (client/monitor_round.py): once per round, on the secure path held until the
    # round's unmask stage, on the plain path only where the site's policy allows it.
    monitor = (
        monitor_metrics(site, instructions, encoder_part(global_state))
        if instructions.monitor_settings() is not None and monitor_allowed(privacy_round.policy, secure_path)
        and first_monitor_of_round(context, server_round, site.site_id)
        else {}
    )
    if secure_path:
        # Held out of this reply, so released() below never sees it: its small-cell rule now.
        hold_for_secure_round(context, privacy_round.released_monitor(monitor))
        monitor = {}

    result = trainer.train_round(round_index=server_round - 1)
    local_state = trainer.local_state(copy=False)
    context.state[LOCAL_STATE_KEY] = ArrayRecord(local_state)  # ArrayRecord copies
    if instructions.federation_id:
        _persist_local_state(local_state, identity.state_dir, instructions.federation_id, server_round, site.site_id)
    del local_state

    update = privacy_round.outgoing_update(state_delta(trainer.shared_state(), global_state))
    epsilon = privacy_round.after_training(result.dp_steps)
    sent_bytes = record_bytes(update)
    reply = privacy_round.released(
        SiteReply(
            site_id=site.site_id,
            num_examples=result.num_examples,
            loss=float(result.losses[-1]),
            loss_first=float(result.losses[0]),
            losses=tuple(float(x) for x in result.losses),
            train_seconds=float(result.seconds),
            data_seconds=float(result.data_seconds),
            round_seconds=time.perf_counter() - started,
            bytes_sent=sent_bytes,
            peak_rss_mb=peak_rss_mb(),
            epsilon=epsilon,
            aggregates={
                # Aggregate counts and ranges for the model card's data summary (no identifiers; ranges
                # coarsened under the site's small-cell floor).
                **(
                    site_data_metrics(site.dataset, privacy_round.policy.min_reported_count)
                    if privacy_round.policy.share_data_summary else {}
                ),
                # kNN accuracy and feature spread of the global encoder (aggregates, like the loss).
                **monitor,
            },
        )
    )
    logger.info(
        "site %s round %d: %d steps, loss %.4f -> %.4f, %d bytes sent",
        site.site_id, server_round, len(result.losses), result.losses[0], result.losses[-1], sent_bytes,
    )
    records = reply.to_records()
    content = RecordDict({ARRAYS_KEY: update, **records})
    privacy_round.audit_reply(update, records[METRICS_KEY])
    return Message(content=content, reply_to=msg)


def _resume_local_state(
    trainer: LocalTrainer, state_dir: Path, federation_id: str, server_round: int, site_id: str
) -> bool:
    """Load the state this site saved after the previous round of this federation, if any
    (reasons it does not are logged by ``load_local_state``, and the state starts afresh).
    False when loading failed part way: the trainer must then be built anew."""
    saved = load_local_state(state_dir, federation_id, server_round, site_id)
    if saved is None:
        return True
    try:
        trainer.load_local_state(saved)
    except ValueError as err:  # e.g. a resume with --override-config that changed train.mim_objective
        logger.warning(
            "site %s round %d: the saved local training state does not fit this round's model (%s); it starts afresh",
            site_id, server_round, err,
        )
        return False
    return True


def _persist_local_state(
    state: dict[str, torch.Tensor], state_dir: Path, federation_id: str, server_round: int, site_id: str
) -> None:
    """Write the round's local state for a resume; a failure (disk full) costs only a later
    resume's exactness, so it is logged and the round goes on."""
    try:
        save_local_state(state_dir, federation_id, server_round, state)
    except OSError as err:
        logger.warning(
            "site %s round %d: could not save its local training state (%s); a resumed federation would restart it",
            site_id, server_round, err,
        )


# Secure aggregation: four protocol stages as named train actions; stage (a) trains with
# `train` above and keeps the update on the site (client/secagg.py).
register_secagg(app, train)
