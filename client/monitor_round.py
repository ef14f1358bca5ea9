"""A site's representation monitor in a phase-1 round (common/monitor.py does the maths).

Run on the global encoder the site has just received, before local training: every site
scores the same encoder, so differences between sites reflect their data, and round 1 is the
initial encoder's baseline. The numbers (kNN accuracy, feature spread, scans used) travel as
reply metrics in clear, like the loss; ``policy.share_monitor: false`` keeps them (and skips
the work). A site whose labels cannot be split skips the monitor, logging why once, and the
round goes on: the monitor never refuses a round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch

from ctfed.client.site import SiteData
from ctfed.common.exchange import RoundInstructions
from ctfed.common.labelled import NotEvaluableError
from ctfed.common.monitor import SECONDS_KEY, site_monitor

logger = logging.getLogger(__name__)

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
