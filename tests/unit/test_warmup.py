"""The coordinator's warm-up query before round 1 (server/collect.py ``warm_up_sites``)."""

from __future__ import annotations

import logging

import pytest
from flwr.app import Context, Message

from ctfed.client.app import app as site_app
from ctfed.common.exchange import WARMUP_MESSAGE_TYPE
from ctfed.server.collect import warm_up_sites
from ctfed.simulations.runtime.faults import app as faulty_site_app
from ctfed.simulations.runtime.inprocess import InProcessGrid
from ctfed.common.config import ConfigError
from ctfed.simulations.config import load_simulation_config


@pytest.mark.parametrize("client_app", [site_app, faulty_site_app], ids=["site", "fault-injecting"])
def test_every_site_answers_the_warmup_with_nothing(client_app, caplog: pytest.LogCaptureFixture) -> None:
    replies: list[Message] = []

    def handle(msg: Message, context: Context) -> Message:
        reply = client_app(message=msg, context=context)  # the real ClientApp's dispatch
        replies.append(reply)
        return reply

    grid = InProcessGrid(handlers={WARMUP_MESSAGE_TYPE: handle}, node_ids=[11, 12, 13], drop_at={13: WARMUP_MESSAGE_TYPE})
    with caplog.at_level(logging.WARNING):
        assert warm_up_sites(grid, timeout_s=5.0) == {11, 12}
    assert "2 of 3 sites answered" in caplog.text
    assert len(replies) == 2 and not any(r.has_error() for r in replies)
    # Nothing of the site leaves with it: no arrays, metrics or config.
    assert all(len(r.content) == 0 for r in replies)


def test_warmup_timeout_is_checked() -> None:
    assert load_simulation_config([]).simulation.warmup_timeout_s > 0
    assert load_simulation_config(["simulation.warmup_timeout_s=0"]).simulation.warmup_timeout_s == 0
    with pytest.raises(ConfigError, match="warmup_timeout_s"):
        load_simulation_config(["simulation.warmup_timeout_s=-1"])
