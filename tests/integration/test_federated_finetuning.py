"""Phase 2: federated progressive-freezing fine-tuning after SSL pretraining.

Units: the round schedule (what trains in which round, with which LRs), the site's reply
(only the trainable parameters' deltas), the reply metrics. Then a run of the real round
loop and ClientApp in process (plain path, resume across the phase boundary), and one tiny
real Flower simulation with secure aggregation.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from ctfed.common.checkpoint import load_checkpoint, state_digest
from ctfed.common.cli import main
from ctfed.common.config import ConfigError, FeaturePooling, FinetuneConfig, ModelConfig, SitePolicy, TrainConfig
from ctfed.simulations.config import SimulationRunConfig, load_simulation_config
from ctfed.common.exchange import (
    ARRAYS_KEY,
    FINETUNE_PHASE,
    METRICS_KEY,
    NO_LABELS_REFUSED_CODE,
    NUM_EXAMPLES_KEY,
    POLICY_REFUSED_CODE,
    RoundInstructions,
    evaluation_to_metrics,
    metrics_to_evaluation,
    state_to_record,
)
from ctfed.common.finetune import (
    FULL_PHASE,
    LINEAR_PROBE_PHASE,
    PROBE_PHASE,
    PROGRESSIVE_PHASE,
    STANDARDIZER_PREFIX,
    FederatedFreezingSchedule,
    Finetuner,
    build_classifier,
    load_classifier,
    param_groups,
    state_nbytes,
    trainable_names,
)

from helpers import site_context, train_message, write_random_cache  # tests/helpers.py

TINY = ModelConfig(name="tiny", image_size=32, patch_size=8, hidden_size=48, num_layers=4, num_heads=3, mlp_dim=96)


# --- the schedule ----------------------------------------------------------------------------


def test_schedule_probes_first_then_unfreezes_top_down() -> None:
    cfg = FinetuneConfig(probe_steps=10, stage_steps=20, unfreeze_fractions=[0.1, 0.3, 0.6])
    schedule = FederatedFreezingSchedule(cfg, num_blocks=12, rounds=10, local_steps=5)
    plans = [schedule.plan(r) for r in range(1, 11)]
    # A third of the rounds (probe_steps / total) is the linear probe.
    assert schedule.probe_rounds == 3
    assert [p.stage for p in plans] == [PROBE_PHASE] * 3 + [PROGRESSIVE_PHASE] * 7
    assert all(p.blocks == () for p in plans[:3])
    # Stage 1 has 7 rounds; block 11 trains from the round its 10% falls in, 10 from 30%, 9 from 60%.
    assert [p.blocks for p in plans[3:]] == [(11,), (11,), (11, 10), (11, 10), (11, 10, 9), (11, 10, 9), (11, 10, 9)]
    assert not any(p.stem for p in plans)
    # The trainable set only grows, so a site holding the phase-2 start needs only the trainable part.
    for earlier, later in zip(plans, plans[1:]):
        assert set(earlier.blocks) <= set(later.blocks)
    # Each stage is one OneCycle curve over its rounds x local steps.
    assert [(p.schedule_start, p.schedule_total) for p in plans[:3]] == [(0, 15), (5, 15), (10, 15)]
    assert [p.schedule_start for p in plans[3:]] == [0, 5, 10, 15, 20, 25, 30] and plans[3].schedule_total == 35


def test_schedule_edge_cases_and_other_modes() -> None:
    cfg = FinetuneConfig(probe_steps=1, stage_steps=100)
    two = FederatedFreezingSchedule(cfg, num_blocks=4, rounds=2, local_steps=1)
    assert [two.plan(r).stage for r in (1, 2)] == [PROBE_PHASE, PROGRESSIVE_PHASE]  # at least one round each
    only_stage = FederatedFreezingSchedule(FinetuneConfig(probe_steps=0, stage_steps=5), 4, 3, 1)
    assert only_stage.probe_rounds == 0 and only_stage.plan(1).stage == PROGRESSIVE_PHASE
    probe = FederatedFreezingSchedule(FinetuneConfig(mode="linear_probe"), 4, 3, 2)
    assert {(p.stage, p.blocks, p.stem) for p in map(probe.plan, (1, 2, 3))} == {(LINEAR_PROBE_PHASE, (), False)}
    full = FederatedFreezingSchedule(FinetuneConfig(mode="full"), 3, 2, 2).plan(2)
    assert full.stage == FULL_PHASE and full.blocks == (2, 1, 0) and full.stem and full.schedule_start == 2
    with pytest.raises(ValueError, match="phase-2 round"):
        two.plan(3)


def test_round_trains_the_planned_blocks_at_their_discriminative_lrs() -> None:
    cfg = FinetuneConfig(label_names=["any"], unfreeze_fractions=[0.1, 0.3, 0.6], block_lrs=[5e-4, 2.5e-4, 1e-4], batch_size=2)
    plan = FederatedFreezingSchedule(cfg, TINY.num_layers, rounds=4, local_steps=2).plan(4)
    assert plan.blocks == (3, 2, 1)
    classifier = build_classifier(TINY, 1, seed=0)
    data = [(torch.rand(3, 32, 32, 32), torch.tensor([float(i % 2)])) for i in range(4)]
    before = {n: p.detach().clone() for n, p in classifier.named_parameters()}
    Finetuner(classifier, cfg, data).fit_round(plan, steps=2)
    changed = {n for n, p in classifier.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("head.", "encoder.blocks.3.", "encoder.blocks.2.", "encoder.blocks.1.", "encoder.norm.")) for n in changed)
    assert not any(n.startswith(("encoder.blocks.0.", "encoder.patch_embedding.", "encoder.cls_token")) for n in changed)
    lrs = {g["name"]: g["lr"] for g in param_groups(classifier, cfg, include_backbone=False)}
    assert lrs == {"head": 1e-3, "block3": 5e-4, "block2": 2.5e-4, "block1": 1e-4}


# --- the site's reply --------------------------------------------------------------------------


def _site_context(cache_dir: Path, state_dir: Path) -> Context:
    # A site that also sends small cells: the labelled cache holds 3 scans per class, whose
    # held-out evaluation the default policy (min_reported_count 5) keeps at the site.
    return site_context(cache_dir, state_dir, policy=SitePolicy(min_reported_count=0))


def _finetune_message(model: ModelConfig, finetune: FinetuneConfig, plan, arrays: ArrayRecord, full: bool, digest: str) -> Message:  # noqa: ANN001
    config = RoundInstructions(
        server_round=2, model=model, train=TrainConfig(), phase=FINETUNE_PHASE, finetune=finetune, plan=plan,
        plan_local_steps=2, full_state=full, base_sha256=digest,
    )
    return train_message(config, arrays, MessageType.TRAIN)


@pytest.fixture()
def labelled_cache(tmp_path: Path) -> Path:
    """A tiny site cache with 3 positive and 3 negative scans for label "any"."""
    return write_random_cache(tmp_path / "cache", [0, 1, 0, 1, 1, 0])


def test_reply_holds_only_the_trainable_deltas(labelled_cache: Path, tmp_path: Path) -> None:
    from ctfed.client.app import train
    from ctfed.simulations.runtime.inprocess import InProcessGrid

    InProcessGrid({}, [])  # sets Flower's task identity, which Message() needs outside a Flower process
    finetune = FinetuneConfig(label_names=["any"], batch_size=2, eval_n_boot=5)
    schedule = FederatedFreezingSchedule(finetune, TINY.num_layers, rounds=3, local_steps=2)
    context = _site_context(labelled_cache, tmp_path / "state")
    classifier = build_classifier(TINY, 1, seed=0)
    classifier.standardizer.fit(torch.randn(6, 48))  # as after phase 2's first round: the coordinator's statistics
    state = classifier.state_dict()
    digest = state_digest(state)

    sizes = []
    for server_round, full in ((1, True), (2, False), (3, False)):
        plan = schedule.plan(server_round)
        classifier.set_trainable(plan.blocks, stem=plan.stem)
        expected = trainable_names(classifier)
        sent = state if full else {n: state[n] for n in expected}
        reply = train(_finetune_message(TINY, finetune, plan, state_to_record(sent), full, digest), context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        delta = reply.content[ARRAYS_KEY].to_torch_state_dict()
        assert sorted(delta) == expected  # names set == trainable names, in the agreed order
        # The feature statistics the classifier carries are buffers: never sent back.
        assert not any(name.startswith(STANDARDIZER_PREFIX) for name in delta)
        sizes.append(state_nbytes(delta))
        metrics = reply.content[METRICS_KEY]
        evaluation = metrics_to_evaluation(metrics)
        # The four metrics with CIs, and the site's operating point (Youden's J on its held-out scans).
        assert set(evaluation["any"]) == {"auroc", "average_precision", "balanced_accuracy", "f1", "operating_point"}
        assert all(math.isfinite(v["value"]) for v in evaluation["any"].values())
        assert 0.0 <= evaluation["any"]["operating_point"]["value"] <= 1.0
        assert metrics[NUM_EXAMPLES_KEY] == 2  # 2 of 3 per class held out (half, rounded up): 2 train
    assert sizes[0] < sizes[1] <= sizes[2] < state_nbytes(state)  # the frozen part never travels back

    # A partial classifier for a base the site does not hold: an error, not a guess.
    stranger = _site_context(labelled_cache, tmp_path / "state2")
    plan = schedule.plan(2)
    classifier.set_trainable(plan.blocks)
    partial = {n: state[n] for n in trainable_names(classifier)}
    with pytest.raises(RuntimeError, match="does not hold"):
        train(_finetune_message(TINY, finetune, plan, state_to_record(partial), False, digest), stranger)


def test_site_without_labels_refuses_phase_two(labelled_cache: Path, tmp_path: Path) -> None:
    from ctfed.client.app import train
    from ctfed.client.policy import write_policy_file
    from ctfed.simulations.runtime.inprocess import InProcessGrid

    InProcessGrid({}, [])
    manifest = labelled_cache / "manifest.json"
    data = json.loads(manifest.read_text())
    for entry in data["series"]:
        entry["label"] = None
    manifest.write_text(json.dumps(data))
    finetune = FinetuneConfig(label_names=["any"])
    plan = FederatedFreezingSchedule(finetune, TINY.num_layers, 2, 2).plan(1)
    state = build_classifier(TINY, 1).state_dict()
    message = _finetune_message(TINY, finetune, plan, state_to_record(state), True, state_digest(state))
    reply = train(message, _site_context(labelled_cache, tmp_path / "state"))
    assert reply.has_error() and reply.error.code == NO_LABELS_REFUSED_CODE
    assert "site site_x refuses: no usable labels" in reply.error.reason

    # policy.allowed_phases is honoured before anything is read.
    policy_file = write_policy_file(SitePolicy(allowed_phases=["pretrain"]), tmp_path / "policy")
    context = _site_context(labelled_cache, tmp_path / "state3")
    context.node_config["policy-file"] = str(policy_file)
    reply = train(message, context)
    assert reply.has_error() and reply.error.code == POLICY_REFUSED_CODE and "allowed_phases" in reply.error.reason


def test_instructions_and_metrics_round_trip() -> None:
    finetune = FinetuneConfig(label_names=["any", "ich"], local_steps=3)
    plan = FederatedFreezingSchedule(finetune, 12, 6, 3).plan(5)
    sent = RoundInstructions(
        server_round=9, model=ModelConfig(), train=TrainConfig(), phase=FINETUNE_PHASE, finetune=finetune, plan=plan,
        plan_local_steps=3, full_state=False, base_sha256="ab" * 32,
    )
    back = RoundInstructions.from_record(ConfigRecord(dict(sent.to_record().items())))
    assert (back.finetune, back.plan, back.plan_local_steps, back.base_sha256) == (finetune, plan, 3, "ab" * 32)
    assert back == sent
    evaluation = {"any": {"auroc": {"value": 0.5, "low": 0.2, "high": 0.9}}, "ich": {"f1": {"value": 1.0, "low": 1.0, "high": 1.0}}}
    assert metrics_to_evaluation(evaluation_to_metrics(evaluation)) == evaluation


def test_config_refuses_what_phase_two_cannot_do() -> None:
    cfg = load_simulation_config(["federation.finetune_rounds=2"])
    assert cfg.finetune.label_names == ["any"]  # a column of the synthetic labels.csv
    with pytest.raises(ConfigError, match="privacy.mode=local"):
        load_simulation_config(["federation.finetune_rounds=2", "privacy.mode=local"])
    with pytest.raises(ConfigError, match="fedprox"):
        load_simulation_config(["federation.finetune_rounds=2", "federation.strategy=fedprox", "train.proximal_mu=0.01"])
    with pytest.raises(ConfigError, match="finetune_rounds"):
        load_simulation_config(["federation.finetune_rounds=-1"])


# --- the round loop in process: resume across the phase boundary -------------------------------


@pytest.fixture(scope="module")
def synthetic_caches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ctfed.simulations.runtime.simulate import synthesize_and_prepare

    root = tmp_path_factory.mktemp("sites")
    # site_0 holds 3 positives and 2 negatives, site_1 4 and 2: both can be split.
    synthesize_and_prepare(load_simulation_config(["synth.sites=2", "synth.scans_per_site_list=[5,6]"]), root)
    return root / "cache"


def _in_process_run(caches: Path, run_dir: Path, resume: bool = False):  # noqa: ANN202
    """1 SSL round + 3 phase-2 rounds of the real round loop and ClientApp (fresh sites)."""
    from ctfed.client.app import train
    from ctfed.server.rounds import run_federation
    from ctfed.simulations.runtime.inprocess import InProcessGrid

    cfg = load_simulation_config(
        ["federation.rounds=1", "federation.finetune_rounds=3", "train.local_steps=1", "finetune.eval_n_boot=5",
         "secagg.enabled=false", "finetune.feature_statistics=federated"]
    )
    nodes = [1, 2]
    contexts = {
        n: Context(run_id=1, node_id=n, node_config={"partition-id": i}, state=RecordDict(),
                   run_config=_simulated_sites_run_config(cfg, caches, run_dir))
        for i, n in enumerate(nodes)
    }
    return run_federation(InProcessGrid({"train": train}, nodes, contexts=contexts), cfg, run_dir, resume=resume)


def _simulated_sites_run_config(cfg: SimulationRunConfig, caches: Path, run_dir: Path) -> dict[str, str]:
    """The run config ``ctfed simulate`` gives its sites: the caches, the run folder, and each
    site's policy from ``simulation.site_policy`` (which runs the monitor on the plain path)."""
    from ctfed.client.policy import SITE_POLICIES_FILE_KEY
    from ctfed.simulations.runtime.simulate import write_site_policies

    sites = sorted(p.name for p in caches.iterdir() if p.is_dir())
    policies = write_site_policies(cfg, run_dir, sites)
    return {"data-dir": str(caches), "run-dir": str(run_dir), SITE_POLICIES_FILE_KEY: str(policies)}


