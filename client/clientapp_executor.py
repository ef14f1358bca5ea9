"""The site's ClientApp executor: one warm process that forks a ClientApp process per message.

Flower 1.41's SuperNode runs each message in a fresh ``flwr-clientapp`` process (its
``run_clientapp`` pulls one task and exits), started by ``flower-superexec``. Each of those
processes imports Flower, torch, MONAI and ctfed before it can answer (about 6 s on one core),
and a SecAgg+ round is five messages per site, so a deployed round of a tiny model cost
minutes where the simulation takes seconds. ``ctfed site`` runs its SuperNode with
``--isolation process`` and starts this module beside it instead:

    python -m ctfed.client.clientapp_executor --runtime-api-address 127.0.0.1:PORT --parent-pid PID

It is Flower's own SuperExec loop (``run_superexec``: claim a task from the SuperNode's
Runtime API, launch it) with one change: the launch forks, from a ``multiprocessing``
fork server that imported the ClientApp once at site start, a child that runs Flower's own
``run_clientapp`` for that task's token. Each message still gets a process of its own
(nothing a message leaves in memory reaches the next; the round state travels in Flower's
Context as before), and it runs the same installed ``ctfed.client.app`` it would have
imported (the app bundle holds no ``ctfed`` package: Flower's ``load_app`` finds the site's
installed one either way). Bundles are still fetched, pinned and stored by the SuperNode
(``client/supernode_main.py``). Everything talks over the SuperNode's Runtime API on
127.0.0.1; the fork server listens on a Unix socket of its own, for this process only.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from collections.abc import Sequence
from logging import INFO
from types import ModuleType
from typing import Any

# The modules the fork server imports once, so no message pays for them: the ClientApp and,
# through it, torch, MONAI and the trainer; then one tiny trainer built (client/warm_start.py).
PRELOADED_MODULES = ("ctfed.client.app", "ctfed.client.warm_start")
# The loop asks the SuperNode's local Runtime API for a new task this often (Flower's default
# is 1 s, paid once per message): a local HTTP call, cheap at 20 a second.
TASK_POLL_INTERVAL_S = 0.05
# Flower 1.41's SuperExec module and the executor factory it calls by its module-global name.
HOOKED_MODULE = "flwr.supercore.superexec.run_superexec"
HOOKED_FUNCTION = "get_executor"
_POLL_INTERVAL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


class HookUnavailable(RuntimeError):
    """Flower's SuperExec internals this executor relies on are not there (Flower upgraded?)."""


def run_task(runtime_api_address: str, token: str, parent_pid: int | None) -> None:
    """One message, in a forked child: what ``flwr-clientapp --insecure --token T`` runs."""
    from flwr.supercore import log
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    log(INFO, "Start `flwr-clientapp` process (forked, pid %s)", os.getpid())
    run_clientapp(
        runtime_api_address=runtime_api_address,
        token=token,
        insecure=True,  # the Runtime API is this SuperNode's own, on 127.0.0.1 (site_cli.supernode_command)
        certificates=None,
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def forking_executor_class() -> type:
    """Flower's ``SubprocessExecutor`` whose launch forks a preloaded child instead of ``flwr-clientapp``."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    class ForkingClientAppExecutor(SubprocessExecutor):
        """Launches ClientApp tasks as children of a fork server that imported the ClientApp."""

        def __init__(self, context: Any) -> None:
            self.context = context

        def launch(self, spec: Any) -> Any:
            multiprocessing.active_children()  # reaps the children whose message is done
            if spec.task_type != TaskType.CLIENT_APP:
                return LaunchResult.failed(f"this site runs ClientApp tasks only, not {spec.task_type}")
            if spec.runtime_dependency_install:
                return LaunchResult.failed("runtime dependency installation is not allowed at this site")
            # By its importable name, never ``__main__``'s: the fork server unpickles the target.
            from ctfed.client.clientapp_executor import run_task as target

            child = self.context.Process(
                target=target, args=(spec.runtime_api_address, spec.token, spec.parent_pid),
                name=f"clientapp-task-{spec.task_id}",
            )
            child.start()
            return LaunchResult.accepted()

        def close(self) -> None:
            for child in multiprocessing.active_children():
                child.terminate()

    return ForkingClientAppExecutor


def start_fork_server(preload: Sequence[str] = PRELOADED_MODULES) -> Any:
    """A ``forkserver`` context whose server is started now and imports ``preload`` once."""
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    forkserver.ensure_running()
    return context


def install_executor(module: ModuleType, context: Any) -> None:
    """Make Flower's SuperExec loop in ``module`` launch tasks through the fork server."""
    if not callable(getattr(module, HOOKED_FUNCTION, None)) or not callable(getattr(module, "run_superexec", None)):
        raise HookUnavailable(f"{HOOKED_MODULE} has no {HOOKED_FUNCTION} or run_superexec (Flower upgraded?)")
    executor = forking_executor_class()(context)
    setattr(module, HOOKED_FUNCTION, lambda *args, **kwargs: executor)


def main(argv: Sequence[str] | None = None) -> None:
    import importlib

    parser = argparse.ArgumentParser(prog="ctfed-clientapp-executor", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, 127.0.0.1:PORT")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) exits")
    args = parser.parse_args(argv)
    host = args.runtime_api_address.rpartition(":")[0]
    if host not in {"127.0.0.1", "localhost"}:
        parser.exit(2, f"ctfed-clientapp-executor: the Runtime API must be on 127.0.0.1, not {host}\n")

    os.environ[_POLL_INTERVAL_ENV] = str(TASK_POLL_INTERVAL_S)
    context = start_fork_server()
    module = importlib.import_module(HOOKED_MODULE)
    try:
        install_executor(module, context)
    except HookUnavailable as err:
        parser.exit(2, f"ctfed-clientapp-executor: {err}\n")
    from flwr.supercore import log

    log(INFO, "ctfed: ClientApp executor ready: each message forks a process that imported %s once", ", ".join(PRELOADED_MODULES))
    module.run_superexec(runtime_api_address=args.runtime_api_address, insecure=True, parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
