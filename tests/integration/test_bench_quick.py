"""`ctfed bench --smoke` (--quick's sizes with smaller federations) runs end to end and reports
the figures it promises (no timing asserts)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctfed.common.cli import main
from ctfed.simulations.bench.federation_bench import best_schedule_seconds, encoder_parameters


def _positive(*values: float) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


def test_each_part_is_on_record_before_the_next_starts() -> None:
    """A long full run that is interrupted keeps what the finished parts measured."""
    from ctfed.simulations.bench.bench import _PartTimer

    results: dict = {"mode": "full"}
    saved: list[dict] = []
    timed = _PartTimer(results)
    timed.checkpoint = lambda: saved.append(dict(results))
    timed("ingest", lambda: {"ratio": 1.5})
    assert saved == [{"mode": "full", "ingest": {"ratio": 1.5}}]

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        timed("loader", interrupted)
    assert saved[-1] == {"mode": "full", "ingest": {"ratio": 1.5}} and set(timed.parts) == {"ingest", "loader"}


def test_best_schedule_packs_whole_site_trainings() -> None:
    # 3 equal sites on 2 cores: two side by side, then the third (not 1.5 trainings).
    assert best_schedule_seconds([10.0, 10.0, 10.0], 2) == 20.0
    assert best_schedule_seconds([10.0] * 4, 2) == 20.0
    # One long site bounds the round however many cores there are.
    assert best_schedule_seconds([30.0, 5.0, 5.0], 2) == 30.0
    assert best_schedule_seconds([7.0, 3.0], 8) == 7.0
    assert best_schedule_seconds([4.0, 3.0, 2.0, 1.0], 1) == 10.0
    # Longest first gives 6+1 | 5+2 = 7; placing them in the given order would give 2+1+6 | 5 = 9.
    assert best_schedule_seconds([2.0, 5.0, 1.0, 6.0], 2) == 7.0
    with pytest.raises(ValueError):
        best_schedule_seconds([1.0], 0)


def test_quick_bench_writes_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "--repeats", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["mode"] == "smoke"
    ingest, loader = results["ingest"], results["loader"]
    assert ingest["series_shape_zyx"] == [32, 128, 128]
    assert ingest["ratio_simpleitk_over_ctfed"] > 0
    assert ingest["series_per_s_1_workers"] > 0 and ingest["series_per_s_2_workers"] > 0
    assert 0 < loader["loader_share"] < 1
    assert loader["model"] == "tiny"
    secagg = results["secagg"]["sizes"]
    assert [entry["params"] for entry in secagg] == [200_000, 1_000_000]
    for entry in secagg:
        assert entry["secure_round_s"] > 0 and entry["plain_round_s"] > 0 and entry["ratio_with_training"] > 0
        assert entry["max_abs_diff_secure_vs_plain"] < 1e-6
    federation = results["federation"]
    phases = [r["phase"] for r in federation["rounds"]]
    assert phases == ["pretrain", "pretrain", "finetune", "finetune", "finetune"]
    pretrain_bytes = federation["rounds"][0]["bytes_from_site"]
    probe_bytes = federation["rounds"][2]["bytes_from_site"]
    assert 0 < probe_bytes < pretrain_bytes  # only the head travels in the probe round
    assert all(r["overhead_ratio"] and r["overhead_ratio"] > 0 for r in federation["rounds"])
    assert all(r["peak_rss_mb"] > 50 for r in federation["rounds"])
    assert [s["sites"] for s in federation["scaling"]] == [2]  # smoke: one site count (quick: 2 and 4)
    assert all(s["round_s"] > 0 and s["overhead_ratio"] > 0 and s["peak_rss_mb"] > 50 for s in federation["scaling"])
    assert all(r["best_schedule_s"] <= r["site_train_s_sum"] for r in federation["rounds"])
    transport = {row["variant"]: row for row in results["transport"]["variants"]}
    assert list(transport) == ["float32", "float16", "secagg-32bit"]
    fp32, fp16 = transport["float32"]["bytes_from_site"], transport["float16"]["bytes_from_site"]
    assert set(fp32) == {"pretrain", "finetune-probe"}
    assert 0.45 < fp16["pretrain"] / fp32["pretrain"] < 0.55  # measured from the received messages
    assert 0 < transport["float16"]["relative_error_vs_float32"] < 1e-2
    assert 0 < transport["secagg-32bit"]["relative_error_vs_float32"] < 1e-2
    assert all(row["aggregated_rounds"] == row["rounds"] == 3 for row in transport.values())

    # Ours vs stock Flower SecAgg+ vs plain, in one Flower simulation at the tiny encoder's size.
    [stock] = results["secagg_vs_stock"]
    assert stock["model"] == "tiny" and stock["params"] == encoder_parameters("tiny") and stock["sites"] == 5
    assert _positive(stock["plain_round_s"], stock["ours_round_s"], stock["stock_round_s"])
    assert stock["ratio_ours_over_plain"] == pytest.approx(stock["ours_round_s"] / stock["plain_round_s"])
    assert stock["ratio_stock_over_plain"] == pytest.approx(stock["stock_round_s"] / stock["plain_round_s"])
    assert stock["ratio_ours_over_stock"] == pytest.approx(stock["ours_round_s"] / stock["stock_round_s"])
    assert all(len(times) == stock["rounds"] for times in stock["rounds_s"].values())
    assert 1 <= stock["ratio_ours_over_plain_with_training"] < stock["ratio_ours_over_plain"]
    assert stock["max_abs_diff_ours_vs_plain"] < stock["ours_error_bound"]
    assert stock["max_abs_diff_stock_vs_plain"] < stock["stock_error_bound"]

    # Round time, bytes and memory against the model size (quick: the tiny point, reused from
    # the 2-site run of the site-count series).
    [tiny] = results["federation_model_scaling"]
    assert tiny["model"] == "tiny" and tiny["params"] == encoder_parameters("tiny") and tiny["sites"] == 2
    assert _positive(tiny["round_s"], tiny["site_train_s"], tiny["bytes_from_site"], tiny["bytes_to_site"])
    assert tiny["round_s"] == pytest.approx(federation["scaling"][0]["round_s"])
    assert tiny["peak_rss_mb"] > 50
    # A secure-aggregation upload is 8 bytes per value (64-bit masks) plus protocol messages.
    assert 8 * tiny["params"] <= tiny["bytes_from_site"] < 9 * tiny["params"]

    run_seconds = results["run_seconds"]
    parts = {"ingest", "loader", "secagg", "secagg_vs_stock", "federation", "federation_model_scaling", "transport"}
    assert set(run_seconds) == parts | {"total"}
    assert _positive(*run_seconds.values())
    assert sum(run_seconds[p] for p in parts) <= run_seconds["total"]


def test_model_scaling_keeps_the_sizes_that_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A federation that fails at one model size (ViT-B out of memory) leaves a row with the reason."""
    from ctfed.simulations.bench import federation_bench

    site = {"train_seconds": 2.0, "bytes_received": 1000, "bytes_sent": 500, "peak_rss_mb": 300.0}
    record = {"round": 2, "seconds": 3.0, "sites": [site, site]}

    def simulate(work: Path, name: str, overrides: list[str]) -> dict:
        if "model=vit_b" in overrides:
            raise RuntimeError(f"benchmark federation {name} failed (code 1)")
        return {"rounds": [{**record, "round": 1, "seconds": 30.0}, record]}

    monkeypatch.setattr(federation_bench, "_simulate", simulate)
    tiny, vit_b = federation_bench.bench_model_scaling(tmp_path, ("tiny", "vit_b"), sites=2, local_steps=2)
    assert tiny["round_s"] == 3.0 and tiny["site_train_s"] == 2.0 and tiny["bytes_from_site"] == 1000
    assert "error" not in tiny
    assert vit_b["model"] == "vit_b" and "failed" in vit_b["error"] and vit_b["params"] > 80_000_000
    federation_bench.print_model_scaling([tiny, vit_b])