@pytest.fixture(scope="module")
def straight_run(synthetic_caches: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    return run_dir, _in_process_run(synthetic_caches, run_dir)


@pytest.mark.parametrize("cut_after", [1, 3])  # at the phase boundary, and inside phase 2
def test_resume_across_the_phase_boundary(synthetic_caches: Path, straight_run, tmp_path: Path, cut_after: int) -> None:  # noqa: ANN001
    import shutil

    straight_dir, straight = straight_run
    assert [(r.round, r.phase) for r in straight.rounds] == [(1, "pretrain"), (2, "finetune"), (3, "finetune"), (4, "finetune")]

    # A crash after round `cut_after`: later checkpoints never verify, so resume drops those rounds.
    cut_dir = tmp_path / "cut"
    shutil.copytree(straight_dir, cut_dir)
    for late in range(cut_after + 1, 5):
        (cut_dir / "checkpoints" / f"global_round_{late:04d}.safetensors").unlink()
    resumed = _in_process_run(synthetic_caches, cut_dir, resume=True)
    assert [(r.round, r.phase) for r in resumed.rounds] == [(r.round, r.phase) for r in straight.rounds]
    # New sites hold no classifier: the first resumed round sends the whole one again.
    first = next(r for r in resumed.rounds if r.round == cut_after + 1)
    assert first.bytes_sent_per_site == straight.rounds[1].bytes_sent_per_site
    final_straight, _, card = load_checkpoint(straight_dir / "checkpoints" / "global_round_0004.safetensors")
    final_resumed, _, _ = load_checkpoint(cut_dir / "checkpoints" / "global_round_0004.safetensors")
    assert card["kind"] == "global-classifier"
    for name, tensor in final_straight.items():
        torch.testing.assert_close(final_resumed[name], tensor, msg=name)


def test_phase_two_fixes_the_sites_feature_statistics_after_its_first_round(synthetic_caches: Path, straight_run) -> None:  # noqa: ANN001
    """The first phase-2 round's updates carry each site's feature statistics (its whole cache,
    the pretrained encoder); the coordinator fixes their mean (means averaged, stds
    geometrically, weighted as the update) in the classifier, every later checkpoint carries exactly those (sites never
    refit them) and the next round sends the whole classifier again."""
    from ctfed.common.labelled import standardizer_scans
    from ctfed.common.preprocess import CachedVolumes

    run_dir, recorder = straight_run
    encoder = load_checkpoint(run_dir / "checkpoints" / "global_round_0001.safetensors")[0]
    cfg = load_simulation_config([])
    sites = []
    for site in ("site_0", "site_1"):
        own = build_classifier(cfg.model, 1, encoder_state=encoder, seed=cfg.finetune.seed)
        own.fit_standardizer(standardizer_scans(CachedVolumes(synthetic_caches / site), cfg.model.image_size), cfg.finetune.batch_size)
        sites.append(own.standardizer)
    fixed = []
    for number in (2, 3, 4):
        classifier, _ = load_classifier(run_dir / "checkpoints" / f"global_round_{number:04d}.safetensors")
        assert classifier.standardizer.fitted and int(classifier.standardizer.count) == 2
        fixed.append(classifier)
    # Weighted as the update is: by each site's labelled training scans.
    weights = {s.site: s.num_examples for s in recorder.rounds[1].sites}
    w0, w1 = weights["site_0"] / sum(weights.values()), weights["site_1"] / sum(weights.values())
    torch.testing.assert_close(fixed[0].standardizer.mean, w0 * sites[0].mean + w1 * sites[1].mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fixed[0].standardizer.std, sites[0].std ** w0 * sites[1].std ** w1, atol=1e-5, rtol=1e-5)
    for later in fixed[1:]:
        for name in ("mean", "std", "count"):
            assert torch.equal(getattr(later.standardizer, name), getattr(fixed[0].standardizer, name)), name
    assert not torch.equal(fixed[0].head.weight, fixed[-1].head.weight)  # the head trained meanwhile
    first, second, third = recorder.rounds[1:]
    assert second.bytes_sent_per_site == first.bytes_sent_per_site > third.bytes_sent_per_site  # whole, whole, part


def test_a_site_sends_its_statistics_only_while_the_classifier_has_none(labelled_cache: Path, tmp_path: Path) -> None:
    from ctfed.client.app import train
    from ctfed.common.config import FeatureStatistics
    from ctfed.common.finetune import (
        STATISTICS_LOG_STD,
        STATISTICS_MEAN,
        FeatureStandardizer,
        encode_feature_statistics,
        sends_feature_statistics,
    )
    from ctfed.simulations.runtime.inprocess import InProcessGrid

    InProcessGrid({}, [])
    finetune = FinetuneConfig(label_names=["any"], batch_size=2, eval_n_boot=5, feature_statistics=FeatureStatistics.federated)
    plan = FederatedFreezingSchedule(finetune, TINY.num_layers, rounds=3, local_steps=2).plan(1)
    unfitted = build_classifier(TINY, 1, seed=0).state_dict()
    fitted = build_classifier(TINY, 1, seed=0)
    fitted.standardizer.fit(torch.randn(6, 48))
    names = []
    for state in (unfitted, fitted.state_dict()):
        context = _site_context(labelled_cache, tmp_path / f"state{len(names)}")
        reply = train(_finetune_message(TINY, finetune, plan, state_to_record(state), True, state_digest(state)), context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        names.append(sorted(reply.content[ARRAYS_KEY].to_torch_state_dict()))
    assert set(names[0]) - set(names[1]) == {STATISTICS_MEAN, STATISTICS_LOG_STD}
    # Statistics a coordinator sends are used as sent, so a std <= 0 is refused, not divided by.
    hostile = fitted.state_dict()
    hostile["standardizer.std"] = hostile["standardizer.std"].clone()
    hostile["standardizer.std"][3] = 0.0
    context = _site_context(labelled_cache, tmp_path / "state-hostile")
    with pytest.raises(ValueError, match="std <= 0"):
        train(_finetune_message(TINY, finetune, plan, state_to_record(hostile), True, state_digest(hostile)), context)
    # Not under central DP (the update's clip and noise are not sized for them), nor with "site".
    unfitted_classifier = build_classifier(TINY, 1, seed=0)
    assert sends_feature_statistics(finetune, False, unfitted_classifier)
    assert not sends_feature_statistics(finetune, True, unfitted_classifier)
    assert not sends_feature_statistics(FinetuneConfig(), False, unfitted_classifier)  # the default: "site"
    # Statistics beyond what the update carries are clipped into it, and counted.
    wide = FeatureStandardizer(3)
    wide.mean.copy_(torch.tensor([1.0, -40.0, 0.0]))
    wide.std.copy_(torch.tensor([1.0, 1.0, 1e5]))
    encoded, clipped = encode_feature_statistics(wide)
    assert clipped == 2 and float(encoded[STATISTICS_MEAN].abs().max()) <= 1 and float(encoded[STATISTICS_LOG_STD].max()) <= 1


def test_plain_path_records_the_monitor_of_ssl_rounds_only(straight_run) -> None:  # noqa: ANN001
    _, recorder = straight_run
    pretrain, *finetune = recorder.rounds
    assert not pretrain.secure_aggregation
    assert {s.site: (s.monitor["scans"], s.monitor["k"]) for s in pretrain.sites} == {"site_0": (5, 2), "site_1": (6, 3)}
    assert all(s.monitor_seconds > 0 for s in pretrain.sites)
    assert all(s.monitor is None for r in finetune for s in r.sites)


def _mark_split(caches: Path, train_per_site: int) -> dict[str, int]:
    """Each site's first ``train_per_site`` labelled scans marked "train", the rest "test", as a
    labels.csv ``finetune_split`` column would; returns the training count per site."""
    from ctfed.common.labelled import SPLIT_COLUMN

    counts = {}
    for site in sorted(p for p in caches.iterdir() if p.is_dir()):
        manifest = json.loads((site / "manifest.json").read_text())
        labelled = [e for e in manifest["series"] if e.get("label")]
        for k, entry in enumerate(labelled):
            entry["label"][SPLIT_COLUMN] = "train" if k < train_per_site else "test"
        (site / "manifest.json").write_text(json.dumps(manifest))
        counts[site.name] = min(train_per_site, len(labelled))
    return counts


def test_phase_two_alone_fine_tunes_the_initial_encoder_on_each_sites_own_split(
    synthetic_caches: Path, straight_run, tmp_path: Path  # noqa: ANN001
) -> None:
    """federation.rounds=0: phase 2 only, from federation.initial_encoder; each site trains on
    the scans its labels mark "train" (not a stratified cut)."""
    import shutil

    from ctfed.client.app import train
    from ctfed.server.rounds import initial_encoder_state, run_federation
    from ctfed.simulations.runtime.inprocess import InProcessGrid

    caches = tmp_path / "cache"
    shutil.copytree(synthetic_caches, caches)
    trained_on = _mark_split(caches, train_per_site=4)  # a stratified cut would train on 2 and 3
    encoder_file = straight_run[0] / "checkpoints" / "global_round_0001.safetensors"
    overrides = ["federation.rounds=0", "federation.finetune_rounds=1", "finetune.mode=linear_probe", "finetune.local_steps=2",
                 "finetune.eval_n_boot=5", "secagg.enabled=false", f"federation.initial_encoder={encoder_file}"]
    cfg = load_simulation_config(overrides)
    nodes = [1, 2]
    contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": i}, state=RecordDict(),
                           run_config=_simulated_sites_run_config(cfg, caches, tmp_path / "run")) for i, n in enumerate(nodes)}
    recorder = run_federation(InProcessGrid({"train": train}, nodes, contexts=contexts), cfg, tmp_path / "run")
    assert [(r.round, r.phase, r.aggregated) for r in recorder.rounds] == [(1, "finetune", True)]
    assert {s.site: s.num_examples for s in recorder.rounds[0].sites} == trained_on
    # A linear probe leaves the encoder as it started: the initial encoder's, not a fresh one.
    final, _, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "global_round_0001.safetensors")
    initial = load_checkpoint(encoder_file)[0]
    fresh = initial_encoder_state(load_simulation_config([]))
    for name, tensor in initial.items():
        torch.testing.assert_close(final[f"encoder.{name}"], tensor, msg=name)
    assert any(not torch.equal(fresh[name], tensor) for name, tensor in initial.items())

    with pytest.raises(ConfigError, match="finetune_rounds > 0"):
        load_simulation_config(["federation.rounds=0"])
    with pytest.raises(ConfigError, match="initial_encoder"):
        initial_encoder_state(load_simulation_config([*overrides[:-1], f"federation.initial_encoder={tmp_path / 'none.safetensors'}"]))


