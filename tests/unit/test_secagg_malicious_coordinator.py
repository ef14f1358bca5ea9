"""Secure aggregation against a malicious coordinator (issue #12, points 1-4).

Each test plays an attacking coordinator against the sites' REAL stage handlers: the
coordinator's own round code (server/secagg.py) runs, and a hand-written attacker sitting
in its place rewrites what it sends to chosen sites (substituted or invented keys,
different survivor sets, different instructions, a weak threshold). Every attack must end
the round at the attacked site with a reason before it reveals anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

from ctfed.client import secagg as site_secagg
from ctfed.client.policy import POLICY_FILE_KEY, write_policy_file
from ctfed.common import secagg as sa
from ctfed.common.certs import (
    ensure_federation_signing_keys,
    load_roster,
    make_signing_key,
    signing_public_line,
    write_roster,
)
from ctfed.common.config import ConfigError, DistributedDPConfig, PrivacyConfig, PrivacyMode, RunConfig, SecAggConfig, SitePolicy
from ctfed.common.exchange import (
    ARRAYS_KEY,
    CONFIG_KEY,
    RoundInstructions,
    SiteReply,
    record_to_state,
    state_to_record,
)
from ctfed.server.secagg import secure_round
from ctfed.simulations.runtime.inprocess import InProcessGrid

from helpers import corrupt_field, train_message  # tests/helpers.py

NODES = [3, 5, 7, 11, 13]  # 5 sites, all neighbours: threshold 4 (> 2*5/3)
VICTIM = 7
SHARE_KEYS = sa.message_type(sa.STAGE_SHARE_KEYS)
CONSISTENCY = sa.message_type(sa.STAGE_CONSISTENCY)
UNMASK = sa.message_type(sa.STAGE_UNMASK)
TRAIN = sa.message_type(sa.STAGE_TRAIN)

Rewrite = Callable[[str, int, RecordDict], RecordDict]


@dataclass
class AttackingGrid(InProcessGrid):
    """The coordinator's messages pass through ``rewrite(message type, node, content)``
    (the attack) before the site's handler sees them; every reply is kept."""

    rewrite: Rewrite | None = None
    replies: dict[tuple[int, str], Message] = field(default_factory=dict)
    trained: set[int] = field(default_factory=set)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201 - Grid's signature
        sent = []
        for message in messages:
            kind, node = message.metadata.message_type, int(message.metadata.dst_node_id)
            content = self.rewrite(kind, node, message.content) if self.rewrite else message.content
            sent.append(Message(content, dst_node_id=node, message_type=kind, group_id=message.metadata.group_id))
        replies = list(super().send_and_receive(sent, timeout=timeout))
        for reply in replies:
            self.replies[(int(reply.metadata.src_node_id), reply.metadata.message_type)] = reply
        return replies

    def refusal(self, node: int, kind: str) -> str:
        """The reason the site gave for ending the round at ``kind`` (it must have refused)."""
        reply = self.replies[(node, kind)]
        assert reply.has_error(), f"node {node} answered {kind} with content: nothing may be revealed"
        return reply.error.reason


def _like() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"blocks.0.weight": torch.randn(16, 12), "cls_token": torch.randn(1, 1, 12)}


def _local_train(grid_ref: list[AttackingGrid]):
    """Stands in for the ClientApp's train handler: a fixed small delta per node."""

    def train(msg: Message, context: Context) -> Message:
        node = int(msg.metadata.dst_node_id)
        grid_ref[0].trained.add(node)
        gen = torch.Generator().manual_seed(node)
        delta = {name: torch.randn(t.shape, generator=gen) * 0.01 for name, t in _like().items()}
        content = RecordDict({ARRAYS_KEY: state_to_record(delta), **SiteReply(f"site-{node}", num_examples=4, loss=1.0).to_records()})
        return Message(content=content, reply_to=msg)

    return train


