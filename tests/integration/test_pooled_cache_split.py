"""Simulated sites cut from one pooled cache: partition properties, manifest views, and a
tiny ``ctfed simulate`` on a Dirichlet split of real prepared scans."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ctfed.common.cli import main
from ctfed.common.config import ConfigError
from ctfed.simulations.config import SplitConfig, SplitMethod, load_simulation_config
from ctfed.common.preprocess import MANIFEST, SPLIT_DIR, SPLIT_SUMMARY, CachedVolumes
from ctfed.simulations.data.split import label_skew, partition, read_pool, split_pool

from helpers import write_manifest_cache  # tests/helpers.py


def _labels(count: int, classes: int = 2) -> list[str]:
    return [str(i % classes) for i in range(count)]


def _dirichlet(alpha: float, seed: int = 0, sites: int = 4) -> SplitConfig:
    return SplitConfig(pooled_cache="x", method=SplitMethod.dirichlet, sites=sites, alpha=alpha, seed=seed)


@pytest.mark.parametrize("method", [SplitMethod.iid, SplitMethod.dirichlet])
def test_partition_is_disjoint_complete_and_deterministic(method: SplitMethod) -> None:
    labels = _labels(60, classes=3)
    cfg = SplitConfig(pooled_cache="x", method=method, sites=5, alpha=0.5, seed=7)
    parts = partition(labels, cfg)
    members = [i for part in parts.values() for i in part]
    assert sorted(members) == list(range(60))  # every scan once: disjoint and complete
    assert min(len(part) for part in parts.values()) >= cfg.min_scans
    assert partition(labels, cfg) == parts
    other = SplitConfig(pooled_cache="x", method=method, sites=5, alpha=0.5, seed=8)
    assert partition(labels, other) != parts


def test_dirichlet_alpha_controls_label_skew() -> None:
    labels = _labels(400, classes=2)
    seeds = range(5)

    def skew(cfg_for_seed) -> float:
        return float(np.mean([label_skew(partition(labels, cfg_for_seed(seed)), labels) for seed in seeds]))

    iid = skew(lambda seed: SplitConfig(pooled_cache="x", method=SplitMethod.iid, sites=4, seed=seed))
    small = skew(lambda seed: _dirichlet(0.1, seed))
    large = skew(lambda seed: _dirichlet(1000.0, seed))
    # Small alpha: sites hold mostly one class; large alpha: as mixed as an iid shuffle.
    assert small > 0.25 > 0.05 > large
    assert abs(large - iid) < 0.03
    assert small > 5 * iid


def test_dirichlet_that_cannot_give_every_site_enough_scans_says_what_to_change() -> None:
    labels = _labels(12, classes=2)
    with pytest.raises(ConfigError, match="raise split.alpha"):
        partition(labels, SplitConfig(pooled_cache="x", method=SplitMethod.dirichlet, sites=4, alpha=0.01,
                                      min_scans=3, max_draws=20))
    with pytest.raises(ConfigError, match="cannot give 7 sites 2 each"):
        partition(labels, SplitConfig(pooled_cache="x", method=SplitMethod.iid, sites=7))


def test_split_config_rules() -> None:
    with pytest.raises(ConfigError, match="split.alpha"):
        SplitConfig(alpha=0.0)
    with pytest.raises(ConfigError, match="split.sites"):
        SplitConfig(method=SplitMethod.dirichlet, sites=0)
    SplitConfig(method=SplitMethod.by_site, sites=0)
    with pytest.raises(ConfigError, match="set one of them"):
        load_simulation_config(["split.pooled_cache=/pool", "simulation.data_dir=/caches"])
    cfg = load_simulation_config(["split.pooled_cache=/pool", "split.method=dirichlet", "split.alpha=0.3", "split.sites=3"])
    assert cfg.split.method is SplitMethod.dirichlet and cfg.split.enabled


def _cache(root: Path, labels: list[int | None], start: int = 0) -> None:
    """A prepared cache's files: one 1x8³ volume per label, filled with its index (None: no label)."""
    write_manifest_cache(root, labels, start=start)