def test_a_phase_two_round_fits_the_feature_statistics_on_the_sites_whole_cache(tmp_path: Path) -> None:
    """Not on its few labelled training scans: the statistics of 8 scans are too noisy for the
    sites' averaged head to fit any of them (docs/studies.md); at most STANDARDIZER_MAX_SCANS."""
    from ctfed.common.labelled import CacheScans, LabelledScans, standardizer_scans
    from ctfed.common.preprocess import CachedVolumes

    volumes = CachedVolumes(write_random_cache(tmp_path / "cache", [0, 1, None, None, 0, 1, None]))
    train = LabelledScans(volumes, [0, 1], ["any"], 32)
    everything = standardizer_scans(volumes, 32)
    assert everything.indices == list(range(7))
    assert len(standardizer_scans(volumes, 32, max_scans=3)) == 3
    cfg = FinetuneConfig(label_names=["any"], batch_size=2)
    plan = FederatedFreezingSchedule(cfg, TINY.num_layers, rounds=2, local_steps=1).plan(1)
    classifier = build_classifier(TINY, 1, seed=0)
    Finetuner(classifier, cfg, train, standardizer_scans=everything).fit_round(plan, steps=1)
    assert int(classifier.standardizer.count) == 7
    reference = build_classifier(TINY, 1, seed=0)
    reference.fit_standardizer(CacheScans(volumes, 32))
    torch.testing.assert_close(classifier.standardizer.mean, reference.standardizer.mean)


