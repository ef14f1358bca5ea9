"""What compressing the update costs, for ``ctfed bench``: fp32 against compressed transport.

Each variant is the coordinator's real round loop (``server/rounds.run_federation``: phase 1
SSL rounds, then phase 2 fine-tuning rounds) against the sites' real ClientApp handlers
(``client/app.py``, and ``client/secagg.py``'s stages for secure aggregation) through an
in-process Grid, on the same two prepared synthetic hospitals and seeds. Only the update
format differs:

* plain path: ``federation.transport`` float32 / float16 / bfloat16;
* secure path: SecAgg+ with ``secagg.modulus_bits`` 64 (default) / 32 (with the largest
  quantisation range that cannot wrap for ``max_sites`` x ``max_weight``).

Figures per variant: bytes a site sent per round in each phase (read from results.json,
which measures the received message), the relative error of the round-1 aggregated update
against float32's (same sites, same seeds, so the same local training), and the weighted SSL
loss in the last phase-1 round.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

import torch
from flwr.app import Context, RecordDict

from ctfed.client.site import DATA_DIR_KEY, PARTITION_ID_KEY, site_cache_dirs
from ctfed.common.checkpoint import load_checkpoint
from ctfed.common.config import PreprocessConfig, RunConfig, SecAggConfig, load_run_config
from ctfed.common.exchange import RUN_DIR_KEY
from ctfed.common.preprocess import prepare
from ctfed.server.results import CHECKPOINT_DIR, GLOBAL_PREFIX, RESULTS_NAME
from ctfed.server.rounds import run_federation
from ctfed.simulations.runtime.inprocess import InProcessGrid
from ctfed.simulations.data.synth import synthesize_federation


def run_inprocess(cfg: RunConfig, data_dir: Path, run_dir: Path) -> dict[str, Any]:
    """A whole federation of ``cfg`` on the caches under ``data_dir``, in this process; its results.json."""
    from ctfed.client.app import train
    from ctfed.client.secagg import stage_handlers

    caches = site_cache_dirs(data_dir)
    node_ids = list(range(1, len(caches) + 1))
    handlers = {**stage_handlers(train), "train": train}
    contexts = {
        node: Context(
            run_id=1, node_id=node, node_config={PARTITION_ID_KEY: index}, state=RecordDict(),
            run_config={DATA_DIR_KEY: str(data_dir), RUN_DIR_KEY: str(run_dir)},
        )
        for index, node in enumerate(node_ids)
    }
    run_federation(InProcessGrid(handlers, node_ids, contexts=contexts), cfg, run_dir)
    return json.loads((run_dir / RESULTS_NAME).read_text(encoding="utf-8"))


def secagg_32bit_overrides(sites: int, max_weight: int) -> list[str]:
    """SecAgg+ with a 32-bit modulus: the finest grid whose sum cannot wrap for these bounds."""
    bounds = SecAggConfig(modulus_bits=32, max_sites=sites, max_weight=max_weight, quantization_range=2)
    return [
        "secagg.modulus_bits=32", f"secagg.max_sites={sites}", f"secagg.max_weight={max_weight}",
        f"secagg.quantization_range={bounds.largest_quantization_range()}",
    ]


VARIANTS: dict[str, list[str]] = {
    "float32": ["secagg.enabled=false", "federation.transport=float32"],
    "float16": ["secagg.enabled=false", "federation.transport=float16"],
    "bfloat16": ["secagg.enabled=false", "federation.transport=bfloat16"],
    "secagg-64bit": ["secagg.enabled=true"],
    "secagg-32bit": ["secagg.enabled=true", *secagg_32bit_overrides(sites=8, max_weight=64)],
}


# Quick mode (the test of ``ctfed bench``): the reference, one float format, 32-bit SecAgg+.
QUICK_VARIANTS = ("float32", "float16", "secagg-32bit")


def _round_one_update(run_dir: Path) -> dict[str, torch.Tensor]:
    start = load_checkpoint(run_dir / CHECKPOINT_DIR / f"{GLOBAL_PREFIX}0000.safetensors")[0]
    after = load_checkpoint(run_dir / CHECKPOINT_DIR / f"{GLOBAL_PREFIX}0001.safetensors")[0]
    return {name: after[name].double() - start[name].double() for name in start}


def _relative_error(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    diff = math.sqrt(sum(float((update[n] - reference[n]).pow(2).sum()) for n in reference))
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in reference.values()))
    return diff / norm if norm else float("nan")


def _weighted_loss(record: dict[str, Any]) -> float | None:
    sites = [s for s in record["sites"] if s.get("loss") is not None and s.get("num_examples")]
    total = sum(s["num_examples"] for s in sites)
    return sum(s["loss"] * s["num_examples"] for s in sites) / total if total else None


def _bytes_by_phase(results: dict[str, Any]) -> dict[str, float]:
    """Median bytes one site sent per round, per phase (phase 2 split into probe and unfrozen rounds)."""
    by_phase: dict[str, list[int]] = {}
    for record in results["rounds"]:
        phase = record.get("phase", "pretrain")
        if phase == "finetune":
            phase = f"finetune-{record.get('finetune_stage') or 'stage'}"
        by_phase.setdefault(phase, []).extend(s["bytes_received"] for s in record["sites"] if s["bytes_received"])
    return {phase: statistics.median(sizes) for phase, sizes in by_phase.items() if sizes}


def bench_transport(
    work: Path, model: str, rounds: int, finetune_rounds: int, local_steps: int, variants: Sequence[str] = tuple(VARIANTS)
) -> dict[str, Any]:
    """Every variant on the same two synthetic hospitals (see the module docstring)."""
    data_dir = work / "cache"
    # The compare study's hospitals: both can split their labels for phase 2.
    for site_dir in synthesize_federation(work / "dicom", 2, [5, 6], seed=0):
        prepare(site_dir, data_dir / site_dir.name, PreprocessConfig(output_size=load_run_config([f"model={model}"]).model.image_size),
                labels_csv=site_dir / "labels.csv", progress=False)
    common = [
        f"model={model}", f"federation.rounds={rounds}", f"federation.finetune_rounds={finetune_rounds}",
        f"train.local_steps={local_steps}", "federation.min_sites=2",
        "secagg.num_shares=3", "secagg.reconstruction_threshold=2",
        # Updates of a full LR step (5e-4 per volume batch): the errors are relative to the update,
        # and at DINO's scaled LR for batch 2 (3.9e-6) a one-step update spans only ~16 steps of
        # the 32-bit grid (2.4e-7), which alone makes its relative error ~4%.
        "train.lr_reference_batch=2", "train.warmup_fraction=0",
    ]
    rows: list[dict[str, Any]] = []
    reference: dict[str, torch.Tensor] | None = None
    for name in variants:
        run_dir = work / f"transport-{name}"
        results = run_inprocess(load_run_config([*common, *VARIANTS[name]]), data_dir, run_dir)
        update = _round_one_update(run_dir)
        if reference is None:
            reference = update
        pretrain = [r for r in results["rounds"] if r.get("phase", "pretrain") == "pretrain"]
        rows.append({
            "variant": name,
            "bytes_from_site": _bytes_by_phase(results),
            "relative_error_vs_" + variants[0]: _relative_error(update, reference),
            "ssl_loss_last_round": _weighted_loss(pretrain[-1]),
            "aggregated_rounds": sum(1 for r in results["rounds"] if r["aggregated"]),
            "rounds": len(results["rounds"]),
        })
    return {"model": model, "sites": 2, "rounds": rounds, "finetune_rounds": finetune_rounds, "variants": rows}


def run_transport_bench(quick: bool) -> dict[str, Any]:
    """``ctfed bench``'s transport section; quick: three variants, two SSL rounds and one
    fine-tune round (the probe) of one local step each, on the tiny model."""
    import tempfile

    print("transport: fp32 vs float16/bfloat16 updates, SecAgg+ 64 vs 32 bits (in-process federations) ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="ctfed-bench-transport-") as tmp:
        if quick:
            return bench_transport(Path(tmp), "tiny", rounds=2, finetune_rounds=1, local_steps=1, variants=QUICK_VARIANTS)
        return bench_transport(Path(tmp), "small", rounds=3, finetune_rounds=3, local_steps=4)


def print_transport(figures: dict[str, Any]) -> None:
    rows = figures["variants"]
    reference = rows[0]
    error_key = f"relative_error_vs_{reference['variant']}"
    print(f"transport ({figures['model']}, {figures['sites']} sites, {figures['rounds']} SSL + "
          f"{figures['finetune_rounds']} fine-tune rounds; bytes one site sends per round, by phase):")
    for row in rows:
        sizes = ", ".join(
            f"{phase} {size / 1024:.1f} KiB (x{size / reference['bytes_from_site'][phase]:.2f})"
            for phase, size in row["bytes_from_site"].items() if phase in reference["bytes_from_site"]
        )
        loss = f"{row['ssl_loss_last_round']:.4f}" if row["ssl_loss_last_round"] is not None else "-"
        print(f"  {row['variant']:<13} {sizes}; round-1 update rel. error {row[error_key]:.1e}; "
              f"SSL loss in the last round {loss}; {row['aggregated_rounds']}/{row['rounds']} rounds aggregated")