def _attack(
    rewrite: Rewrite | None, tmp_path: Path, secagg: SecAggConfig | None = None, nodes=NODES, prepare=None, run_id: int = 1,
    local_train=_local_train,
):
    """One secure round of the real coordinator code with ``rewrite`` in the middle."""
    cfg = RunConfig()
    cfg.secagg = secagg or SecAggConfig(num_shares=5)
    cfg.federation.min_sites = 2
    grid_ref: list[AttackingGrid] = []
    grid = AttackingGrid(
        site_secagg.stage_handlers(local_train(grid_ref)), list(nodes), auth_dir=tmp_path / "keys", rewrite=rewrite, run_id=run_id
    )
    grid_ref.append(grid)
    if prepare is not None:
        prepare(grid)
    like = _like()
    instructions = RoundInstructions(server_round=1, model=cfg.model, train=cfg.train, privacy=cfg.privacy).to_record()
    messages = [
        train_message(instructions, like, node_id=n) for n in nodes
    ]
    return secure_round(grid, messages, like, cfg, server_round=1), grid


def _payload(content: RecordDict) -> dict:
    return dict(content[sa.PROTOCOL_KEY].items())


def _with_payload(content: RecordDict, payload: dict) -> RecordDict:
    return RecordDict({**dict(content.items()), sa.PROTOCOL_KEY: ConfigRecord(payload)})


def _coordinator_advert(node: int, site_id: str, payload: dict, signing_key: Ed25519PrivateKey) -> tuple[bytes, bytes, bytes]:
    """Keys the coordinator owns, advertised as ``node``/``site_id`` and signed with its own key."""
    _, pk1 = generate_key_pairs()
    _, pk2 = generate_key_pairs()
    pk1, pk2 = public_key_to_bytes(pk1), public_key_to_bytes(pk2)
    index = payload[sa.K_NODE_IDS].index(VICTIM)  # the victim's own hashes: binding holds
    message = sa.advertisement_message(
        1, int(payload[sa.P_ROUND]), node, site_id, pk1, pk2,
        payload[sa.K_MODEL_HASHES][index], payload[sa.K_INSTRUCTIONS_HASHES][index],
    )
    return pk1, pk2, signing_key.sign(message)


# --- 1. signed key advertisements -----------------------------------------------------------


def _unsigned(payload: dict) -> None:
    for key in (sa.K_SITE_IDS, sa.K_MODEL_HASHES, sa.K_INSTRUCTIONS_HASHES, sa.K_SIGNATURES):
        del payload[key]


def _substituted(payload: dict) -> None:
    """Replace neighbour 11's keys by the coordinator's, keeping 11's signature."""
    index = payload[sa.K_NODE_IDS].index(11)
    pk1, pk2, _ = _coordinator_advert(11, "site-11", payload, Ed25519PrivateKey.generate())
    payload[sa.K_PK1_LIST] = [pk1 if i == index else k for i, k in enumerate(payload[sa.K_PK1_LIST])]
    payload[sa.K_PK2_LIST] = [pk2 if i == index else k for i, k in enumerate(payload[sa.K_PK2_LIST])]


def _replace_neighbour(payload: dict, site_id: str) -> None:
    """Neighbour 11 replaced by node 999, whose keys the coordinator owns and signs itself."""
    index = payload[sa.K_NODE_IDS].index(11)
    pk1, pk2, signature = _coordinator_advert(999, site_id, payload, Ed25519PrivateKey.generate())
    for key, value in ((sa.K_NODE_IDS, 999), (sa.K_PK1_LIST, pk1), (sa.K_PK2_LIST, pk2), (sa.K_SITE_IDS, site_id), (sa.K_SIGNATURES, signature)):
        payload[key] = [value if i == index else v for i, v in enumerate(payload[key])]


def _swapped_nodes(payload: dict) -> None:
    """Two neighbours' node ids swapped (their pairwise mask signs would flip)."""
    ids = payload[sa.K_NODE_IDS]
    a, b = ids.index(3), ids.index(13)
    ids[a], ids[b] = ids[b], ids[a]