def test_a_split_column_with_other_values_or_one_part_only_is_refused(labelled_cache: Path) -> None:
    from ctfed.common.labelled import NotEvaluableError, site_split
    from ctfed.common.preprocess import CachedVolumes

    _mark_split(labelled_cache.parent, train_per_site=6)  # every scan "train": nothing held out
    with pytest.raises(NotEvaluableError, match="0 held-out"):
        site_split(CachedVolumes(labelled_cache), ["any"], 0.5, 0)
    manifest = json.loads((labelled_cache / "manifest.json").read_text())
    manifest["series"][0]["label"]["finetune_split"] = "validation"
    (labelled_cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NotEvaluableError, match="validation"):
        site_split(CachedVolumes(labelled_cache), ["any"], 0.5, 0)


# --- one tiny real Flower simulation -----------------------------------------------------------


@pytest.fixture(scope="module")
def phase_two_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    code = main(
        [
            "simulate",
            f"output_dir={out}",
            "run_name=p2",
            "synth.sites=2",
            "synth.scans_per_site_list=[5,6]",
            "federation.rounds=1",
            "federation.finetune_rounds=3",
            "train.local_steps=1",
            "finetune.local_steps=2",
            "finetune.eval_n_boot=10",
            # Secure aggregation (the default) of 2 sites needs a threshold of 2.
            "secagg.num_shares=3",
            "secagg.reconstruction_threshold=2",
            # 2-3 held-out scans per site are small cells: the default policy keeps their evaluation.
            "simulation.site_policy.min_reported_count=0",
        ]
    )
    assert code == 0
    return out / "p2"


