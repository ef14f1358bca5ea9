"""A Grid that delivers messages to site handlers in this process (no Flower runtime).

Tests and ``ctfed bench`` use it to run the coordinator's real round code against the
sites' real stage handlers, with per-site ``Context``s and scripted dropouts. Like a
deployment, every site gets a secure-aggregation signing key and the federation's roster in
its node config (``auth_dir``; a temporary folder by default).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from ctfed.client.secagg import ROSTER_KEY, SIGNING_KEY_KEY
from ctfed.client.site import SITE_ID_KEY, identify_site
from ctfed.common.certs import ensure_federation_signing_keys
from ctfed.common.config import ConfigError

Handler = Callable[[Message, Context], Message]


def ensure_task_identity(run_id: int = 1) -> None:
    """Outside a Flower process nothing has set who "we" are; Message() needs it."""
    for name, value in (("run_id", run_id), ("node_id", 0), ("task_id", 0)):
        try:
            getattr(TaskIdentity, name)
        except RuntimeError:
            setattr(TaskIdentity, name, value)


@dataclass
class InProcessGrid:
    """Routes each message to ``handlers[message_type]`` with the destination node's Context.

    ``drop_at[node_id] = message_type``: from that stage on the node never replies (as if
    it went offline). ``seconds_by_type`` accumulates handler time per message type, and
    ``seconds_by_node_type`` per (node, message type), so callers can tell the time sites
    would spend in parallel from the time this process spends running them one by one.
    """

    handlers: dict[str, Handler]
    node_ids: list[int]
    drop_at: dict[int, str] = field(default_factory=dict)
    contexts: dict[int, Context] = field(default_factory=dict)
    seconds_by_node_type: dict[tuple[int, str], float] = field(default_factory=dict)
    run_id: int = 1
    # Where the sites' signing keys and roster are written (None: a temporary folder that
    # lives as long as the grid). A node's site id is its node config's site-id, else the one
    # ``identify_site`` finds, else ``site-<node id>``.
    auth_dir: Path | None = None

    def __post_init__(self) -> None:
        ensure_task_identity(self.run_id)
        for node_id in self.node_ids:
            self.contexts.setdefault(
                node_id,
                Context(run_id=self.run_id, node_id=node_id, node_config={"partition-id": self.node_ids.index(node_id)}, state=RecordDict(), run_config={}),
            )
        self._stopped: set[int] = set()
        self._give_keys()

    def _give_keys(self) -> None:
        if self.auth_dir is None:
            self._auth_tmp = tempfile.TemporaryDirectory(prefix="ctfed-secagg-keys-")
            self.auth_dir = Path(self._auth_tmp.name)
        site_ids: dict[int, str] = {}
        for node_id in self.node_ids:
            config = self.contexts[node_id].node_config
            site_id = str(config.get(SITE_ID_KEY, ""))
            if not site_id:
                try:
                    site_id = identify_site(self.contexts[node_id]).site_id
                except ConfigError:  # a scripted site without data: named after its node
                    site_id = f"site-{node_id}"
            site_ids[node_id] = site_id
        roster, keys = ensure_federation_signing_keys(self.auth_dir, sorted(set(site_ids.values())))
        for node_id, site_id in site_ids.items():
            config = self.contexts[node_id].node_config
            config.setdefault(SITE_ID_KEY, site_id)
            config.setdefault(SIGNING_KEY_KEY, str(keys[site_id]))
            config.setdefault(ROSTER_KEY, str(roster))

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def set_run_id(self, run_id: int) -> None:
        self.run_id = run_id

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        """Each site's reply, made when the caller asks for it (a generator): a caller that
        consumes replies one by one holds one at a time, as over Flower's push/pull."""
        for message in list(messages):
            node_id = message.metadata.dst_node_id
            kind = message.metadata.message_type
            if self.drop_at.get(node_id) == kind:
                self._stopped.add(node_id)
            if node_id in self._stopped or node_id not in self.contexts:
                continue
            started = time.perf_counter()
            try:
                reply = self.handlers[kind](message, self.contexts[node_id])
            except Exception as err:  # noqa: BLE001 - a site's failure becomes an error reply, as in Flower
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)
            key = (node_id, kind)
            self.seconds_by_node_type[key] = self.seconds_by_node_type.get(key, 0.0) + time.perf_counter() - started
            del message
            yield reply
            del reply

    def parallel_seconds(self) -> float:
        """Time the sites' handlers would take if sites ran in parallel: per stage, the slowest."""
        per_kind: dict[str, float] = {}
        for (_, kind), seconds in self.seconds_by_node_type.items():
            per_kind[kind] = max(per_kind.get(kind, 0.0), seconds)
        return sum(per_kind.values())

    def serial_seconds(self) -> float:
        return sum(self.seconds_by_node_type.values())