def test_views_reference_the_pooled_volumes_without_copying(tmp_path: Path) -> None:
    _cache(tmp_path / "pool", [0, 1] * 6 + [None, None])
    cfg = SplitConfig(pooled_cache=str(tmp_path / "pool"), method=SplitMethod.dirichlet, sites=3, alpha=1.0, seed=1)
    views = split_pool(cfg, tmp_path / "run")
    assert views == tmp_path / "run" / SPLIT_DIR
    assert not list(views.rglob("*.npy"))  # nothing copied
    seen = []
    for site in sorted(views.glob(f"*/{MANIFEST}")):
        volumes = CachedVolumes(site.parent)
        # Each volume is filled with its pool index: the view reads the pooled file itself.
        seen += [int(volumes[i][0, 0, 0, 0]) for i in range(len(volumes))]
        assert volumes.preprocessing == {"output_size": 8}
    assert sorted(seen) == list(range(14))
    summary = json.loads((views / SPLIT_SUMMARY).read_text())
    assert summary["scans"] == 14 and len(summary["sites"]) == 3
    assert sum(site["labels"]["(none)"] for site in summary["sites"]) == 2  # unlabelled scans are their own class
    assert "| site | scans | any=(none) | any=0 | any=1 |" in (views / "split.md").read_text()
    # Splitting again into fewer sites leaves no stale site behind.
    split_pool(SplitConfig(pooled_cache=cfg.pooled_cache, method=SplitMethod.iid, sites=2), tmp_path / "run")
    assert len(list(views.glob(f"*/{MANIFEST}"))) == 2


def test_by_site_keeps_the_origin_sites_and_skips_duplicates_and_missing_volumes(tmp_path: Path) -> None:
    _cache(tmp_path / "pool" / "hospital-a", [0, 1, 0])
    _cache(tmp_path / "pool" / "hospital-b", [1, 1], start=3)
    # The same scan prepared at both hospitals, and a volume deleted after preparing.
    manifest = tmp_path / "pool" / "hospital-b" / MANIFEST
    data = json.loads(manifest.read_text())
    data["series"].append(dict(data["series"][0], key="dup", content_hash="0000"))
    manifest.write_text(json.dumps(data))
    (tmp_path / "pool" / "hospital-b" / "v4.npy").unlink()
    pool = read_pool(tmp_path / "pool")
    assert sorted(s["reason"] for s in pool.skipped) == [
        "same scan already pooled from another cache", "volume file missing from the pooled cache"
    ]
    views = split_pool(SplitConfig(pooled_cache=str(tmp_path / "pool"), method=SplitMethod.by_site, sites=0, min_scans=1), tmp_path / "run")
    assert {p.parent.name: len(CachedVolumes(p.parent)) for p in views.glob(f"*/{MANIFEST}")} == {"hospital-a": 3, "hospital-b": 1}
    with pytest.raises(ConfigError, match="origin site"):
        split_pool(SplitConfig(pooled_cache=str(tmp_path / "pool" / "hospital-a"), method=SplitMethod.by_site, sites=0), tmp_path / "run2")


def test_a_manifest_cannot_point_outside_its_volumes_folder(tmp_path: Path) -> None:
    _cache(tmp_path / "site", [0])
    manifest = tmp_path / "site" / MANIFEST
    data = json.loads(manifest.read_text())
    data["series"][0]["file"] = "../elsewhere.npy"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="inside the cache"):
        CachedVolumes(tmp_path / "site")


@pytest.mark.slow
def test_simulate_on_a_dirichlet_split_of_a_pooled_cache(tmp_path: Path) -> None:
    """Real DICOM -> one pooled cache per hospital -> Dirichlet split -> a real Flower run."""
    from ctfed.common.config import PreprocessConfig
    from ctfed.common.preprocess import prepare
    from ctfed.simulations.data.synth import synthesize_federation

    pool = tmp_path / "pool"
    for site_dir in synthesize_federation(tmp_path / "dicom", 2, [4, 4], seed=3):
        prepare(site_dir, pool / site_dir.name, PreprocessConfig(output_size=32), labels_csv=site_dir / "labels.csv", progress=False)
    code = main([
        "simulate", f"output_dir={tmp_path / 'runs'}", "run_name=split",
        f"split.pooled_cache={pool}", "split.method=dirichlet", "split.sites=2", "split.alpha=0.5", "split.seed=1",
        "federation.rounds=1", "train.local_steps=1", "secagg.enabled=false",
    ])
    assert code == 0
    run = tmp_path / "runs" / "split"
    results = json.loads((run / "results.json").read_text())
    split = results["data_split"]
    assert split["method"] == "dirichlet" and split["alpha"] == 0.5
    pooled = sum(len(CachedVolumes(c)) for c in (pool / "site_0", pool / "site_1"))
    assert sum(site["scans"] for site in split["sites"]) == pooled
    assert {s["site"] for s in results["rounds"][0]["sites"] if s["status"] == "aggregated"} == {"site_0", "site_1"}
    views = {p.parent.name: len(CachedVolumes(p.parent)) for p in (run / SPLIT_DIR).glob(f"*/{MANIFEST}")}
    assert views == {site["site"]: site["scans"] for site in split["sites"]}
    assert "## Data split" in (run / "report.md").read_text()
    assert not list((run / SPLIT_DIR).rglob("*.npy"))
    assert torch.isfinite(torch.tensor(results["rounds"][0]["sites"][0]["losses"])).all()