@pytest.mark.slow
def test_simulation_runs_pretraining_then_finetuning(phase_two_run: Path) -> None:
    results = json.loads((phase_two_run / "results.json").read_text())
    assert results["status"] == "completed"
    rounds = results["rounds"]
    assert [(r["round"], r["phase"]) for r in rounds] == [(1, "pretrain"), (2, "finetune"), (3, "finetune"), (4, "finetune")]
    assert all(r["aggregated"] and r["secure_aggregation"] for r in rounds), [r["reason"] for r in rounds]
    probe, *unfrozen = rounds[1:]
    assert probe["finetune_stage"] == "probe" and probe["trainable_blocks"] == []
    assert all(r["finetune_stage"] == "progressive" and r["trainable_blocks"] == [1] for r in unfrozen)
    for record in rounds[1:]:
        for site in record["sites"]:
            assert site["status"] == "aggregated"
            metrics = site["evaluation"]["any"]
            assert set(metrics) == {"auroc", "average_precision", "balanced_accuracy", "f1", "operating_point"}
            assert all(math.isfinite(m["value"]) for m in metrics.values()), metrics
    # Only trainable parameters travel back: the probe round's replies are far smaller.
    for site in ("site_0", "site_1"):
        received = [next(s["bytes_received"] for s in r["sites"] if s["site"] == site) for r in rounds[1:]]
        assert received[0] < received[1] and received[0] < received[2], received
    assert probe["trainable_parameters"] < unfrozen[0]["trainable_parameters"]
    # After the first phase-2 round a site gets only the trainable part, not the whole classifier.
    assert unfrozen[1]["bytes_sent_per_site"] < probe["bytes_sent_per_site"]


