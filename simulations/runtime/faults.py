"""A ClientApp that fails on purpose, for studying how the federation copes.

``ctfed simulate`` submits this app instead of ``ctfed.client.app`` when
``simulation.faults`` is set. It runs the real site code and then breaks it the way a real
site can break: it dies mid-round, replies with NaN, replies with an absurdly large
update, or replies late. Deployed SuperNodes never load this module: it is not the
ClientApp named in the repository's pyproject.toml.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ctfed.client.app import register_warmup
from ctfed.client.app import train as site_train
from ctfed.client.secagg import register_secagg
from ctfed.client.site import PARTITION_ID_KEY
from ctfed.common.config import Transport
from ctfed.common.exchange import ARRAYS_KEY, CONFIG_KEY, RoundInstructions, encode_update, transported_values
from ctfed.server.app import RUN_CONFIG_FILE_KEY
from ctfed.simulations.config import FaultConfig, FaultKind, read_simulation_config

logger = logging.getLogger(__name__)

# How much HUGE scales a site's update: far past any norm limit a coordinator would set.
HUGE_FACTOR = 1.0e6

app = ClientApp()


def faults_from_run_config(context: Context) -> list[FaultConfig]:
    """The faults of this simulation, from the run config file ``ctfed simulate`` wrote."""
    return read_simulation_config(Path(str(context.run_config[RUN_CONFIG_FILE_KEY]))).simulation.faults


def active_fault(faults: list[FaultConfig], site: int, server_round: int) -> FaultConfig | None:
    """The fault that hits ``site`` in ``server_round``, if any (the first listed wins)."""
    for fault in faults:
        if fault.site == site and (not fault.rounds or server_round in fault.rounds):
            return fault
    return None


def _corrupt_update(reply: Message, kind: FaultKind, transport: Transport = Transport.float32) -> None:
    # Corrupt the values, then send them in the round's format as the real site would.
    state = transported_values(reply.content[ARRAYS_KEY], transport)
    if kind is FaultKind.nan_update:
        first = next(name for name, t in state.items() if t.is_floating_point())
        state[first] = state[first].clone()
        state[first].view(-1)[0] = float("nan")
    else:
        state = {name: t * HUGE_FACTOR if t.is_floating_point() else t for name, t in state.items()}
    reply.content[ARRAYS_KEY] = encode_update(state, transport)


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = int(context.node_config[PARTITION_ID_KEY])
    server_round = RoundInstructions.round_of(msg.content[CONFIG_KEY])
    fault = active_fault(faults_from_run_config(context), site, server_round)
    if fault is None:
        return site_train(msg, context)
    logger.warning("fault injection: site %d round %d: %s", site, server_round, fault.kind.value)
    if fault.kind is FaultKind.crash:
        raise RuntimeError(f"injected fault: site {site} died in round {server_round}")
    if fault.kind is FaultKind.straggle:
        time.sleep(fault.delay_s)
        return site_train(msg, context)
    reply = site_train(msg, context)
    if reply.has_error():  # refused: nothing to corrupt
        return reply
    instructions = RoundInstructions.from_record(msg.content[CONFIG_KEY])  # the site decoded them: they do
    with torch.no_grad():
        _corrupt_update(reply, fault.kind, Transport.float32 if instructions.secure_aggregation else instructions.transport)
    return reply


# With secure aggregation the same faults hit stage (a); a site then catches its own NaN or
# oversized delta before masking, and the coordinator records it as failed.
register_secagg(app, train)
register_warmup(app)
