"""The site's Flower ClientApp: one round of local self-supervised training.

A site receives the global encoder and the round's instructions, trains on its own cache,
and replies with the change of its student encoder only (local weights minus the global
weights it started from). Everything else the site learns (DINO
head, EMA teacher, loss centre) stays in the node's ``context.state`` between rounds.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ctfed.client.secagg import register_secagg
from ctfed.client.site import SiteData, resolve_site
from ctfed.client.train import LocalTrainer
from ctfed.common.logs import console_logging
from ctfed.common.exchange import (
    ARRAYS_KEY,
    CONFIG_KEY,
    LOCAL_STATE_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    SITE_KEY,
    record_bytes,
    record_to_configs,
    record_to_state,
    state_delta,
    state_to_record,
)

logger = logging.getLogger(__name__)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally from the global encoder and reply with the new encoder weights."""
    console_logging()
    started = time.perf_counter()
    instructions = msg.content[CONFIG_KEY]
    model_cfg, train_cfg = record_to_configs(instructions)
    server_round = int(instructions["server-round"])
    site: SiteData = resolve_site(context)

    trainer = LocalTrainer(model_cfg, train_cfg, site.dataset, seed=train_cfg.seed + site.index)
    if LOCAL_STATE_KEY in context.state:
        trainer.load_local_state(context.state[LOCAL_STATE_KEY].to_torch_state_dict())
    global_state = record_to_state(msg.content[ARRAYS_KEY], expected=trainer.encoder_state())
    trainer.set_global_encoder(global_state)

    result = trainer.train_round(round_index=server_round - 1)
    context.state[LOCAL_STATE_KEY] = ArrayRecord(trainer.local_state())

    update = state_to_record(state_delta(trainer.encoder_state(), global_state))
    sent_bytes = record_bytes(update)
    metrics = MetricRecord(
        {
            NUM_EXAMPLES_KEY: result.num_examples,
            "loss": float(result.losses[-1]),
            "loss-first": float(result.losses[0]),
            "losses": [float(x) for x in result.losses],
            "train-seconds": float(result.seconds),
            "data-seconds": float(result.data_seconds),
            "round-seconds": time.perf_counter() - started,
            "bytes-sent": sent_bytes,
        }
    )
    logger.info(
        "site %s round %d: %d steps, loss %.4f -> %.4f, %d bytes sent",
        site.site_id, server_round, len(result.losses), result.losses[0], result.losses[-1], sent_bytes,
    )
    content = RecordDict(
        {ARRAYS_KEY: update, METRICS_KEY: metrics, SITE_KEY: ConfigRecord({"site-id": site.site_id})}
    )
    return Message(content=content, reply_to=msg)


# Secure aggregation: four protocol stages as named train actions; stage (a) trains with
# `train` above and keeps the update on the site (client/secagg.py).
register_secagg(app, train)