@pytest.mark.slow
def test_every_ssl_round_records_each_sites_representation_monitor(phase_two_run: Path) -> None:
    rounds = json.loads((phase_two_run / "results.json").read_text())["rounds"]
    for record in rounds:
        for site in record["sites"]:
            monitor = site["monitor"]
            if record["phase"] == "finetune":
                assert monitor is None
                continue
            # Phase 2's split: site_0 (3 positives, 2 negatives) trains on 2 scans, site_1 (4, 2) on 3;
            # monitor.knn_k=3 is capped at those.
            assert (monitor["scans"], monitor["k"]) == {"site_0": (5, 2), "site_1": (6, 3)}[site["site"]], monitor
            assert 0.0 <= monitor["knn_accuracy"] <= 1.0
            assert math.isfinite(monitor["embedding_std"]) and 0.0 <= monitor["embedding_std"] < 1.0
            assert monitor["uniform_std"] == pytest.approx(1 / math.sqrt(load_simulation_config().model.hidden_size))
            assert site["monitor_seconds"] > 0 and site["train_seconds"] > 0
    report = (phase_two_run / "report.md").read_text()
    assert "## Representation monitor" in report and "| 1 | " in report
    assert (phase_two_run / "plots" / "monitor.png").is_file()
    assert "representation monitor of the encoder sent (global_round_0000)" in (phase_two_run / "federation.log").read_text()


