"""A site's representation monitor in a phase-1 round (common/monitor.py does the maths).

Run on the global encoder the site has just received, before local training: every site
scores the same encoder, so differences between sites reflect their data, and round 1 is the
initial encoder's baseline. The numbers (kNN accuracy, feature spread, scans used) travel as
reply metrics in clear, like the loss; ``policy.share_monitor: false`` keeps them (and skips
the work). A site whose labels cannot be split skips the monitor, logging why once, and the
round goes on: the monitor never refuses a round.

The kNN accuracy is label-derived: on an encoder the coordinator crafts, it is a label oracle
(issue #12 point 10). So the monitor's numbers leave the site only for an encoder the
federation published, one the site trains from in a round that is aggregated:

* **Secure path:** the numbers are held at the site (``hold_for_secure_round``) and sent with
  the site's stage-(e) unmask reply (``release_held``), i.e. only after the site has checked
  that every neighbour received the same model (stage b, signed by the neighbours' roster
  keys) and that enough neighbours signed the survivor set for the aggregate to be unmasked.
  A coordinator that stops after stage (a), or sends this site its own encoder, gets nothing.
* **Both paths:** one monitor per round of a run (``first_monitor_of_round``): a coordinator
  that replays a round with other weights gets no second answer.
* **Plain path:** the site cannot tell whether other sites got the same encoder, so it does
  not run the monitor there unless ``policy.share_monitor_on_plain_path`` says so (a trusted
  coordinator: ``ctfed simulate``'s sites do).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch

from flwr.app import ConfigRecord, Context, MetricRecord

from ctfed.client.site import SiteData
from ctfed.common.config import SitePolicy
from ctfed.common.exchange import RoundInstructions
from ctfed.common.labelled import NotEvaluableError
from ctfed.common.monitor import SECONDS_KEY, site_monitor

logger = logging.getLogger(__name__)

# context.state: a secure round's monitor numbers, held until its unmask stage; the last
# server round of this run whose encoder was monitored.
HELD_MONITOR_KEY = "monitor-held"
MONITORED_ROUND_KEY = "monitor-last-round"
_ROUND_FIELD = "server-round"

# Sites (in this process) that already logged why they skip the monitor: the reason stays the
# same every round, so once is enough.
_skips_logged: set[str] = set()


def monitor_metrics(
    site: SiteData,
    instructions: RoundInstructions,
    global_state: Mapping[str, torch.Tensor],
) -> dict[str, float | int]:
    """The ``monitor-*`` reply metrics of ``global_state`` on this site's labelled scans, with
    ``monitor-seconds``; empty when the coordinator did not ask or the labels cannot be split."""
    settings = instructions.monitor_settings()
    if settings is None:
        return {}
    monitor, finetune = settings
    started = time.perf_counter()
    try:
        result = site_monitor(site.dataset, instructions.model, global_state, finetune, monitor.knn_k, monitor.max_scans)
    except NotEvaluableError as err:
        if site.site_id not in _skips_logged:
            _skips_logged.add(site.site_id)
            logger.info("site %s: no representation monitor in phase 1 (labels cannot be split): %s", site.site_id, err)
        return {}
    seconds = time.perf_counter() - started
    logger.info(
        "site %s: global encoder kNN accuracy %.3f (k=%d, %d scans), feature std %.4f (uniform %.4f), %.1f s",
        site.site_id, result.knn_accuracy, result.k, result.scans, result.embedding_std, result.uniform_std, seconds,
    )
    return {**result.to_metrics(), SECONDS_KEY: seconds}


def monitor_allowed(policy: SitePolicy, secure_path: bool) -> bool:
    """Whether the site's policy lets the monitor run on this round's message path."""
    if not policy.share_monitor:
        return False
    if secure_path or policy.share_monitor_on_plain_path:
        return True
    logger.info("representation monitor: not run on the plain path (without secure aggregation the site cannot check "
                "that the encoder is the one every site got); policy.share_monitor_on_plain_path: true runs it")
    return False


def first_monitor_of_round(context: Context, server_round: int, site_id: str) -> bool:
    """True (and remembered) the first time this run asks for a monitor in ``server_round`` or a
    later round; False for a replayed or earlier round, which gets no second answer."""
    last = context.state.get(MONITORED_ROUND_KEY)
    if last is not None and server_round <= int(last[_ROUND_FIELD]):
        logger.warning(
            "site %s: round %d asks for the representation monitor again (last monitored: round %d); "
            "no monitor this time (one per round: another encoder would be another label query)",
            site_id, server_round, int(last[_ROUND_FIELD]),
        )
        return False
    context.state[MONITORED_ROUND_KEY] = ConfigRecord({_ROUND_FIELD: int(server_round)})
    return True


def hold_for_secure_round(context: Context, monitor: Mapping[str, float | int]) -> None:
    """Keep a secure round's monitor numbers at the site until its unmask stage."""
    context.state.pop(HELD_MONITOR_KEY, None)
    if monitor:
        context.state[HELD_MONITOR_KEY] = MetricRecord(dict(monitor))


def drop_held(context: Context) -> None:
    """A secure round that ends early (an abort, a new round) releases nothing."""
    context.state.pop(HELD_MONITOR_KEY, None)


def release_held(context: Context) -> MetricRecord | None:
    """The held monitor numbers, removed from the site's state (they leave once)."""
    return context.state.pop(HELD_MONITOR_KEY, None)
