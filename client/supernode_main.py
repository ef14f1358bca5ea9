"""Flower's SuperNode, run so that it stores and runs only the app bundles this site pinned.

Flower puts a bundle's folder first on ``sys.path`` and takes its ClientApp from the bundle's
own pyproject.toml, so whoever submits the bundle decides what code runs at the site: its
policy, DP, secure aggregation and audit included. Flower 1.41's own remedy (signed bundles,
``--trusted-entities``) needs a SuperLink that supports app verification; without one the
SuperNode refuses every bundle. ``ctfed site`` therefore starts the SuperNode through this
module, in the same process (signals and process group unchanged), with the SHA-256 of every
bundle the site agreed to run (``site.trusted_app_hashes``):

    python -m ctfed.client.supernode_main [--trusted-app-hash H ...] [--clientapp-executor 127.0.0.1:PORT] \
        [--heartbeat-interval S] -- <flower-supernode args>

A bundle with any other hash is never stored or run: the message that brought it gets
Flower's INVALID_FAB error reply, the one Flower sends when a bundle fails verification, and
the site's log names the bundle's hash. Without any hash every bundle runs (warned loudly).

With ``--clientapp-executor`` (``ctfed site`` passes it, with ``--isolation process``) this
process also starts ``client/clientapp_executor.py`` for the Runtime API at that address: the
ClientApp is imported once per site, not once per message. And the SuperNode asks the
SuperLink for the next message every ``FOLLOW_UP_POLL_S`` for ``FOLLOW_UP_WINDOW_S`` after
handling one, instead of Flower's fixed 3 s: a SecAgg+ round is five messages in a row,
and each paid up to 3 s of the SuperNode's sleep. ``--heartbeat-interval`` sets how often it
tells the SuperLink it is alive (``site.heartbeat_interval_s``), which bounds how long a round
waits before it counts a dead site as dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Sequence
from logging import ERROR, INFO, WARNING
from pathlib import Path
from types import ModuleType
from typing import Any

from ctfed.common.config.site import APP_HASH_RULE, HEARTBEAT_MAX_S
from ctfed.common.fileio import write_json_atomic

# The Flower function hooked: ``_pull_and_store_message`` of flwr.supernode.start_client_internal
# (flwr 1.41). The SuperNode's loop calls it, by its module-global name, for every message; it
# fetches the run's bundle (its ``get_fab`` argument), verifies it (trusted entities), and
# only then stores it for the ClientApp process. Wrapping it lets the bundle be checked right
# after the fetch and before anything is stored, and answers a refusal exactly as Flower
# answers a failed verification (``_insert_message`` of an INVALID_FAB reply), without copying
# any of its code. These names must exist with these parameters: ``require_hook_points`` says
# so loudly (and tests/unit/test_app_pin.py fails) when a Flower upgrade moves them.
HOOKED_MODULE = "flwr.supernode.start_client_internal"
HOOKED_FUNCTION = "_pull_and_store_message"
HOOK_PARAMETERS = ("state", "object_store", "receive", "get_fab")
NOT_PINNED = "app not pinned: this site runs any code the coordinator submits"
# After a message, the next stage of the protocol usually follows within seconds (the
# coordinator waits for the other sites' replies): ask this often, for this long, before
# falling back to Flower's 3 s between pulls. One small HTTPS request per poll.
FOLLOW_UP_POLL_S = 0.2
FOLLOW_UP_WINDOW_S = 30.0
# Where Flower 1.41 reads the SuperNode's heartbeat interval, each at call time: the interval
# the SuperNode announces on activation and with every heartbeat (the SuperLink's patience is
# twice it), and the one its HeartbeatSender waits by. ``--heartbeat-interval`` sets both.
HEARTBEAT_CONSTANT = "HEARTBEAT_DEFAULT_INTERVAL"
HEARTBEAT_MODULES = ("flwr.supernode.fleet_http_connection", "flwr.supercore.heartbeat")
# The SuperNode's heartbeat sender, by its module-global name there (``HeartbeatSender(fn)``,
# fn() -> bool: whether the SuperLink took the heartbeat).
HEARTBEAT_SENDER_MODULE = "flwr.supernode.fleet_http_connection"
HEARTBEAT_SENDER = "HeartbeatSender"
# Flower's SuperLink counts a node online until its last heartbeat plus this many intervals
# (flwr.common.constant.HEARTBEAT_PATIENCE) and refuses to activate its key again before then.
HEARTBEAT_PATIENCE = 2
# Waited past that moment: the two machines' request latencies.
EXPIRY_MARGIN_S = 1.0


class HookUnavailable(RuntimeError):
    """The Flower internals the pin relies on are not there (a Flower upgrade moved them)."""


class UnpinnedBundle(Exception):
    """A fetched bundle whose SHA-256 is not pinned (raised inside the hooked function)."""

    def __init__(self, digest: str, run_id: int) -> None:
        super().__init__(digest)
        self.digest = digest
        self.run_id = run_id


def refusal_reason(digest: str) -> str:
    """The error reason the coordinator gets for a bundle this site did not pin."""
    return f"The FAB could not be verified: app bundle sha256 {digest} is not among this site's trusted_app_hashes"


def require_hook_points(module: ModuleType) -> Callable[..., int | None]:
    """The function to hook, after checking everything the hook uses is there (else HookUnavailable)."""
    missing = [name for name in (HOOKED_FUNCTION, "_insert_message", "Message", "Error") if not hasattr(module, name)]
    if missing:
        raise HookUnavailable(f"{HOOKED_MODULE} has no {', '.join(missing)} (Flower upgraded?): the app pin cannot be enforced")
    function = getattr(module, HOOKED_FUNCTION)
    parameters = inspect.signature(function).parameters
    absent = [name for name in HOOK_PARAMETERS if name not in parameters]
    if absent:
        raise HookUnavailable(
            f"{HOOKED_MODULE}.{HOOKED_FUNCTION} has no parameter {', '.join(absent)} (Flower upgraded?): "
            "the app pin cannot be enforced"
        )
    return function


def pinned_pull_and_store(
    original: Callable[..., int | None], trusted: Collection[str], module: ModuleType
) -> Callable[..., int | None]:
    """``original`` (Flower's ``_pull_and_store_message``) refusing bundles whose SHA-256 is not in ``trusted``."""
    from flwr.common.constant import ErrorCode
    from flwr.supercore import log

    trusted = frozenset(trusted)
    signature = inspect.signature(original)

    def pull_and_store(*args: Any, **kwargs: Any) -> int | None:
        bound = signature.bind(*args, **kwargs)
        receive, get_fab = bound.arguments["receive"], bound.arguments["get_fab"]
        received: list[Any] = []

        def remembering_receive() -> Any:
            pulled = receive()
            if pulled is not None:
                received.append(pulled[0])
            return pulled

        def checking_get_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            # The content's own hash, never the hash the SuperLink names it by.
            digest = hashlib.sha256(fab.content).hexdigest()
            if digest not in trusted:
                raise UnpinnedBundle(digest, run_id)
            return fab

        bound.arguments["receive"] = remembering_receive
        bound.arguments["get_fab"] = checking_get_fab
        try:
            return original(*bound.args, **bound.kwargs)
        except UnpinnedBundle as refused:
            log(
                ERROR,
                "ctfed: REFUSED the app bundle of run %s: its sha256 %s is not among site.trusted_app_hashes; "
                "nothing of it is stored or run, an INVALID_FAB error reply is sent",
                refused.run_id,
                refused.digest,
            )
            reply = module.Message(module.Error(ErrorCode.INVALID_FAB, refusal_reason(refused.digest)), reply_to=received[-1])
            module._insert_message(reply, bound.arguments["state"], bound.arguments["object_store"])
            return refused.run_id

    pull_and_store.__wrapped__ = original  # type: ignore[attr-defined]
    return pull_and_store


def install_app_pin(trusted: Collection[str]) -> None:
    """Make this process's SuperNode refuse every bundle whose SHA-256 is not in ``trusted``."""

    bad = [digest for digest in trusted if not APP_HASH_RULE.match(digest)]
    if bad:
        raise ValueError(f"not SHA-256 hex digests (64 lowercase hex): {bad}")
    if not trusted:
        raise ValueError("no trusted app hash: nothing to pin")
    module = importlib.import_module(HOOKED_MODULE)
    original = require_hook_points(module)
    setattr(module, HOOKED_FUNCTION, pinned_pull_and_store(original, trusted, module))


def follow_up_pull(original: Callable[..., int | None]) -> Callable[..., int | None]:
    """``original`` (Flower's ``_pull_and_store_message``), asking again every ``FOLLOW_UP_POLL_S``
    while no message came, for ``FOLLOW_UP_WINDOW_S`` after the last one that did."""
    last_message = [float("-inf")]

    def pull(*args: Any, **kwargs: Any) -> int | None:
        while True:
            run_id = original(*args, **kwargs)
            now = time.monotonic()
            if run_id is not None:
                last_message[0] = now
                return run_id
            if now - last_message[0] > FOLLOW_UP_WINDOW_S:
                return None  # idle: Flower's loop sleeps its 3 s
            time.sleep(FOLLOW_UP_POLL_S)

    pull.__wrapped__ = original  # type: ignore[attr-defined]
    return pull


def install_follow_up_pull() -> None:
    """Make this process's SuperNode poll quickly for a protocol's next message (outermost wrapper)."""

    module = importlib.import_module(HOOKED_MODULE)
    original = require_hook_points(module)
    setattr(module, HOOKED_FUNCTION, follow_up_pull(original))


def set_heartbeat_interval(seconds: float) -> None:
    """This SuperNode's heartbeat interval (site.heartbeat_interval_s); HookUnavailable where
    a Flower upgrade moved the constant, so the setting is never silently ignored."""

    for name in HEARTBEAT_MODULES:
        module = importlib.import_module(name)
        if not isinstance(getattr(module, HEARTBEAT_CONSTANT, None), (int, float)):
            raise HookUnavailable(f"{name}.{HEARTBEAT_CONSTANT} is not there (a Flower upgrade?): cannot set the heartbeat interval")
        setattr(module, HEARTBEAT_CONSTANT, float(seconds))


def previous_connection_expiry(heartbeat_file: Path) -> float | None:
    """When the SuperLink lets this site's key connect again (``time.time()``), from the last
    heartbeat a SuperNode of this site recorded and did not end gracefully; None: no such."""
    try:
        record = json.loads(heartbeat_file.read_text(encoding="utf-8"))
        return float(record["time"]) + HEARTBEAT_PATIENCE * float(record["interval_s"]) + EXPIRY_MARGIN_S
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none, or unreadable (a crash mid-write): the retry in `ctfed site` remains


def wait_for_previous_connection(heartbeat_file: Path, sleep: Callable[[float], None] = time.sleep) -> float:
    """Before connecting: if a SuperNode of this site died (SIGKILL, power cut) less than two
    heartbeats ago, the SuperLink still counts it online and would refuse this one; wait until
    it does not. Returns the seconds waited."""
    from flwr.supercore import log

    expiry = previous_connection_expiry(heartbeat_file)
    wait = 0.0 if expiry is None else expiry - time.time()
    if wait <= 0:
        return 0.0
    wait = min(wait, HEARTBEAT_PATIENCE * HEARTBEAT_MAX_S + EXPIRY_MARGIN_S)  # a clock set back
    log(WARNING, "ctfed: this site's previous SuperNode did not stop gracefully; the SuperLink counts its connection "
        "as online for %.0f s more (two heartbeats): connecting after that", wait)
    sleep(wait)
    return wait


def record_heartbeats(heartbeat_file: Path, interval_s: float) -> None:
    """Make the SuperNode write the time of each heartbeat the SuperLink accepted to
    ``heartbeat_file`` (removed again when it ends gracefully, see ``main``)."""

    module = importlib.import_module(HEARTBEAT_SENDER_MODULE)
    sender = getattr(module, HEARTBEAT_SENDER, None)
    if not isinstance(sender, type):
        raise HookUnavailable(f"{HEARTBEAT_SENDER_MODULE}.{HEARTBEAT_SENDER} is not there (a Flower upgrade?)")

    def recording(heartbeat_fn: Callable[[], bool]) -> Any:
        def heartbeat() -> bool:
            accepted = heartbeat_fn()
            if accepted:
                with contextlib.suppress(OSError):
                    write_json_atomic(heartbeat_file, {"time": time.time(), "interval_s": interval_s})
            return accepted

        return sender(heartbeat)

    setattr(module, HEARTBEAT_SENDER, recording)


def start_clientapp_executor(runtime_api_address: str) -> subprocess.Popen:
    """``client/clientapp_executor.py`` for this SuperNode's Runtime API; it exits with this process.

    Without it no message is answered, so if it exits this SuperNode stops too (SIGTERM to
    itself, Flower's graceful exit), rather than stay connected and let every round time out.
    """
    import signal
    import threading

    from flwr.supercore import log

    executor = subprocess.Popen(
        [sys.executable, "-m", "ctfed.client.clientapp_executor",
         "--runtime-api-address", runtime_api_address, "--parent-pid", str(os.getpid())],
        stdin=subprocess.DEVNULL,
    )

    def stop_with_executor() -> None:
        code = executor.wait()
        if code in (0, -signal.SIGTERM):
            return  # a stop of the whole site (its process group), not a failure
        log(ERROR, "ctfed: the ClientApp executor exited (code %s): this site cannot answer; stopping the SuperNode", code)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_with_executor, name="clientapp-executor-watch", daemon=True).start()
    return executor


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``main`` (tests/unit/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(prog="ctfed-supernode", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trusted-app-hash", action="append", default=[], metavar="SHA256",
        help="SHA-256 of an app bundle this site runs (repeat for several); none: any bundle runs",
    )
    parser.add_argument(
        "--clientapp-executor", metavar="127.0.0.1:PORT",
        help="start ctfed's ClientApp executor for the Runtime API there (give flower-supernode --isolation process)",
    )
    parser.add_argument(
        "--heartbeat-interval", type=float, metavar="SECONDS",
        help="seconds between heartbeats to the SuperLink (site.heartbeat_interval_s); default: Flower's",
    )
    parser.add_argument(
        "--heartbeat-file", type=Path, metavar="PATH",
        help="record each accepted heartbeat here, and first wait out a previous SuperNode's connection that did not end",
    )
    parser.add_argument("flower_args", nargs=argparse.REMAINDER, help="-- then flower-supernode's arguments")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args

    from flwr.supercore import log
    from flwr.supernode.cli import flower_supernode

    if args.trusted_app_hash:
        try:
            install_app_pin(args.trusted_app_hash)
        except (HookUnavailable, ValueError) as err:
            parser.exit(2, f"ctfed-supernode: {err}\n")
        log(INFO, "ctfed: app pinned: only bundles with sha256 %s are stored or run", ", ".join(args.trusted_app_hash))
    else:
        log(WARNING, "ctfed: WARNING, %s (set site.trusted_app_hashes)", NOT_PINNED)
    try:
        install_follow_up_pull()  # after the pin: it wraps the pinned function
        if args.heartbeat_interval is not None:
            set_heartbeat_interval(args.heartbeat_interval)
        if args.heartbeat_file is not None:
            interval = args.heartbeat_interval or float(getattr(importlib.import_module(HEARTBEAT_MODULES[0]), HEARTBEAT_CONSTANT))
            record_heartbeats(args.heartbeat_file, interval)
    except HookUnavailable as err:
        parser.exit(2, f"ctfed-supernode: {err}\n")
    if args.clientapp_executor:
        if args.clientapp_executor.rpartition(":")[0] != "127.0.0.1":
            parser.exit(2, f"ctfed-supernode: --clientapp-executor must be 127.0.0.1:PORT, not {args.clientapp_executor}\n")
        start_clientapp_executor(args.clientapp_executor)
    if args.heartbeat_file is not None:
        wait_for_previous_connection(args.heartbeat_file)
    sys.argv = ["flower-supernode", *flower_args]
    try:
        flower_supernode()
    finally:
        # Reached on every exit but SIGKILL; Flower has deactivated the node by then (or never
        # activated it), so a restart need not wait.
        if args.heartbeat_file is not None:
            args.heartbeat_file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
