"""The site's warm ClientApp processes (client/clientapp_executor.py) and the SuperNode's follow-up
polling (client/supernode_main.py): the command ``ctfed site`` runs, the Flower internals they
hook, what the executor refuses, that a forked ClientApp process finds the ClientApp imported
already, and that the app pin still refuses an unpinned bundle under the polling wrapper."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import Message, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import ErrorCode
from flwr.supercore.constant import TaskType
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus
from flwr.supernode.nodestate import NodeStateFactory

from ctfed.client import clientapp_executor, supernode_main
from ctfed.client.site_cli import supernode_command
from ctfed.common.config import SiteConfig
from helpers import SITE, FakeSuperLink, tiny_app

pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")


def test_ctfed_site_runs_flowers_process_isolation_with_its_executor_on_loopback() -> None:
    command = supernode_command(SiteConfig(**SITE), 9999)
    launcher, flower = command[: command.index("--")], command[command.index("--") + 1:]
    assert launcher[launcher.index("--clientapp-executor") + 1] == "127.0.0.1:9999"
    assert flower[flower.index("--isolation") + 1] == "process"
    assert flower[flower.index("--host") + 1] == "127.0.0.1" and flower[flower.index("--port") + 1] == "9999"


def test_the_hooked_superexec_factory_is_still_looked_up_by_name() -> None:
    """Fails loudly when a Flower upgrade changes what the executor hooks."""
    module = importlib.import_module(clientapp_executor.HOOKED_MODULE)
    assert "executor = get_executor(" in inspect.getsource(module.run_superexec)
    with pytest.raises(clientapp_executor.HookUnavailable, match="has no get_executor"):
        clientapp_executor.install_executor(SimpleNamespace(run_superexec=lambda: None), context=None)  # type: ignore[arg-type]
    # flwr-clientapp's own entry point runs exactly one task per process: what the executor forks.
    cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    assert "run_clientapp(" in inspect.getsource(cli.flwr_clientapp)


def _spec(task_type: TaskType, *, install: bool = False) -> ExecutionSpec:
    return ExecutionSpec(
        task_type=task_type, runtime_api_address="127.0.0.1:1", token="t", insecure=True, root_certificates_path=None,
        runtime_dependency_install=install, parent_pid=None, suppress_output=False, task_id=7,
    )


class _NoProcesses:
    """A multiprocessing context that must not be asked for a process."""

    def Process(self, **_: object) -> None:  # noqa: N802
        raise AssertionError("no process may start for a refused task")


def test_the_executor_refuses_other_task_types_and_dependency_installation() -> None:
    executor = clientapp_executor.forking_executor_class()(_NoProcesses())
    refused = executor.launch(_spec(TaskType.SERVER_APP))
    assert refused.status == LaunchResultStatus.FAILED and "ClientApp tasks only" in refused.message
    refused = executor.launch(_spec(TaskType.CLIENT_APP, install=True))
    assert refused.status == LaunchResultStatus.FAILED and "dependency installation" in refused.message


def _report_imported(queue, names) -> None:  # noqa: ANN001
    queue.put({name: name in sys.modules for name in names})


def test_a_forked_process_finds_the_preloaded_module_imported_already() -> None:
    # A stdlib module nothing here imports stands in for ctfed.client.app (the same mechanism,
    # without its seconds of imports): only the fork server's preload can have imported it.
    assert "tabnanny" not in sys.modules
    context = clientapp_executor.start_fork_server(("tabnanny",))
    queue = context.Queue()
    child = context.Process(target=_report_imported, args=(queue, ["tabnanny"]))
    child.start()
    assert queue.get(timeout=60) == {"tabnanny": True}
    assert "tabnanny" not in sys.modules  # imported there, not in this process
    child.join(timeout=30)
    assert child.exitcode == 0


def test_follow_up_polling_asks_again_after_a_message_and_gives_up_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supernode_main, "FOLLOW_UP_POLL_S", 0.0)
    answers = iter([None, 3, None, None, 4])
    calls: list[int] = []

    def original() -> int | None:
        calls.append(1)
        return next(answers)

    pull = supernode_main.follow_up_pull(original)
    assert pull() is None and len(calls) == 1  # no message yet: Flower's own 3 s sleep follows
    assert pull() == 3 and len(calls) == 2
    assert pull() == 4 and len(calls) == 5  # within the window: asked again at once
    monkeypatch.setattr(supernode_main, "FOLLOW_UP_WINDOW_S", -1.0)
    answers = iter([None])
    assert pull() is None and len(calls) == 6  # past the window: one pull, then Flower's sleep


def test_the_pin_still_refuses_an_unpinned_bundle_under_the_polling_wrapper(
    tmp_path: Path, flower_task_identity: None
) -> None:
    module = importlib.import_module(supernode_main.HOOKED_MODULE)
    bundle = build_fab_from_disk(tiny_app(tmp_path / "app"))
    link = FakeSuperLink(Message(RecordDict(), dst_node_id=1, message_type="train"), bundle)
    pinned = supernode_main.pinned_pull_and_store(
        supernode_main.require_hook_points(module), [hashlib.sha256(b"reviewed").hexdigest()], module
    )
    pull = supernode_main.follow_up_pull(pinned)  # as main() installs them: polling outermost
    state = NodeStateFactory(ObjectStoreFactory()).state()
    state.set_node_id(1)
    run_id = pull(
        state=state, object_store=ObjectStoreFactory().store(), node_config={}, receive=link.receive,
        get_run=link.get_run, get_fab=link.get_fab, pull_object=link.pull_object,
        confirm_message_received=lambda run_id, mid: None, trusted_entities=None,
    )
    assert run_id == 5 and state.get_run(5) is None
    (reply,) = state.get_messages_legacy(run_ids=[5], is_reply=True)
    assert reply.error.code == ErrorCode.INVALID_FAB


def test_the_fork_server_builds_a_trainer_once_with_one_thread_and_restores_the_count() -> None:
    """client/warm_start.py, as the fork server imports it: a tiny trainer on random volumes
    (no site data), built with one torch thread, the process's thread count left as it was."""
    import subprocess

    code = (
        "import torch; torch.set_num_threads(2)\n"
        "import ctfed.client.warm_start as w\n"
        "print(torch.get_num_threads(), w.WARM_SECONDS > 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.split()[-2:] == ["2", "True"]
    assert "ctfed.client.warm_start" in clientapp_executor.PRELOADED_MODULES
