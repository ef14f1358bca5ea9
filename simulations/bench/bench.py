"""``ctfed bench``: the data pipeline's figures, measured in one run on this machine.

* DICOM ingest: ``load_series`` against SimpleITK's ImageSeriesReader on the same
  uncompressed series (ratio > 1: ctfed is faster), and ``prepare`` throughput with 1 vs
  N workers.
* Data loader share: the fraction of a local training step spent reading cached volumes
  and making crops (goal: < 10% at the default model size).
* Secure aggregation: SecAgg+ round time / plain round time for 5 sites at ~10M and ~86M
  parameters (simulations/bench/secagg_bench.py), alone and with a local training round added.
* Transport: fp32 against float16/bfloat16 updates and SecAgg+ at 64 vs 32 bits, bytes per
  round per phase and the effect on the aggregate and the loss (simulations/bench/transport_bench.py).
* SecAgg+ against stock Flower: plain, our SecAgg+ and Flower's SecAggPlusWorkflow +
  secaggplus_mod in one Flower simulation, same sites and update size
  (simulations/bench/stock_secagg_bench.py).
* Federation: round overhead over local training, bytes per round in each phase, peak
  memory of a site process, round time against the number of sites and against the model
  size (simulations/bench/federation_bench.py, real simulated federations).

The run time of each part and of the whole run is printed and kept in the JSON
(``run_seconds``), so the cost of the full mode is on record.

Absolute times on a shared 2-core machine are noisy; the ratios, measured back to back in
one run (median of repeats), are the figures to compare. Results go to a JSON file and a
printed table.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable

from ctfed.client.train import LocalTrainer
from ctfed.common.config import load_run_config
from ctfed.common.dicom import load_series, scan
from ctfed.common.fileio import write_json_atomic
from ctfed.common.preprocess import CachedVolumes, import_transforms, prepare
from ctfed.simulations.bench.federation_bench import (
    bench_federation,
    bench_model_scaling,
    encoder_parameters,
    print_federation,
    print_model_scaling,
)
from ctfed.simulations.bench.secagg_bench import (
    bench_coordinator_memory,
    bench_secagg_size,
    keystream_throughput,
    masking_against_keystream,
    print_coordinator_memory,
    print_masking,
    with_training,
)
from ctfed.simulations.bench.stock_secagg_bench import bench_stock_secagg
from ctfed.simulations.data.synth import PROFILES, write_scan
from ctfed.simulations.bench.transport_bench import print_transport, run_transport_bench


PARTS = ("ingest", "loader", "secagg", "secagg_vs_stock", "federation", "federation_model_scaling", "transport")
_NEED_LOADER = {"secagg", "secagg_vs_stock"}


def model_sizes() -> list[str]:
    """The encoder presets, conf/model/*.yaml."""
    presets = files("ctfed.conf").joinpath("model").iterdir()
    return sorted(p.name.removesuffix(".yaml") for p in presets if p.name.endswith(".yaml"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small series and the tiny model (a few minutes)")
    parser.add_argument(
        "--smoke", action="store_true",
        help="--quick with smaller federations: fewer scans per site, one site count in the scaling series, one "
        "timed stock SecAgg+ round; checks that every part runs and reports its figures (the test suite's size), "
        "not figures to compare",
    )
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="JSON results (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median is kept)")
    parser.add_argument(
        "--models", nargs="+", choices=model_sizes(), metavar="MODEL",
        help=f"encoder sizes of federation_model_scaling ({', '.join(model_sizes())}; default: tiny, full mode "
        "tiny, small, vit_b)",
    )
    parser.add_argument(
        "--only", nargs="+", choices=PARTS, metavar="PART",
        help=f"run only these parts ({', '.join(PARTS)}); loader comes with the secagg parts, which use its step time",
    )


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _sitk_read(folder: Path) -> Any:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute())


def bench_ingest(work: Path, matrix: int, slices: int, scans: int, repeats: int) -> dict[str, Any]:
    """Read the same uncompressed series with ctfed and with SimpleITK."""
    if importlib.util.find_spec("SimpleITK") is None:
        return {"skipped": "SimpleITK is not installed (pip install 'ctfed[test]')"}
    profile = replace(PROFILES[0], matrix=matrix, slices=slices)  # uncompressed, flat folders
    site_dir = work / "ingest"
    for index in range(scans):
        write_scan(site_dir, profile, site=0, scan=index, seed=0)
    series = scan(site_dir).series
    folder = series[0].files[0].parent
    # Alternated, after one untimed read each (page cache, imports), so a change in other
    # users' load hits both readers alike.
    load_series(series[0])
    _sitk_read(folder)
    ctfed_times, sitk_times = [], []
    for _ in range(repeats):
        ctfed_times.append(_median_seconds(lambda: load_series(series[0]), 1))
        sitk_times.append(_median_seconds(lambda: _sitk_read(folder), 1))
    ctfed_s, sitk_s = statistics.median(ctfed_times), statistics.median(sitk_times)

    cfg = replace(load_run_config().preprocess, output_size=64)
    # Import MONAI's transforms now, or the first timed configuration pays for it.
    import_transforms()
    # 1 and 2 workers alternate, so a change in other users' load hits both alike; a fresh
    # cache folder each time, so every run processes every series.
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(repeats):
        for workers in (1, 2):
            started = time.perf_counter()
            prepare(site_dir, work / f"cache-{workers}w-{repeat}", replace(cfg, workers=workers), progress=False)
            seconds[workers].append(time.perf_counter() - started)
    throughput = {f"series_per_s_{w}_workers": len(series) / statistics.median(t) for w, t in seconds.items()}
    return {
        "series_shape_zyx": [slices, matrix, matrix],
        "series": len(series),
        "cpus": os.cpu_count(),
        # Other users' load on a shared machine caps what a second worker can gain.
        "load_average_1min": round(os.getloadavg()[0], 2),
        "ctfed_load_series_s": ctfed_s,
        "simpleitk_s": sitk_s,
        "ratio_simpleitk_over_ctfed": sitk_s / ctfed_s,
        **throughput,
        "prepare_speedup_2_over_1_workers": throughput["series_per_s_2_workers"] / throughput["series_per_s_1_workers"],
    }


def bench_loader_share(work: Path, model: str, steps: int) -> dict[str, Any]:
    """Fraction of training step time spent in the data loader, at a model size."""
    cfg = load_run_config([f"model={model}", f"train.local_steps={steps}"])
    site_dir = work / "loader-dicom"
    for index in range(4):
        write_scan(site_dir, PROFILES[0], site=0, scan=index, seed=1)
    cache = work / "loader-cache"
    prepare(site_dir, cache, cfg.preprocess, progress=False)
    trainer = LocalTrainer(cfg.model, cfg.train, CachedVolumes(cache), seed=0)
    trainer.train_round(0)  # warm-up: allocator, first-touch of the cache files
    result = trainer.train_round(1)
    return {
        "model": model,
        "steps": steps,
        "step_s": result.seconds / steps,
        "loader_s_per_step": result.data_seconds / steps,
        "loader_share": result.data_seconds / result.seconds,
    }


def bench_secagg(loader: dict[str, Any], sizes: tuple[int, ...], coordinator_memory: bool = False) -> dict[str, Any]:
    """SecAgg+ vs plain aggregation; training time is the measured step of ``loader``'s model.
    Each size's masking stage is set against this machine's ChaCha20 keystream rate; with
    ``coordinator_memory`` the coordinator's peak RSS at the largest size is measured too
    (sites in another process, ``bench_coordinator_memory``)."""
    cfg = load_run_config([f"model={loader['model']}"])
    from ctfed.common.model import ViTEncoder

    measured_params = sum(t.numel() for t in ViTEncoder(cfg.model).state_dict().values())
    measured_round = loader["step_s"] * cfg.train.local_steps
    entries = []
    keystream = keystream_throughput()
    for size in sizes:
        entry = bench_secagg_size(size)
        # Training cost scales about linearly with parameters at a fixed input size.
        entry["train_round_s"] = measured_round * size / measured_params
        entry["ratio_with_training"] = with_training(entry, entry["train_round_s"])
        entry["masking"] = masking_against_keystream(entry, keystream)
        entries.append(entry)
        release_memory()
    note = (
        f"training round = {cfg.train.local_steps} local steps x {loader['step_s']:.2f} s measured on the "
        f"{loader['model']} encoder ({measured_params / 1e6:.1f}M params), scaled linearly to each size"
    )
    memory = bench_coordinator_memory(max(sizes)) if coordinator_memory else None
    return {"sizes": entries, "training_note": note, "coordinator_memory": memory}


def _training_round_s(loader: dict[str, Any], params: int) -> float:
    """A local training round at ``params`` parameters, scaled linearly from ``loader``'s measured step."""
    cfg = load_run_config([f"model={loader['model']}"])
    return loader["step_s"] * cfg.train.local_steps * params / encoder_parameters(loader["model"])


def bench_stock_comparison(loader: dict[str, Any], models: tuple[str, ...], rounds: int) -> list[dict[str, Any]]:
    """Plain vs our SecAgg+ vs stock Flower SecAgg+, at each model's encoder size, 5 sites."""
    entries = []
    for model in models:
        entry = bench_stock_secagg(encoder_parameters(model), sites=5, rounds=rounds)
        entry["model"] = model
        train_s = _training_round_s(loader, entry["params"])
        entry["train_round_s"] = train_s
        entry["ratio_ours_over_plain_with_training"] = (train_s + entry["ours_round_s"]) / (train_s + entry["plain_round_s"])
        entry["ratio_stock_over_plain_with_training"] = (train_s + entry["stock_round_s"]) / (train_s + entry["plain_round_s"])
        entries.append(entry)
    return entries


def print_stock_comparison(entries: list[dict[str, Any]]) -> None:
    for e in entries:
        print(
            f"secagg vs stock Flower, {e['sites']} sites, {e['params'] / 1e6:.2f}M params ({e['model']}), per round "
            f"(Flower simulation, aggregation only): plain {e['plain_round_s']:.2f} s, ours {e['ours_round_s']:.2f} s, "
            f"stock {e['stock_round_s']:.2f} s -> ours/plain {e['ratio_ours_over_plain']:.2f}, "
            f"stock/plain {e['ratio_stock_over_plain']:.2f}, ours/stock {e['ratio_ours_over_stock']:.2f}"
        )
        print(
            f"  with a {e['train_round_s']:.1f} s local training round: ours/plain "
            f"{e['ratio_ours_over_plain_with_training']:.3f}, stock/plain {e['ratio_stock_over_plain_with_training']:.3f} "
            f"(goal <= 1.15); max |mean - plain mean|: ours {e['max_abs_diff_ours_vs_plain']:.1e} "
            f"(bound {e['ours_error_bound']:.1e}), stock {e['max_abs_diff_stock_vs_plain']:.1e} (bound {e['stock_error_bound']:.1e})"
        )


class _PartTimer:
    """Runs each part, keeps its figures under its name in ``results`` and its wall time, for
    the record of what the full mode costs."""

    def __init__(self, results: dict[str, Any]) -> None:
        self.started = time.perf_counter()
        self.results = results
        self.parts: dict[str, float] = {}
        # Called after each part: a full run takes long, and what it measured must survive an interruption.
        self.checkpoint: Callable[[], None] | None = None

    def __call__(self, name: str, fn: Callable[[], Any]) -> None:
        started = time.perf_counter()
        try:
            self.results[name] = fn()
        finally:
            self.parts[name] = time.perf_counter() - started
            if self.checkpoint is not None:
                self.checkpoint()
            release_memory()

    def total(self) -> float:
        return time.perf_counter() - self.started


def release_memory() -> None:
    """Hand freed memory back to the OS. The in-process parts (a ViT-B training step, SecAgg+
    rounds over 86M values) leave gigabytes in glibc's heap after their tensors are gone,
    and the federation parts' site processes need that memory: with it held, Ray killed a
    ViT-B site on a 23 GB machine."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass


def run(args: argparse.Namespace) -> int:
    smoke = args.smoke
    quick = args.quick or smoke
    parts = set(args.only or PARTS)
    if parts & _NEED_LOADER:
        parts.add("loader")
    results: dict[str, Any] = {"mode": "smoke" if smoke else "quick" if quick else "full"}
    timed = _PartTimer(results)

    def save() -> None:
        results["run_seconds"] = {"total": timed.total(), **timed.parts}
        write_json_atomic(args.out, results)

    timed.checkpoint = save
    with tempfile.TemporaryDirectory(prefix="ctfed-bench-") as tmp:
        work = Path(tmp)
        if "ingest" in parts:
            print("ingest: ctfed load_series vs SimpleITK ImageSeriesReader, prepare with 1 and 2 workers ...", flush=True)
            timed("ingest", lambda: bench_ingest(
                work, matrix=128 if quick else 512, slices=32 if quick else 128, scans=8, repeats=args.repeats
            ))
        if "loader" in parts:
            model = "tiny" if quick else "vit_b"
            print(f"loader share of a training step ({model}) ...", flush=True)
            timed("loader", lambda: bench_loader_share(work, model, steps=3 if quick else 2))
    if "secagg" in parts:
        print("secure aggregation: SecAgg+ vs plain rounds, 5 sites ...", flush=True)
        # The coordinator's peak RSS (full mode: 86M values, two more processes for ~4 min).
        timed("secagg", lambda: bench_secagg(
            results["loader"], sizes=(200_000, 1_000_000) if quick else (10_000_000, 86_000_000),
            coordinator_memory=not quick,
        ))
    if "secagg_vs_stock" in parts:
        print("secure aggregation: ours vs stock Flower SecAgg+ vs plain, one Flower simulation per size ...", flush=True)
        # Not ViT-B: its 89M values took over 9 GB in the coordinator and 5 GB per Ray worker
        # (five sites' cached updates, stock FedAvg's float64 copies) on a 23 GB machine.
        timed("secagg_vs_stock", lambda: bench_stock_comparison(
            results["loader"], models=("tiny",) if quick else ("tiny", "small"), rounds=1 if smoke else 2 if quick else 3
        ))
    fed_model, fed_steps = ("tiny", 2) if quick else ("small", 8)
    with tempfile.TemporaryDirectory(prefix="ctfed-bench-fed-") as tmp:
        if "federation" in parts:
            print("federation: overhead, bytes per phase, memory, scaling (real simulations) ...", flush=True)
            timed("federation", lambda: bench_federation(
                Path(tmp), fed_model, site_counts=(2,) if smoke else (2, 4) if quick else (2, 4, 8, 16),
                # Smoke: the fewest scans at which each synthetic site (seed 0) holds 2 of each
                # label, which its fine-tuning train/test split needs.
                local_steps=fed_steps, scans_per_site=(4, 6, 9) if smoke else (16, 8, 16),
            ))
        if "federation_model_scaling" in parts:
            # 2 local steps at every size: 8 ViT-B steps take over 10 minutes per round here. The
            # quick mode reuses the federation part's 2-site run as its one point; a small-model
            # federation would add a minute and a half.
            print("federation: round time, bytes and memory vs model size (real simulations) ...", flush=True)
            sizes = args.models or (("tiny",) if quick else ("tiny", "small", "vit_b"))
            timed("federation_model_scaling", lambda: bench_model_scaling(Path(tmp), sizes, sites=2, local_steps=2))
    if "transport" in parts:
        timed("transport", lambda: run_transport_bench(quick))
    save()
    print_results(results)
    print(f"results: {args.out}")
    return 0


def print_results(results: dict[str, Any]) -> None:
    print()
    ingest = results.get("ingest")
    if ingest and "skipped" in ingest:
        print(f"ingest: skipped ({ingest['skipped']})")
    elif ingest:
        z, y, x = ingest["series_shape_zyx"]
        print(f"ingest of a {z}x{y}x{x} series: ctfed {ingest['ctfed_load_series_s']:.3f} s, "
              f"SimpleITK {ingest['simpleitk_s']:.3f} s -> ratio {ingest['ratio_simpleitk_over_ctfed']:.2f} (goal >= 1.0)")
        print(f"prepare ({ingest['series']} series): {ingest['series_per_s_1_workers']:.2f} series/s with 1 worker, "
              f"{ingest['series_per_s_2_workers']:.2f} with 2 -> ratio 2/1 workers "
              f"{ingest['prepare_speedup_2_over_1_workers']:.2f} ({ingest['cpus']} CPUs, load average "
              f"{ingest['load_average_1min']:g} during the run)")
    if loader := results.get("loader"):
        print(f"loader ({loader['model']}): {loader['loader_s_per_step']:.3f} s of a {loader['step_s']:.3f} s step "
              f"-> share {loader['loader_share']:.1%} (goal < 10%)")
    if secagg := results.get("secagg"):
        for entry in secagg["sizes"]:
            print(f"secagg, 5 sites, {entry['params'] / 1e6:.1f}M params: SecAgg+ {entry['secure_round_s']:.2f} s, "
                  f"plain {entry['plain_round_s']:.2f} s (aggregation only, sites in parallel) -> ratio "
                  f"{entry['ratio_secure_over_plain']:.2f}; with a {entry['train_round_s']:.1f} s local training round "
                  f"-> {entry['ratio_with_training']:.3f} (goal <= 1.15); max |secure - plain| {entry['max_abs_diff_secure_vs_plain']:.1e}")
            print(f"  authentication (signatures, roster checks, model hash) {entry['authentication_per_site_s'] * 1e3:.1f} ms "
                  f"per site; consistency stage {entry['consistency_stage_s'] * 1e3:.1f} ms (slowest site)")
            if "masking" in entry:
                print_masking(entry["masking"])
        if secagg.get("coordinator_memory"):
            print_coordinator_memory(secagg["coordinator_memory"])
        print(f"  ({secagg['training_note']})")
    if "secagg_vs_stock" in results:
        print_stock_comparison(results["secagg_vs_stock"])
    if "federation" in results:
        print_federation(results["federation"])
    if "federation_model_scaling" in results:
        print_model_scaling(results["federation_model_scaling"])
    if "transport" in results:
        print_transport(results["transport"])
    timing = results["run_seconds"]
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timing.items() if name != "total")
    print(f"run time ({results['mode']} mode): {timing['total'] / 60:.1f} min ({parts})")