@pytest.mark.slow
def test_final_classifier_keeps_the_frozen_pretrained_blocks(phase_two_run: Path) -> None:
    checkpoints = phase_two_run / "checkpoints"
    encoder, _, encoder_card = load_checkpoint(checkpoints / "global_round_0001.safetensors")
    final, model_cfg, card = load_checkpoint(checkpoints / "global_round_0004.safetensors")
    after_probe, _, _ = load_checkpoint(checkpoints / "global_round_0002.safetensors")
    assert encoder_card["kind"] == "global-encoder" and card["kind"] == "global-classifier"
    classifier = build_classifier(model_cfg, 1)
    classifier.load_state_dict(final)  # a complete, loadable classifier
    loaded, _ = load_classifier(checkpoints / "global_round_0004.safetensors")  # rebuilt from its card alone
    assert card["pooling"] == "cls" and loaded.pooling is FeaturePooling.cls
    # The operating point `ctfed predict` decides at: the median of the sites' held-out thresholds.
    point = card["operating_point"]["any"]
    assert sorted(point["sites"]) == ["site_0", "site_1"]
    assert point["threshold"] == pytest.approx(sum(point["sites"].values()) / 2)  # the median of two
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in final.items())
    frozen = [n for n in encoder if not n.startswith(("blocks.1.", "norm."))]
    for name in frozen:  # the stem and block 0 never unfroze
        assert torch.equal(final[f"encoder.{name}"], encoder[name]), name
    for name in encoder:  # the probe round trained the head only
        assert torch.equal(after_probe[f"encoder.{name}"], encoder[name]), name
    assert not torch.equal(after_probe["head.weight"], final["head.weight"])
    assert not torch.equal(final["encoder.blocks.1.mlp.linear1.weight"], encoder["blocks.1.mlp.linear1.weight"])


