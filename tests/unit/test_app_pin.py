"""The app pin: ``site.trusted_app_hashes`` validation, ``ctfed site --app-hash``, and the hook of
Flower's SuperNode (client/supernode_main.py) run against Flower's own message handling with its
real in-memory NodeState and ObjectStore: an unpinned bundle is never stored, and the message
gets Flower's INVALID_FAB error reply; a pinned one goes through Flower's path unchanged."""

from __future__ import annotations

import hashlib
import importlib
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import Message, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import ErrorCode
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supernode.nodestate import NodeStateFactory

from ctfed.client.site_cli import app_bundle_hash, app_pin_status, supernode_command
from ctfed.client.supernode_main import (
    HOOKED_FUNCTION,
    HOOKED_MODULE,
    NOT_PINNED,
    HookUnavailable,
    install_app_pin,
    pinned_pull_and_store,
    require_hook_points,
)
from ctfed.common.cli import main
from ctfed.common.config import ConfigError, SiteConfig
from helpers import SITE, FakeSuperLink, tiny_app

pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")

# --- site.trusted_app_hashes -------------------------------------------------------------


def test_trusted_app_hashes_are_sha256_hex_digests() -> None:
    assert SiteConfig(**SITE).trusted_app_hashes == []  # default: unpinned
    good = [hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()]
    assert SiteConfig(**SITE, trusted_app_hashes=good).trusted_app_hashes == good
    for bad in (good[0].upper(), good[0][:-1], good[0] + "0", "z" * 64, f"sha256:{good[0]}", ""):
        with pytest.raises(ConfigError, match=r"site.trusted_app_hashes: .* is not a SHA-256 hex digest"):
            SiteConfig(**SITE, trusted_app_hashes=[good[0], bad])


def test_the_supernode_command_carries_every_pinned_hash_and_the_status_says_so() -> None:
    pins = [hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()]
    command = supernode_command(SiteConfig(**SITE, trusted_app_hashes=pins), 9999)
    launcher = command[: command.index("--")]
    assert launcher[1:3] == ["-m", "ctfed.client.supernode_main"]
    assert launcher[3:7] == ["--trusted-app-hash", pins[0], "--trusted-app-hash", pins[1]]
    assert "--superlink" in command[command.index("--"):]
    assert app_pin_status(SiteConfig(**SITE, trusted_app_hashes=pins)).endswith(f"sha256 {pins[0]}, {pins[1]}")
    assert NOT_PINNED in app_pin_status(SiteConfig(**SITE))
    assert "--trusted-app-hash" not in supernode_command(SiteConfig(**SITE), 9999)


# --- ctfed site --app-hash ----------------------------------------------------------------