ATTACKS = {
    "unsigned": (_unsigned, f"message lacks '{sa.K_SITE_IDS}'"),
    "substituted keys": (_substituted, "not signed by that site's roster key"),
    "invented neighbour": (lambda p: _replace_neighbour(p, "site-evil"), "not in this site's roster"),
    "impersonated site": (lambda p: _replace_neighbour(p, "site-11"), "not signed by that site's roster key"),
    "swapped node ids": (_swapped_nodes, "not signed by that site's roster key"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_forged_neighbour_advertisements_end_the_round_at_the_victim(attack: str, tmp_path: Path) -> None:
    tamper, reason = ATTACKS[attack]

    def rewrite(kind: str, node: int, content: RecordDict) -> RecordDict:
        if kind == SHARE_KEYS and node == VICTIM:
            payload = _payload(content)
            tamper(payload)
            return _with_payload(content, payload)
        return content

    result, grid = _attack(rewrite, tmp_path)
    # The victim sends no share (encrypted for keys the coordinator may own) and no input.
    assert reason in grid.refusal(VICTIM, SHARE_KEYS)
    assert (VICTIM, sa.message_type(sa.STAGE_MASKED_INPUT)) not in grid.replies
    victim = {s.site: s for s in result.sites}["site-7"]
    assert victim.status == "failed" and reason in victim.reason
    # The honest neighbours are untouched by the attack on the victim's view.
    for node in set(NODES) - {VICTIM}:
        assert not grid.replies[(node, SHARE_KEYS)].has_error()


def test_an_advertisement_replayed_from_another_run_is_refused(tmp_path: Path) -> None:
    """Same sites, keys, round, model and instructions: only the run id differs."""
    _, earlier = _attack(None, tmp_path, run_id=1)
    old = dict(earlier.replies[(11, TRAIN)].content[sa.PROTOCOL_KEY].items())
    fields = {sa.K_PK1_LIST: sa.K_PK1, sa.K_PK2_LIST: sa.K_PK2, sa.K_SIGNATURES: sa.K_SIGNATURE}

    def rewrite(kind: str, node: int, content: RecordDict) -> RecordDict:
        if kind == SHARE_KEYS and node == VICTIM:
            payload = _payload(content)
            index = payload[sa.K_NODE_IDS].index(11)
            for key, field_name in fields.items():
                payload[key] = [old[field_name] if i == index else v for i, v in enumerate(payload[key])]
            return _with_payload(content, payload)
        return content

    _, grid = _attack(rewrite, tmp_path, run_id=2)
    assert "not signed by that site's roster key for this run" in grid.refusal(VICTIM, SHARE_KEYS)


def test_phase_two_model_hash_is_the_same_for_a_whole_or_a_partial_classifier() -> None:
    """Phase 2 sends some sites the whole classifier and others only its trainable part over
    the base they hold; both must commit to the same model, and a stale base must not."""
    torch.manual_seed(1)
    current = {"stem.weight": torch.randn(8, 4), "head.weight": torch.randn(3, 8), "head.bias": torch.randn(3)}
    previous = {**current, "head.weight": torch.randn(3, 8)}  # last round's global: the head has moved since
    trainable = {name: current[name] for name in ("head.weight", "head.bias")}
    received_whole = state_to_record(current)
    held_base = state_to_record(record_to_state(state_to_record(previous)))  # as finetune_round stores it
    whole = sa.arrays_sha256([state_to_record(record_to_state(received_whole)), received_whole])
    partial = sa.arrays_sha256([held_base, state_to_record(trainable)])
    assert whole == partial == sa.arrays_sha256([state_to_record(current)])
    stale = {**trainable, "head.bias": trainable["head.bias"] + 1e-3}
    assert sa.arrays_sha256([held_base, state_to_record(stale)]) != whole


def test_an_honest_round_verifies_and_aggregates(tmp_path: Path) -> None:
    result, grid = _attack(None, tmp_path)
    assert result.mean_delta is not None, result.reason
    assert {s.status for s in result.sites} == {"aggregated"} and result.included_sites == len(NODES)
    for node in NODES:
        advert = grid.replies[(node, TRAIN)].content[sa.PROTOCOL_KEY]
        assert advert[sa.K_SITE_ID] == f"site-{node}" and len(advert[sa.K_SIGNATURE]) == 64


def _monitoring_train(grid_ref: list[AttackingGrid]):
    """The fixed small delta, with a representation monitor held back as the ClientApp does
    on the secure path (client/app.py: ``hold_for_secure_round``)."""
    from ctfed.client.monitor_round import hold_for_secure_round
    from ctfed.common.monitor import MonitorResult

    plain = _local_train(grid_ref)

    def train(msg: Message, context: Context) -> Message:
        node = int(msg.metadata.dst_node_id)
        hold_for_secure_round(context, MonitorResult(knn_accuracy=0.75, embedding_std=0.1, uniform_std=0.2, scans=8, k=3).to_metrics())
        assert node in NODES
        return plain(msg, context)

    return train


def test_the_monitor_comes_with_the_unmask_reply_only(tmp_path: Path) -> None:
    """Issue #12 point 10: the kNN monitor leaves a site only once it has checked that every
    neighbour received the same model and the round is being unmasked."""
    result, grid = _attack(None, tmp_path / "honest", local_train=_monitoring_train)
    assert result.mean_delta is not None, result.reason
    assert all(s.monitor is not None and s.monitor["knn_accuracy"] == 0.75 for s in result.sites)
    for node in NODES:  # not in stage (a)'s reply
        assert not [k for k in grid.replies[(node, TRAIN)].content.metric_records.get("metrics", {}) if k.startswith("monitor-")]

    def other_model(kind: str, node: int, content: RecordDict) -> RecordDict:
        if kind == TRAIN and node == VICTIM:
            return RecordDict({**dict(content.items()), ARRAYS_KEY: state_to_record({n: t + 1.0 for n, t in _like().items()})})
        return content

    def stop_after_train(kind: str, node: int, content: RecordDict) -> RecordDict:
        if kind == SHARE_KEYS:  # the coordinator breaks stage (b) for everyone: it only wanted (a)
            payload = _payload(content)
            _unsigned(payload)
            return _with_payload(content, payload)
        return content

    for name, rewrite in (("other-model", other_model), ("stop-after-train", stop_after_train)):
        result, grid = _attack(rewrite, tmp_path / name, local_train=_monitoring_train)
        assert result.mean_delta is None
        assert all(s.monitor is None for s in result.sites), name
        assert not [reply for (node, kind), reply in grid.replies.items() if reply.has_content()
                    and [k for k in reply.content.metric_records.get("metrics", {}) if k.startswith("monitor-")]]


def test_a_site_without_signing_key_or_roster_does_not_train(tmp_path: Path) -> None:
    def prepare(grid: AttackingGrid) -> None:
        del grid.contexts[VICTIM].node_config[site_secagg.ROSTER_KEY]

    result, grid = _attack(None, tmp_path, prepare=prepare)
    assert "no signing key and roster" in grid.refusal(VICTIM, TRAIN)
    assert VICTIM not in grid.trained  # refused before reading any data
    assert result.mean_delta is not None  # the other four still aggregate (threshold 3 of 4)


def test_a_roster_listing_another_key_for_the_site_is_refused(tmp_path: Path) -> None:
    def prepare(grid: AttackingGrid) -> None:
        roster_file = Path(str(grid.contexts[VICTIM].node_config[site_secagg.ROSTER_KEY]))
        table = {site: signing_public_line(key) for site, key in load_roster(roster_file).items()}
        table["site-7"] = make_signing_key(tmp_path / "other.key")
        write_roster(roster_file, table)

    _, grid = _attack(None, tmp_path, prepare=prepare)
    assert "does not list this site ('site-7') under its signing key" in grid.refusal(VICTIM, TRAIN)
    assert VICTIM not in grid.trained


# --- 2. consistency round ---------------------------------------------------------------------


def test_different_survivor_sets_never_reach_the_threshold(tmp_path: Path) -> None:
    """The coordinator tells two sites the victim dropped (they would reveal its sk1 shares)
    and the others it survived (they would reveal its self-mask seed shares): with both,
    the victim's input is exposed alone. No set gathers threshold signatures, so nobody reveals."""
    told_dropped = {11, 13}

    def rewrite(kind: str, node: int, content: RecordDict) -> RecordDict:
        if kind == CONSISTENCY and node in told_dropped:
            payload = _payload(content)
            payload[sa.K_SURVIVORS] = [n for n in payload[sa.K_SURVIVORS] if n != VICTIM]
            return _with_payload(content, payload)
        return content

    result, grid = _attack(rewrite, tmp_path)
    assert result.mean_delta is None
    # Each site signed what it was shown, so the view was consistent locally...
    for node in NODES:
        assert not grid.replies[(node, CONSISTENCY)].has_error()
    # ...but no site had 4 neighbours' signatures over its own set: no share left any site.
    for node in NODES:
        assert "consistency check failed" in grid.refusal(node, UNMASK)


def test_a_survivor_set_too_small_to_reconstruct_is_refused(tmp_path: Path) -> None:
    def rewrite(kind: str, node: int, content: RecordDict) -> RecordDict:
        if kind == CONSISTENCY and node == VICTIM:
            return _with_payload(content, {**_payload(content), sa.K_SURVIVORS: [3, VICTIM, 11]})
        return content

    _, grid = _attack(rewrite, tmp_path)
    assert "below the reconstruction threshold 4" in grid.refusal(VICTIM, CONSISTENCY)


def test_forged_consistency_signatures_do_not_count(tmp_path: Path) -> None:
    """The coordinator signs the survivor set itself for the other neighbours."""
    forger = Ed25519PrivateKey.generate()

    def rewrite(kind: str, node: int, content: RecordDict) -> RecordDict:
        if kind == UNMASK and node == VICTIM:
            payload = _payload(content)
            payload[sa.K_SIGNATURES] = [
                sig if signer == VICTIM else forger.sign(sa.consistency_message(1, 1, signer, NODES))
                for signer, sig in zip(payload[sa.K_SIGNERS], payload[sa.K_SIGNATURES])
            ]
            return _with_payload(content, payload)
        return content

    _, grid = _attack(rewrite, tmp_path)
    assert "consistency check failed: 1 valid" in grid.refusal(VICTIM, UNMASK)


# --- 3. round binding -------------------------------------------------------------------------


def test_different_instructions_for_everyone_but_the_victim_end_the_round(tmp_path: Path) -> None:
    """``train.lr=1e-30`` to all but the victim would make the "secure" sum the victim's update."""

    def rewrite(kind: str, node: int, content: RecordDict) -> RecordDict:
        if kind == TRAIN and node != VICTIM:
            instructions = dict(content[CONFIG_KEY].items())
            assert "train.lr" in instructions
            instructions["train.lr"] = 1e-30
            return RecordDict({**dict(content.items()), CONFIG_KEY: ConfigRecord(instructions)})
        return content

    result, grid = _attack(rewrite, tmp_path)
    assert result.mean_delta is None
    assert "round binding: site 'site-3' received different instructions" in grid.refusal(VICTIM, SHARE_KEYS)
    assert "round binding: site 'site-7' received different instructions" in grid.refusal(3, SHARE_KEYS)


def test_a_different_model_for_the_victim_ends_the_round(tmp_path: Path) -> None:
    def rewrite(kind: str, node: int, content: RecordDict) -> RecordDict:
        if kind == TRAIN and node == VICTIM:
            other = {name: t + 1.0 for name, t in _like().items()}
            return RecordDict({**dict(content.items()), ARRAYS_KEY: state_to_record(other)})
        return content

    result, grid = _attack(rewrite, tmp_path)
    assert result.mean_delta is None
    assert "round binding: site 'site-3' received a different model" in grid.refusal(VICTIM, SHARE_KEYS)


def test_the_secagg_parameters_are_bound_too(tmp_path: Path) -> None:
    """A coarser quantisation (or any protocol parameter) for the victim alone is a mismatch."""

    def rewrite(kind: str, node: int, content: RecordDict) -> RecordDict:
        if kind == TRAIN and node == VICTIM:
            params = {**dict(content[sa.PARAMS_KEY].items()), sa.P_QUANTIZATION: 2**8}
            return RecordDict({**dict(content.items()), sa.PARAMS_KEY: ConfigRecord(params)})
        return content

    _, grid = _attack(rewrite, tmp_path)
    assert "different instructions" in grid.refusal(VICTIM, SHARE_KEYS)


# --- 4. site floors ---------------------------------------------------------------------------


def test_a_threshold_below_the_site_floor_is_refused(tmp_path: Path) -> None:
    """Threshold 3 of 5 (a bare majority, the old default) is below 2/3 at every site."""

    def rewrite(kind: str, node: int, content: RecordDict) -> RecordDict:
        if kind == SHARE_KEYS:
            return _with_payload(content, {**_payload(content), sa.P_THRESHOLD: 3})
        return content

    result, grid = _attack(rewrite, tmp_path)
    assert result.mean_delta is None
    for node in NODES:
        assert "reconstruction threshold 3 of 5 neighbours is not above this site's floor" in grid.refusal(node, SHARE_KEYS)
    # The coordinator's own configured weak threshold is refused the same way.
    result, grid = _attack(None, tmp_path / "configured", secagg=SecAggConfig(num_shares=5, reconstruction_threshold=3))
    assert result.mean_delta is None and "not above this site's floor" in grid.refusal(VICTIM, SHARE_KEYS)


def test_a_neighbourhood_below_the_site_min_sites_is_refused(tmp_path: Path) -> None:
    def prepare(grid: AttackingGrid) -> None:
        path = write_policy_file(SitePolicy(min_sites=6), tmp_path / "victim-state")
        grid.contexts[VICTIM].node_config[POLICY_FILE_KEY] = str(path)

    _, grid = _attack(None, tmp_path, prepare=prepare)
    assert "5 neighbours (itself included), below this site's policy.min_sites=6" in grid.refusal(VICTIM, SHARE_KEYS)


def test_site_policy_threshold_floor_is_validated() -> None:
    assert SitePolicy().min_secagg_threshold_fraction == pytest.approx(2 / 3)
    for bad in (0.4, 1.0):
        with pytest.raises(ConfigError, match="min_secagg_threshold_fraction"):
            SitePolicy(min_secagg_threshold_fraction=bad)


# --- keys and roster files ----------------------------------------------------------------------


def test_roster_files_are_checked(tmp_path: Path) -> None:
    roster, keys = ensure_federation_signing_keys(tmp_path, ["a", "b"])
    assert set(load_roster(roster)) == {"a", "b"} and keys["a"].stat().st_mode & 0o077 == 0
    again, _ = ensure_federation_signing_keys(tmp_path, ["a", "b"])  # a resumed run keeps its keys
    assert again.read_text() == roster.read_text()
    table = {site: signing_public_line(key) for site, key in load_roster(roster).items()}
    (tmp_path / "dup.yaml").write_text(f'a: "{table["a"]}"\nb: "{table["a"]}"\n')
    with pytest.raises(ConfigError, match="same key"):
        load_roster(tmp_path / "dup.yaml")
    (tmp_path / "bad.yaml").write_text('a: "ssh-rsa AAAA"\n')
    with pytest.raises(ConfigError, match="not an OpenSSH public key"):
        load_roster(tmp_path / "bad.yaml")


def test_an_abort_is_audited_with_its_reason(tmp_path: Path) -> None:
    """In the ClientApp every stage is audited: an abort writes its stage and reason."""
    from ctfed.client.audit import AUDIT_FILE, verify_audit_log
    from ctfed.client.site import DATA_PATH_KEY, STATE_DIR_KEY

    def prepare(grid: AttackingGrid) -> None:
        for node, context in grid.contexts.items():
            context.node_config.update({DATA_PATH_KEY: str(tmp_path / f"site-{node}"), STATE_DIR_KEY: str(tmp_path / f"state-{node}")})
        grid.handlers[SHARE_KEYS] = site_secagg._audited(sa.STAGE_SHARE_KEYS, grid.handlers[SHARE_KEYS])

    def rewrite(kind: str, node: int, content: RecordDict) -> RecordDict:
        if kind == SHARE_KEYS and node == VICTIM:
            payload = _payload(content)
            _unsigned(payload)
            return _with_payload(content, payload)
        return content

    _, grid = _attack(rewrite, tmp_path, prepare=prepare)
    assert not grid.replies[(3, SHARE_KEYS)].has_error()  # an honest neighbour's reply is audited as usual
    assert json.loads((tmp_path / "state-3" / AUDIT_FILE).read_text())["kind"] == f"secagg-{sa.STAGE_SHARE_KEYS}"
    path = tmp_path / f"state-{VICTIM}" / AUDIT_FILE
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert verify_audit_log(path) == 1
    assert entries[0]["kind"] == "secagg-abort" and entries[0]["round"] == 1
    assert entries[0]["reason"].startswith("secagg_share_keys: ") and f"lacks '{sa.K_SITE_IDS}'" in entries[0]["reason"]


def test_a_site_makes_its_own_signing_key_and_pins_the_roster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ctfed.client.site_cli import node_config
    from ctfed.common.certs import check_site_signing
    from ctfed.common.cli import main
    from ctfed.common.config import read_site_config

    yaml = tmp_path / "site.yaml"
    yaml.write_text(
        "site_id: hospital-a\ndata_path: cache\nsuperlink: fl.example.org:8000\nca_cert: ca.crt\nprivate_key: a.key\n"
        "signing_key: keys/sign.key\nroster: roster.yaml\n"
    )
    assert main(["site", "--config", str(yaml), "--make-signing-key"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith('hospital-a: "ssh-ed25519 ')
    key_file = tmp_path / "keys" / "sign.key"
    assert key_file.stat().st_mode & 0o077 == 0
    assert main(["site", "--config", str(yaml), "--make-signing-key"]) == 1  # never silently replaced
    assert "exists" in capsys.readouterr().err

    (tmp_path / "roster.yaml").write_text(line + "\n")
    cfg = read_site_config(yaml)
    check_site_signing(cfg.site_id, cfg.signing_key, cfg.roster)
    config = node_config(cfg)
    assert f'{site_secagg.SIGNING_KEY_KEY}="{key_file}"' in config
    assert f'{site_secagg.ROSTER_KEY}="{tmp_path / "roster.yaml"}"' in config
    with pytest.raises(ConfigError, match="does not list this site"):
        check_site_signing("hospital-b", cfg.signing_key, cfg.roster)
    with pytest.raises(ConfigError, match="go together"):
        check_site_signing(cfg.site_id, cfg.signing_key, "")


def test_a_site_makes_its_supernode_and_signing_keys_itself(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue #12 point 12: only public keys leave the site."""
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from ctfed.common.cli import main

    yaml = tmp_path / "site.yaml"
    yaml.write_text(
        "site_id: hospital-a\ndata_path: cache\nsuperlink: fl.example.org:8000\nca_cert: ca.crt\nprivate_key: keys/a.key\n"
        "signing_key: keys/sign.key\nroster: roster.yaml\n"
    )
    assert main(["site", "--config", str(yaml), "--make-keys"]) == 0
    out = capsys.readouterr().out
    private, public = tmp_path / "keys" / "a.key", tmp_path / "keys" / "a.pub"
    assert private.stat().st_mode & 0o077 == 0 and (tmp_path / "keys" / "sign.key").stat().st_mode & 0o077 == 0
    assert load_ssh_private_key(private.read_bytes(), None).public_key() == load_ssh_public_key(public.read_bytes())
    assert str(public) in out and 'hospital-a: "ssh-ed25519 ' in out
    assert main(["site", "--config", str(yaml), "--make-keys"]) == 1  # keys the SuperLink knows are never replaced silently
    assert "exists" in capsys.readouterr().err


# --- distributed DP (issue #12, point 8): the sites' noise under the masks -----------------

DISTRIBUTED = DistributedDPConfig(clip_norm=1.0, noise_multiplier=0.5, granularity=2**12)
MASKED_INPUT = sa.message_type(sa.STAGE_MASKED_INPUT)


def _noisy_train(grid_ref: list[AttackingGrid]):
    """The fixed small delta, clipped and with its noise held as the site's privacy round does
    under distributed DP (client/privacy_round.py: ``clip``, ``hold_noise``)."""
    plain = _local_train(grid_ref)

    def train(msg: Message, context: Context) -> Message:
        reply = plain(msg, context)
        dp = DISTRIBUTED
        context.state[sa.NOISE_STATE_KEY] = sa.noise_record(1, dp.clip_norm, dp.granularity, dp.noise_multiplier)
        return reply

    return train


def _attack_with_privacy(rewrite: Rewrite | None, tmp_path: Path, privacy: PrivacyConfig):
    cfg = RunConfig(privacy=privacy)
    cfg.secagg = SecAggConfig(num_shares=5)
    cfg.federation.min_sites = 2
    grid_ref: list[AttackingGrid] = []
    grid = AttackingGrid(site_secagg.stage_handlers(_noisy_train(grid_ref)), list(NODES), auth_dir=tmp_path / "keys", rewrite=rewrite)
    grid_ref.append(grid)
    like = _like()
    instructions = RoundInstructions(server_round=1, model=cfg.model, train=cfg.train, privacy=cfg.privacy).to_record()
    return secure_round(grid, [train_message(instructions, like, node_id=n) for n in NODES], like, cfg, server_round=1), grid


def test_distributed_dp_sums_the_sites_noise_and_nobody_sees_the_clear_mean(tmp_path: Path) -> None:
    """The coordinator unmasks the uniform mean of the clipped deltas plus the sum of the
    sites' Skellam noise over 5: per value sqrt(5) x z x (granularity + sqrt(values)) steps."""
    result, _ = _attack_with_privacy(None, tmp_path, PrivacyConfig(mode=PrivacyMode.distributed, distributed=DISTRIBUTED))
    assert result.mean_delta is not None, result.reason
    assert result.total_weight == len(NODES)  # every site weighted 1: a uniform mean
    true_mean = {name: torch.zeros_like(t) for name, t in _like().items()}
    for node in NODES:
        gen = torch.Generator().manual_seed(node)
        for name, t in _like().items():
            true_mean[name] += torch.randn(t.shape, generator=gen) * 0.01 / len(NODES)
    error = torch.cat([(result.mean_delta[n] - true_mean[n]).reshape(-1) for n in true_mean])
    values = error.numel()
    step = DISTRIBUTED.clip_norm / DISTRIBUTED.granularity
    expected = len(NODES) ** 0.5 * DISTRIBUTED.noise_multiplier * (DISTRIBUTED.granularity + values**0.5) * step / len(NODES)
    assert float(error.std()) == pytest.approx(expected, rel=0.2)  # 204 values: the std within 20%
    assert abs(float(error.mean())) < 4 * expected / values**0.5


@pytest.mark.parametrize(
    ("field", "value"), [(sa.P_QUANTIZATION, 2**40), (sa.P_CLIPPING, 100.0), (sa.P_MAX_WEIGHT, 64)],
    ids=["finer-grid", "wider-range", "weighted-sum"],
)
def test_a_grid_or_weighting_other_than_the_instructions_gets_no_masked_input(tmp_path: Path, field: str, value) -> None:  # noqa: ANN001
    """Sent to every site alike (so the neighbours' binding check passes), a grid other than
    privacy.distributed's would make the site's noise too small for the integers it sends,
    and a weight > 1 would scale its update past the sensitivity its noise covers."""

    def rewrite(kind: str, node: int, content: RecordDict) -> RecordDict:
        if kind == TRAIN:
            params = {**dict(content[sa.PARAMS_KEY].items()), field: value}
            return RecordDict({**dict(content.items()), sa.PARAMS_KEY: ConfigRecord(params)})
        return content

    result, grid = _attack_with_privacy(rewrite, tmp_path, PrivacyConfig(mode=PrivacyMode.distributed, distributed=DISTRIBUTED))
    assert result.mean_delta is None
    for node in NODES:
        assert "distributed DP: the coordinator's grid" in grid.refusal(node, MASKED_INPUT)


# --- malformed stage payloads ---------------------------------------------------------------

_MALFORMED_CASES = [
    (stage, field, how)
    for stage, fields in sa.REQUEST_FIELDS.items()
    for index, field in enumerate(fields)
    for how in (("missing", "retyped") if index < 2 else ("missing",))
]


@pytest.mark.parametrize(("stage", "field", "how"), _MALFORMED_CASES, ids=[f"{s}-{f}-{h}" for s, f, h in _MALFORMED_CASES])
def test_a_malformed_stage_message_ends_the_round_at_the_victim_with_its_secrets_cleared(
    tmp_path: Path, stage: str, field: str, how: str
) -> None:
    """Every field of every stage the coordinator sends, left out or of another type, at
    one site: that site names the field, reveals nothing and keeps no key, seed or delta
    (a KeyError or a silently truncated threshold would do neither)."""
    kind, record_name = sa.message_type(stage), sa.request_record(stage)

    def rewrite(message_type: str, node: int, content: RecordDict) -> RecordDict:
        if message_type != kind or node != VICTIM:
            return content
        payload = dict(content[record_name].items())
        corrupt_field(payload, field, sa.REQUEST_FIELDS[stage][field], how)
        return RecordDict({**dict(content.items()), record_name: ConfigRecord(payload)})

    _, grid = _attack(rewrite, tmp_path)
    reason = grid.refusal(VICTIM, kind)
    assert reason.startswith("ProtocolViolation: ") and f"'{field}'" in reason and stage in reason
    assert not {sa.STATE_KEY, sa.DELTA_STATE_KEY} & set(grid.contexts[VICTIM].state.keys())