@pytest.mark.slow
def test_predict_scores_with_the_federated_classifier_at_a_site(phase_two_run: Path, tmp_path: Path) -> None:
    """`ctfed predict` on the phase-2 checkpoint: the site's cache fits the feature statistics
    (they stayed at the sites), decisions at the card's median operating point."""
    from ctfed.common.labelled import model_input
    from ctfed.common.preprocess import CachedVolumes

    checkpoint = phase_two_run / "checkpoints" / "global_round_0004.safetensors"
    cache, dicom = phase_two_run / "cache" / "site_1", phase_two_run / "dicom" / "site_1"
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--classifier", str(checkpoint), "--input", str(dicom), "--output", str(out),
                 "--cache", str(cache), "--no-progress"]) == 0
    classifier, card = load_classifier(checkpoint)
    volumes = CachedVolumes(cache)
    scans = [(model_input(volumes[i], card["model"]["image_size"]), None) for i in range(len(volumes))]
    classifier.fit_standardizer(scans)
    with torch.no_grad():
        probs = torch.sigmoid(classifier.eval()(torch.stack([s for s, _ in scans])))[:, 0]
    expected = {entry["key"]: float(p) for entry, p in zip(volumes.entries, probs)}
    threshold = card["operating_point"]["any"]["threshold"]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(expected) == 6
    for row in rows:
        assert float(row["probability"]) == pytest.approx(expected[row["series_key"]], abs=2e-6)
        assert float(row["operating_point"]) == pytest.approx(threshold, abs=1e-6)
        assert row["decision"] == str(int(float(row["probability"]) >= float(row["operating_point"])))