def test_app_hash_prints_the_sha256_of_flowers_own_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = tiny_app(tmp_path / "app")
    assert main(["site", "--app-hash", str(app)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == hashlib.sha256(build_fab_from_disk(app)).hexdigest() == app_bundle_hash(app)
    # Deterministic (Flower fixes the zip dates): a rebuild, even of a fresh copy, is the same.
    assert app_bundle_hash(app) == printed
    # Any change to the code the site would run is a different bundle.
    (app / "tinyapp" / "client.py").write_text("app = None  # the coordinator's code\n")
    assert app_bundle_hash(app) != printed


def test_app_hash_of_a_folder_that_is_no_app_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["site", "--app-hash", str(tmp_path)]) == 1
    assert "no pyproject.toml there" in capsys.readouterr().err
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert main(["site", "--app-hash", str(tmp_path)]) == 1
    assert "Flower cannot build an app bundle from it" in capsys.readouterr().err
    assert main(["site"]) == 2  # neither --config nor --app-hash
    assert "--config SITE.yaml is required (unless" in capsys.readouterr().err


# --- the hook of Flower's SuperNode -------------------------------------------------------


def test_the_hooked_flower_function_is_still_there() -> None:
    """Fails loudly when a Flower upgrade moves what the pin hooks: the pin would be gone."""
    module = importlib.import_module(HOOKED_MODULE)
    original = require_hook_points(module)
    assert original is getattr(module, HOOKED_FUNCTION)
    # The SuperNode's loop must look it up by its module-global name, or the hook is bypassed.
    assert f"run_id = {HOOKED_FUNCTION}(" in inspect.getsource(module.start_client_internal)
    # The bundle is fetched through the ``get_fab`` argument, and stored only after that.
    source = inspect.getsource(original)
    assert source.index("get_fab(run_info.fab_hash") < source.index("state.store_fab(fab)")
    assert module.FAB_VERIFICATION_ERROR.code == ErrorCode.INVALID_FAB

    with pytest.raises(HookUnavailable, match="has no _pull_and_store_message"):
        require_hook_points(SimpleNamespace(_insert_message=None, Message=None, Error=None))  # type: ignore[arg-type]
    with pytest.raises(HookUnavailable, match="has no parameter get_fab"):
        require_hook_points(
            SimpleNamespace(_pull_and_store_message=lambda state, object_store, receive: None, _insert_message=None,
                            Message=None, Error=None)  # type: ignore[arg-type]
        )


def test_install_refuses_no_or_malformed_hashes() -> None:
    with pytest.raises(ValueError, match="nothing to pin"):
        install_app_pin([])
    with pytest.raises(ValueError, match="not SHA-256 hex digests"):
        install_app_pin(["ABC"])


def _pull_once(link: FakeSuperLink, trusted: list[str]):  # noqa: ANN202
    module = importlib.import_module(HOOKED_MODULE)
    state = NodeStateFactory(ObjectStoreFactory()).state()
    store = ObjectStoreFactory().store()
    state.set_node_id(1)
    hooked = pinned_pull_and_store(require_hook_points(module), trusted, module)
    run_id = hooked(
        state=state, object_store=store, node_config={}, receive=link.receive, get_run=link.get_run,
        get_fab=link.get_fab, pull_object=link.pull_object, confirm_message_received=lambda run_id, mid: None,
        trusted_entities=None,
    )
    return run_id, state


def test_an_unpinned_bundle_is_never_stored_and_gets_flowers_invalid_fab_reply(
    tmp_path: Path, flower_task_identity: None
) -> None:
    bundle = build_fab_from_disk(tiny_app(tmp_path / "app"))
    digest = hashlib.sha256(bundle).hexdigest()
    link = FakeSuperLink(Message(RecordDict(), dst_node_id=1, message_type="train"), bundle)
    run_id, state = _pull_once(link, [hashlib.sha256(b"the release this site reviewed").hexdigest()])
    assert run_id == 5 and link.fabs_fetched == 1
    assert state.get_fab(digest) is None and state.get_run(5) is None  # never stored, so never run
    (reply,) = state.get_messages_legacy(run_ids=[5], is_reply=True)
    assert reply.has_error() and reply.error.code == ErrorCode.INVALID_FAB
    assert f"app bundle sha256 {digest} is not among this site's trusted_app_hashes" in reply.error.reason
    assert reply.metadata.reply_to_message_id == link.message.metadata.message_id
    assert not state.get_messages_legacy(run_ids=[5], is_reply=False)  # the instruction itself is not kept


def test_a_pinned_bundle_goes_through_flowers_path_unchanged(tmp_path: Path, flower_task_identity: None) -> None:
    bundle = build_fab_from_disk(tiny_app(tmp_path / "app"))
    digest = hashlib.sha256(bundle).hexdigest()
    link = FakeSuperLink(Message(RecordDict(), dst_node_id=1, message_type="train"), bundle)
    run_id, state = _pull_once(link, [hashlib.sha256(b"another").hexdigest(), digest])
    assert run_id == 5
    assert state.get_fab(digest).content == bundle and state.get_run(5) is not None
    assert not state.get_messages_legacy(run_ids=[5], is_reply=True)  # no error reply
    (stored,) = state.get_messages_legacy(run_ids=[5], is_reply=False)
    assert stored.metadata.message_id == link.message.metadata.message_id
