"""The label-efficiency study: its cut of the sites, its one choice, and one tiny end-to-end run
of ``preset=label_efficiency`` (shape only: the study itself is a command, docs/studies.md)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ctfed.common.cli import main
from ctfed.common.config import ConfigError
from ctfed.simulations.config import STUDY_HEADS, load_simulation_config
from ctfed.common.preprocess import CachedVolumes
from ctfed.simulations.studies.label_efficiency import (
    PRETRAIN_VIEWS, STUDY_DIR, STUDY_JSON, Arm, Heads, choose, cut_site,
)
from ctfed.simulations.studies.label_efficiency_report import CURVE_PLOT, PLOTS, STUDY_MD, auroc_plot

from helpers import write_manifest_cache, write_random_cache  # tests/helpers.py

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VERDICT_KEYS = {"key", "met", "ci_clears_target", "difference", "n_test", "task", "labels_per_site", "heads"}


def _cache(root: Path, labels: list[int | None]) -> CachedVolumes:
    """A minimal prepared cache, one 1x8³ volume per entry (None: an unlabelled scan), labelled
    for two tasks."""
    return CachedVolumes(write_manifest_cache(root, labels, label_row=lambda label: {"any": label, "atrophy": 1 - label}))


def test_cut_is_deterministic_disjoint_and_leaves_unlabelled_scans_to_pretraining(tmp_path: Path) -> None:
    labels = [index % 2 for index in range(40)] + [None] * 5
    cache = _cache(tmp_path / "site", labels)
    test, val, pool = cut_site(cache, ["any", "atrophy"], 0.5, 0.2, (0, 1))
    assert (test, val, pool) == cut_site(cache, ["any", "atrophy"], 0.5, 0.2, (0, 1))
    assert len(test) == 20 and len(val) == 4 and len(pool) == 16
    assert not (set(test) & set(val)) and not (set(test) & set(pool)) and not (set(val) & set(pool))
    assert set(test) | set(val) | set(pool) == set(range(40))  # the unlabelled 40..44 only pretrain
    assert cut_site(cache, ["any", "atrophy"], 0.5, 0.2, (1, 1))[0] != test  # the seed changes the cut


def _data(val_scores: dict[str, list[float]], test_scores: dict[str, list[float]]) -> dict:
    site = {"val_labels": [[0], [0], [1], [1]], "test_labels": [[0], [1], [0], [1]]}
    finetune = {mode: {"site_0": {"val": [[v] for v in val_scores[mode]], "test": [[t] for t in test_scores[mode]]}} for mode in val_scores}
    return {"tasks": ["any"], "sites": {"site_0": site}, "arms": {"federated": {"finetune": {"site": {"8": finetune}}}}}


def test_the_mode_is_chosen_on_validation_scans_and_the_test_split_cannot_move_it() -> None:
    val = {"linear_probe": [0.1, 0.2, 0.8, 0.9], "full": [0.9, 0.8, 0.2, 0.1]}  # the probe ranks validation right
    good_test = {"linear_probe": [0.1, 0.9, 0.2, 0.8], "full": [0.9, 0.1, 0.8, 0.2]}
    bad_test = {"linear_probe": [0.9, 0.1, 0.8, 0.2], "full": [0.1, 0.9, 0.2, 0.8]}
    assert choose(_data(val, good_test), "federated", "8", ["site_0"]) == "linear_probe"
    assert choose(_data(val, bad_test), "federated", "8", ["site_0"]) == "linear_probe"
    flipped = {"linear_probe": val["full"], "full": val["linear_probe"]}
    assert choose(_data(flipped, good_test), "federated", "8", ["site_0"]) == "full"


def test_config_rules() -> None:
    with pytest.raises(ConfigError, match="judged_labels_per_site"):
        load_simulation_config(["label_efficiency.judged_labels_per_site=5"])
    with pytest.raises(ConfigError, match="increasing"):
        load_simulation_config(["label_efficiency.labels_per_site=[8,4]"])
    with pytest.raises(ConfigError, match="label_efficiency.phase2_modes"):
        load_simulation_config(["label_efficiency.phase2_modes=[full,full]"])
    with pytest.raises(ConfigError, match="label_efficiency.phase2_modes"):
        load_simulation_config(["label_efficiency.phase2_modes=[]"])
    with pytest.raises(ConfigError, match="label_efficiency.heads"):
        load_simulation_config(["label_efficiency.heads=[site,site]"])
    for rates in ("[]", "[0.001,0.001]", "[0.0]"):
        with pytest.raises(ConfigError, match="label_efficiency.phase2_head_lrs"):
            load_simulation_config([f"label_efficiency.phase2_head_lrs={rates}"])
    assert tuple(h.value for h in Heads) == STUDY_HEADS  # the config's allowed values are the study's
    with pytest.raises(ConfigError, match="turn off compare.enabled"):
        load_simulation_config(["preset=label_efficiency", "compare.enabled=true"])


def test_every_phase2_mode_runs_at_every_head_lr_each_named_apart() -> None:
    from ctfed.simulations.studies.label_efficiency import phase2_options, phase2_recipe

    study = load_simulation_config(["preset=label_efficiency", "label_efficiency.phase2_modes=[linear_probe,full]",
                                    "label_efficiency.phase2_head_lrs=[0.001,0.03]"]).label_efficiency
    options = phase2_options(study)
    assert [(o.key, o.mode, o.head_lr) for o in options] == [
        ("linear_probe_lr0.001", "linear_probe", 0.001), ("linear_probe_lr0.03", "linear_probe", 0.03),
        ("full_lr0.001", "full", 0.001), ("full_lr0.03", "full", 0.03),
    ]
    recipe = phase2_recipe(study, ["any"], options[3])
    assert (recipe.mode, recipe.head_lr, recipe.label_names) == ("full", 0.03, ["any"])
    assert recipe.local_steps == study.finetune.total_steps // study.phase2_rounds  # a pooled head's steps in all
    assert recipe.block_lrs == study.finetune.block_lrs  # only the head's rate varies
    one = replace(study, phase2_head_lrs=[0.001])
    assert [o.key for o in phase2_options(one)] == ["linear_probe", "full"]  # one rate: named by the mode


def test_dp_arm_is_the_federation_with_the_dp_overrides() -> None:
    from ctfed.simulations.studies.sweep import arm_config

    cfg = load_simulation_config(["preset=label_efficiency"])
    dp = arm_config(cfg, list(cfg.label_efficiency.dp_overrides))
    assert dp.privacy.mode.value == "local" and dp.privacy.local.noise_multiplier == 3.5
    assert not dp.label_efficiency.enabled  # the arm's federation runs no study of its own
    assert (dp.model, dp.train, dp.federation, dp.synth) == (cfg.model, cfg.train, cfg.federation, cfg.synth)


def test_fine_tunes_give_the_same_predictions_in_worker_processes_as_here(tmp_path: Path) -> None:
    from ctfed.common.config import FinetuneConfig, ModelConfig
    from ctfed.server.rounds import initial_encoder_state
    from ctfed.simulations.studies.label_efficiency import FinetuneJob, finetune_pool, run_finetune_jobs

    caches = [str(write_random_cache(tmp_path / f"site_{k}", [k, 1 - k, k, 1 - k, 1, 0])) for k in range(2)]
    cfg = load_simulation_config(["label_efficiency.finetune_workers=2"])
    encoder = initial_encoder_state(cfg)
    recipe = FinetuneConfig(probe_steps=3, stage_steps=3, batch_size=2, label_names=["any"])
    model = ModelConfig()
    jobs = [
        FinetuneJob(("site", "2", mode), ("site_0",), model, recipe, encoder, ((caches[0], (0, 1)),), ((caches[0], (2, 3)), (caches[0], (4, 5))))
        for mode in ("linear_probe", "full")
    ] + [FinetuneJob(("pooled_labels", "2", "progressive"), ("site_0", "site_1"), model, recipe, encoder,
                     tuple((c, (0, 1)) for c in caches), tuple((c, part) for c in caches for part in ((2, 3), (4, 5))))]
    pool = finetune_pool(cfg)
    assert pool is not None
    try:
        in_workers = run_finetune_jobs(jobs, pool, progress=lambda message: None)
    finally:
        pool.shutdown()
    here = run_finetune_jobs(jobs, None, progress=lambda message: None)
    # Predictions are rounded and must match exactly; the raw loss may differ in its last bits, since a
    # worker runs on one thread and sums in another order.
    def without_loss(results: list) -> list:
        return [[{k: v for k, v in part.items() if k != "final_loss"} for part in parts] for parts in results]

    assert without_loss(in_workers) == without_loss(here)
    losses = [[part["final_loss"] for part in parts] for parts in here]
    assert [[part["final_loss"] for part in parts] for parts in in_workers] == [pytest.approx(l, rel=1e-5) for l in losses]
    assert [len(p) for p in here] == [1, 1, 2] and here[2][1]["labelled_scans"] == 4


@pytest.fixture(scope="module")
def study_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("label_efficiency")
    code = main([
        "simulate", "preset=label_efficiency", "synth.scans_per_site_list=[12,8,10]", "federation.rounds=2",
        "train.local_steps=1", "train.batch_size=2", "label_efficiency.labels_per_site=[2,4]",
        "label_efficiency.judged_labels_per_site=4", "label_efficiency.n_boot=20", "label_efficiency.curve_points=2",
        "label_efficiency.finetune.probe_steps=1", "label_efficiency.finetune.stage_steps=1",
        # No local-DP federation here (it is the same path as the first with the DP overrides,
        # test_dp_arm_is_the_federation_with_the_dp_overrides): it would double the test's time.
        "label_efficiency.dp_overrides=[]", "label_efficiency.modes=[linear_probe,full]",
        # A real federated phase 2 per single-encoder arm at the judged level, 2 rounds, one mode
        # (each more mode is one more federation per arm; choose() picks among them as for any head).
        "label_efficiency.phase2_levels=[4]", "label_efficiency.phase2_rounds=2", "label_efficiency.phase2_modes=[full]",
        # One head LR: a second is one more federation per arm and mode (phase2_options, tested alone).
        "label_efficiency.phase2_head_lrs=[0.001]",
        # One process: worker processes are tested on their own (test_fine_tunes_give_the_same_...).
        "label_efficiency.finetune_workers=1",
        # The session's shared Ray head (tests/conftest.py) instead of one Ray start per federation.
        "simulation.concurrent_sites=0",
        f"output_dir={out}", "run_name=study",
    ])
    assert code == 0
    return out / "study"


def test_no_test_scan_is_pretrained_on(study_run: Path) -> None:
    splits = json.loads((study_run / STUDY_DIR / "splits.json").read_text())
    for name, cut in splits["sites"].items():
        cache = CachedVolumes(Path(cut["cache"]))
        test_hashes = {cache.entries[i]["content_hash"] for i in cut["test"]}
        view = CachedVolumes(study_run / STUDY_DIR / PRETRAIN_VIEWS / name)
        assert len(view) == len(cache) - len(cut["test"])
        assert not test_hashes & {entry["content_hash"] for entry in view.entries}


def test_every_arm_fine_tuned_at_every_level_and_judged_in_the_issue_shape(study_run: Path) -> None:
    data = json.loads((study_run / STUDY_DIR / STUDY_JSON).read_text())
    assert data["status"] == "completed"
    assert set(data["arms"]) == {arm.value for arm in Arm} - {Arm.federated_dp.value}
    pools = {name: site["labelled_pool"] for name, site in data["sites"].items()}
    for arm, entry in data["arms"].items():
        sites = [data["smallest_site"]] if arm == Arm.local_only.value else list(data["sites"])
        # Local-only has one site's encoder: no head on every site's labels.
        assert set(entry["finetune"]) == ({"site"} if arm == Arm.local_only.value else {"site", "pooled_labels", "federated_phase2"})
        for level in (2, 4):
            for mode in data["config"]["modes"]:
                for heads, by_level in entry["finetune"].items():
                    if heads == "federated_phase2":
                        continue  # one level, one mode: test_federated_phase2_heads...
                    predicted = by_level[str(level)][mode]
                    assert set(predicted) == set(sites)
                    for site in sites:
                        assert len(predicted[site]["test"]) == data["sites"][site]["test"]
                        assert len(predicted[site]["val"]) == data["sites"][site]["val"]
                        # Each site's head on its own labels; the pooled head on every site's.
                        expected = min(level, pools[site]) if heads == "site" else sum(min(level, n) for n in pools.values())
                        assert predicted[site]["labelled_scans"] == expected
    for heads in ("site", "pooled_labels", "federated_phase2"):
        assert set(data["model_free"][heads]) == {"window_histograms", "raw_voxels"}
    assert data["arms"][Arm.centralized.value]["budget"]["pretrain_steps_per_model"] == 2
    assert [c["steps"] for c in data["arms"][Arm.federated.value]["curve"]] == [0, 2]
    by_heads = {heads: {v["key"] for v in data["verdicts"] if v["heads"] == heads} for heads in ("site", "pooled_labels", "federated_phase2")}
    assert {"pretrained_vs_scratch", "gap_to_centralized"} <= by_heads["federated_phase2"]
    assert {v["labels_per_site"] for v in data["verdicts"] if v["heads"] == "federated_phase2"} == {4}
    assert {"pretrained_vs_scratch", "federated_vs_local_only", "gap_to_centralized", "pretrained_vs_model_free"} <= by_heads["site"]
    assert {"pretrained_vs_scratch", "gap_to_centralized", "pretrained_vs_model_free"} <= by_heads["pooled_labels"]
    assert "federated_vs_local_only" not in by_heads["pooled_labels"] and "dp_cost" not in by_heads["site"]
    for verdict in data["verdicts"]:
        assert VERDICT_KEYS <= set(verdict)
        assert {"value", "low", "high"} <= set(verdict["difference"])
        assert verdict["task"] in data["tasks"] and verdict["labels_per_site"] in (2, 4)
    for heads in ("site", "pooled_labels", "federated_phase2"):
        assert any(t["heads"] == heads and t["target"].startswith("federated + best fine-tuning beats scratch") for t in data["targets"])
    assert set(data["summary"]) == {"site", "pooled_labels", "federated_phase2"}
    assert Arm.local_only.value not in data["summary"]["pooled_labels"] and Arm.local_only.value not in data["summary"]["federated_phase2"]


def test_federated_phase2_heads_are_real_federations_on_the_levels_labels(study_run: Path) -> None:
    """Each single-encoder arm's phase 2 is a Flower federation with no SSL round that starts from
    the arm's encoder, in each of label_efficiency.phase2_modes (here one); each site
    trains on its labelled scans of the level and evaluates on its validation scans, never a
    test scan."""
    from ctfed.common.config import FinetuneConfig
    from ctfed.common.finetune import Finetuner, load_classifier
    from ctfed.common.labelled import CacheScans, LabelledScans
    from ctfed.simulations.studies.label_efficiency import choose

    data = json.loads((study_run / STUDY_DIR / STUDY_JSON).read_text())
    splits = json.loads((study_run / STUDY_DIR / "splits.json").read_text())
    views = study_run / STUDY_DIR / "phase2" / "labels_4"
    for arm in (Arm.federated, Arm.centralized, Arm.scratch):
        entry = data["arms"][arm.value]
        (mode, predicted), = entry["finetune"]["federated_phase2"]["4"].items()
        assert mode == "full" == choose(data, arm.value, "4", list(data["sites"]), "federated_phase2")
        run = study_run / next(iter(predicted.values()))["run"]
        results = json.loads((run / "results.json").read_text())
        assert results["status"] == "completed" and [(r["phase"], r["aggregated"]) for r in results["rounds"]] == [("finetune", True)] * 2
        assert Path(results["config"]["federation"]["initial_encoder"]) == (study_run / entry["encoders"]["pooled"]["file"]).resolve()
        for site in results["rounds"][-1]["sites"]:
            cut = splits["sites"][site["site"]]
            assert site["num_examples"] == min(4, len(cut["labelled"]))
            assert predicted[site["site"]]["labelled_scans"] == sum(min(4, len(c["labelled"])) for c in splits["sites"].values())
        for name, site in data["sites"].items():
            assert len(predicted[name]["test"]) == site["test"] and len(predicted[name]["val"]) == site["val"]
        # As a site predicts with the federation's classifier: its feature statistics (which stay
        # at the sites) fitted on its own cache first.
        classifier, _ = load_classifier(run / "checkpoints" / results["rounds"][-1]["checkpoint"])
        assert not classifier.standardizer.fitted
        name, cut = next(iter(splits["sites"].items()))
        cache, tasks = CachedVolumes(Path(cut["cache"])), data["tasks"]
        classifier.fit_standardizer(CacheScans(CachedVolumes(views / name), 32))  # the site's whole (view of its) cache
        test = LabelledScans(cache, cut["test"], tasks, 32)
        probs = Finetuner(classifier, FinetuneConfig(label_names=tasks), test).predict(test)[0]
        np.testing.assert_allclose(probs, predicted[name]["test"], atol=2e-5)  # stored to 5 digits
        for name, cut in splits["sites"].items():
            cache = CachedVolumes(Path(cut["cache"]))
            view = CachedVolumes(views / name)
            test_hashes = {cache.entries[i]["content_hash"] for i in cut["test"]}
            # Every scan the site pretrained on (they fit the head's feature statistics), none of its test scans.
            assert len(view) == len(cache) - len(cut["test"]) and not test_hashes & {e["content_hash"] for e in view.entries}
            marked = sorted(e["label"].get("finetune_split") or "-" for e in view.entries)
            level, val = min(4, len(cut["labelled"])), len(cut["val"])
            assert marked == sorted(["train"] * level + ["test"] * val + ["-"] * (len(view) - level - val))


def test_rerun_phase2_refuses_an_unfinished_study_and_a_config_without_those_heads(study_run: Path, tmp_path: Path) -> None:
    import shutil

    from ctfed.simulations.studies.label_efficiency import rerun_phase2

    copy = tmp_path / "study"
    shutil.copytree(study_run, copy, ignore=shutil.ignore_patterns("arms", "checkpoints", "dicom", "cache"))
    with pytest.raises(RuntimeError, match="no federated_phase2"):
        rerun_phase2(copy, ["label_efficiency.heads=[site,pooled_labels]"])
    data = json.loads((copy / STUDY_DIR / STUDY_JSON).read_text())
    (copy / STUDY_DIR / STUDY_JSON).write_text(json.dumps({**data, "status": "running"}))
    with pytest.raises(RuntimeError, match="not completed"):
        rerun_phase2(copy)


def test_report_plots_and_rerender(study_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = study_run / STUDY_DIR / STUDY_MD
    text = report.read_text()
    assert "Targets at 4 labelled scans per site" in text and "too small to conclude" in text
    assert "pooled_labels heads: verdicts per level" in text and "Mean test AUROC over tasks" in text
    for plot in (auroc_plot("site"), auroc_plot("pooled_labels"), CURVE_PLOT):
        assert (study_run / STUDY_DIR / PLOTS / plot).read_bytes().startswith(PNG_SIGNATURE)
    report.unlink()
    assert main(["report", str(study_run)]) == 0
    assert report.is_file()


def test_the_phase2_replay_gives_the_federations_predictions(study_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The one-process replay of a federated phase 2 (a research tool) computes what the Flower
    federation did, up to secure aggregation's rounding; an arm without one encoder is refused."""
    from ctfed.simulations.studies.phase2_replay import main as replay_main
    from ctfed.simulations.studies.phase2_replay import replay_phase2

    data = json.loads((study_run / STUDY_DIR / STUDY_JSON).read_text())
    recorded = data["arms"][Arm.federated.value]["finetune"]["federated_phase2"]["4"]["full"]
    result = replay_phase2(study_run, Arm.federated.value, "full")
    assert len(result.val_curve) == len(result.losses) == 2  # the fixture's phase2_rounds
    for site, predicted in recorded.items():
        for part in ("val", "test"):
            np.testing.assert_allclose(result.predictions[part][site], predicted[part], atol=1e-3)
    assert replay_main([str(study_run), "--arm", Arm.local_only.value]) == 1
    assert "no single encoder" in capsys.readouterr().err