def test_bench_only_ingest_prints_the_worker_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--only", "ingest", "--repeats", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"mode", "ingest", "run_seconds"}
    assert results["ingest"]["series"] == 8 and results["ingest"]["cpus"] >= 1
    printed = capsys.readouterr().out
    assert "series/s with 1 worker" in printed and "ratio 2/1 workers" in printed
    assert "loader" not in printed


def test_model_scaling_retries_one_site_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A size that Ray cannot fit with sites side by side is retried with one site at a time."""
    from ctfed.simulations.bench import federation_bench

    monkeypatch.setattr(federation_bench.os, "cpu_count", lambda: 2)
    calls: list[list[str]] = []

    def fake_simulate(work: Path, name: str, overrides: list[str]) -> dict:
        calls.append(overrides)
        if "simulation.client_cpus=1" in overrides:
            raise RuntimeError("a site's worker was killed (out of memory)")
        site = {"train_seconds": 10.0, "bytes_received": 800, "bytes_sent": 400, "peak_rss_mb": 900.0}
        return {"rounds": [{"round": r, "seconds": 21.0, "sites": [site, site]} for r in (1, 2)]}

    monkeypatch.setattr(federation_bench, "_simulate", fake_simulate)
    [row] = federation_bench.bench_model_scaling(tmp_path, ["tiny"], sites=2, local_steps=2)
    assert [o[-1] for o in calls] == ["simulation.client_cpus=1", "simulation.client_cpus=2"]
    assert row["sites_in_parallel"] == 1
    assert "2 site(s) at once" in row["failed_attempts"][0] and "out of memory" in row["failed_attempts"][0]
    assert row["round_s"] == 21.0 and row["peak_rss_mb"] == 900.0

    # Both attempts failing keeps an error row instead of ending the benchmark.
    def always_killed(work: Path, name: str, overrides: list[str]) -> dict:
        raise RuntimeError("killed")

    monkeypatch.setattr(federation_bench, "_simulate", always_killed)
    [failed] = federation_bench.bench_model_scaling(tmp_path / "again", ["small"], sites=2, local_steps=2)
    assert failed["model"] == "small" and failed["error"].count("killed") == 2


_HEAP_SCENARIO = """
import ctypes, sys
from ctfed.simulations.bench.bench import release_memory

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

