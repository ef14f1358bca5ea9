"""Same config and seeds, same results (issue #15: "the same results.json for the same seed").

Each federation is ``ctfed simulate``'s own data step (synthetic DICOM -> prepared caches)
followed by the coordinator's real round loop in process against the real ClientApp handlers
(plain FedAvg, or SecAgg+'s five stages). As in Flower's simulation engine, the nodes get
fresh random ids every run, so the coordinator samples and hears the sites in another order
each time. Timing and memory fields are the only ones allowed to differ.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from ctfed.common.config import load_run_config
from ctfed.server.results import CHECKPOINT_DIR, RESULTS_NAME
from ctfed.server.rounds import run_federation
from ctfed.simulations.config import load_simulation_config

SITES = 3
# Machine-dependent by nature: wall and CPU times, resident memory.
UNREPRODUCIBLE_KEYS = {"wall_seconds", "seconds", "train_seconds", "data_seconds", "round_seconds",
                       "monitor_seconds", "peak_rss_mb", "time"}


def _federate(run_dir: Path, seed: int, secure: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """One whole run with ``synth.seed = train.seed = seed``; (results.json without its
    machine-dependent fields and its run folder, sha256 of every global checkpoint's bytes)."""
    from ctfed.client.app import train
    from ctfed.client.secagg import stage_handlers
    from ctfed.simulations.runtime.inprocess import InProcessGrid
    from ctfed.simulations.runtime.simulate import synthesize_and_prepare

    run_dir.mkdir(parents=True)
    # Three volumes per site (one batch of two): a site that sees them in another order trains differently.
    sim = load_simulation_config([f"synth.sites={SITES}", "synth.scans_per_site=3", f"synth.seed={seed}"])
    caches = synthesize_and_prepare(sim, run_dir)
    cfg = load_run_config([
        f"train.seed={seed}", "train.local_steps=2", "train.batch_size=2", "federation.rounds=2",
        f"federation.min_sites={SITES}", "monitor.enabled=false", f"secagg.enabled={str(secure).lower()}",
    ])
    # Flower's simulation engine: random node ids, partition ids in creation order.
    nodes = random.SystemRandom().sample(range(1, 2**62), SITES)
    contexts = {
        node: Context(run_id=1, node_id=node, node_config={"partition-id": index}, state=RecordDict(),
                      run_config={"data-dir": str(caches), "run-dir": str(run_dir)})
        for index, node in enumerate(nodes)
    }
    handlers: dict[str, Callable[[Message, Context], Message]] = stage_handlers(train) if secure else {"train": train}
    run_federation(InProcessGrid(handlers, nodes, contexts=contexts, auth_dir=run_dir / "keys"), cfg, run_dir)

    results = json.loads((run_dir / RESULTS_NAME).read_text(encoding="utf-8"))

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in UNREPRODUCIBLE_KEYS}
        return [strip(v) for v in node] if isinstance(node, list) else node

    results = strip(results)
    # Random by design (128 bits, one per run: the sites key their local state by it, so two
    # runs must never share one); everything the seed decides is compared.
    assert len(results.pop("federation_id")) == 32
    results["config"] = {k: v for k, v in results["config"].items() if k != "output_dir"}
    checkpoints = {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((run_dir / CHECKPOINT_DIR).glob("global_round_*.safetensors"))
    }
    return results, checkpoints


@pytest.mark.parametrize("secure", [True, False], ids=["secagg", "plain"])
def test_same_seed_same_results_and_weights(tmp_path: Path, secure: bool) -> None:
    first, first_weights = _federate(tmp_path / "first", seed=3, secure=secure)
    second, second_weights = _federate(tmp_path / "second", seed=3, secure=secure)

    assert [r["aggregated"] for r in first["rounds"]] == [True, True]
    losses = [[s["losses"] for s in r["sites"]] for r in first["rounds"]]
    assert losses == [[s["losses"] for s in r["sites"]] for r in second["rounds"]]  # the readable diff first
    assert first == second
    assert len(first_weights) == 3  # rounds 0, 1, 2
    assert first_weights == second_weights
    if secure:
        return
    # ... and a different seed gives different ones (plain path only: the point is the seed, not the path).
    other, other_weights = _federate(tmp_path / "other", seed=4, secure=secure)
    assert [[s["losses"] for s in r["sites"]] for r in other["rounds"]] != losses
    assert other_weights["global_round_0000.safetensors"] != first_weights["global_round_0000.safetensors"]
    assert other_weights["global_round_0002.safetensors"] != first_weights["global_round_0002.safetensors"]


def test_a_cache_prepared_again_under_a_new_secret_trains_the_same(tmp_path: Path) -> None:
    """A cache lists its scans by keyed pseudonym; a new site secret reorders the manifest but
    must not change what the site trains (LocalTrainer samples in content order)."""
    from ctfed.client.train import LocalTrainer
    from ctfed.common.preprocess import CachedVolumes, prepare
    from ctfed.common.privacy import install_site_secret
    from ctfed.simulations.data.synth import synthesize_federation

    cfg = load_run_config(["train.local_steps=2", "train.batch_size=2"])
    (site_dir,) = synthesize_federation(tmp_path / "dicom", 1, 4, seed=5)
    runs = []
    for name, secret in (("before", b"\x01" * 32), ("after", b"\x02" * 32)):
        install_site_secret(tmp_path / name, secret)
        prepare(site_dir, tmp_path / name, cfg.preprocess, progress=False)
        dataset = CachedVolumes(tmp_path / name)
        trainer = LocalTrainer(cfg.model, cfg.train, dataset, seed=0)
        runs.append(([e["content_hash"] for e in dataset.entries], trainer.train_round(0).losses, trainer.encoder_state()))
    (hashes_a, losses_a, weights_a), (hashes_b, losses_b, weights_b) = runs
    assert sorted(hashes_a) == sorted(hashes_b) and hashes_a != hashes_b  # the same scans, listed in another order
    assert losses_a == losses_b
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)