# 64 KiB blocks come from the heap (below glibc's mmap threshold); the last one stays in use,
# so freeing the others cannot shrink the heap from its top.
blocks = [libc.malloc(64 * 1024) for _ in range(4000)]
for block in blocks:
    ctypes.memset(block, 1, 64 * 1024)
for block in blocks[:-1]:
    libc.free(block)
held = rss_mb()
release_memory()
print(held, rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_memory_returns_freed_heap_to_the_os() -> None:
    """What one bench part freed must not stay in this process for the next part's site processes."""
    done = subprocess.run([sys.executable, "-c", _HEAP_SCENARIO], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    held, after = map(float, done.stdout.split())
    assert held - after > 150  # of the ~250 MB freed but held by the heap


def test_a_failed_federation_says_why_without_its_temporary_log(tmp_path: Path) -> None:
    from ctfed.simulations.bench.federation_bench import failure_reason

    log = tmp_path / "federation.log"
    log.write_text(
        "17:19:10 ERROR ctfed.server.rounds: round 1: not aggregated (site_1 failed)\n"
        "ray.exceptions.OutOfMemoryError: 1 worker(s) were killed due to the node running low on memory. "
        "Memory on the node (IP: 192.0.2.2, ID: ab12) was 22.42GB / 23.54GB (0.952313), which exceeds the memory "
        "usage threshold of 0.950000; Top 10 memory users: PID\tMEM(GB)\tCOMMAND, 15544\t6.16\tray::ClientAppActor, "
        "4954\t5.77\t/x/.venv/bin/python .venv/bin/ctfed bench --out b.json, 15180\t5.75\t/x/.venv/bin/python "
        "/x/.venv/bin/flwr-simulation --runtime-api-address 1..., 16551\t0.18\t/x/python pytest, Refer to the docs\n"
    )
    assert failure_reason(log) == (
        "Ray killed a site process: the machine's memory reached 22.42GB / 23.54GB; largest processes: "
        "ray::ClientAppActor 6.16 GB, ctfed bench 5.77 GB, flwr-simulation 5.75 GB"
    )
    log.write_text("17:19:10 ERROR ctfed.server.rounds: round 1: not aggregated (site_1 failed)\n")
    assert failure_reason(log) == "round 1: not aggregated (site_1 failed)"
    assert "no log" in failure_reason(tmp_path / "missing.log")


def test_model_sizes_are_the_model_presets(capsys: pytest.CaptureFixture[str]) -> None:
    from ctfed.simulations.bench.bench import model_sizes

    assert {"tiny", "small", "vit_b"} <= set(model_sizes())
    with pytest.raises(SystemExit):
        main(["bench", "--only", "federation_model_scaling", "--models", "vit_huge"])
    assert "invalid choice: 'vit_huge'" in capsys.readouterr().err


def test_views_bench_times_the_former_and_current_views() -> None:
    """`python -m ctfed.simulations.bench.views_bench`'s figure at a tiny size; the former path (kept
    there for the ratio only) still makes valid views."""
    from ctfed.simulations.bench.views_bench import FormerMultiCrop3D, views_ms_per_volume

    row = views_ms_per_volume(size=8, voxel_mm=6.0, volumes=1, blocks=1)
    assert _positive(row["former_ms"], row["current_ms"], row["speedup"])
    former = FormerMultiCrop3D([0.5, 1.0], [0.2, 0.5], 2, 8, seed=1, voxel_mm=(6.0, 6.0, 6.0))(torch.rand(3, 8, 8, 8))
    assert len(former) == 4 and all(v.shape == (3, 8, 8, 8) and 0.0 <= float(v.min()) <= float(v.max()) <= 1.0 for v in former)
