"""`ctfed bench --quick` runs end to end and reports the figures it promises (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctfed.common.cli import main


def test_quick_bench_writes_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--repeats", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
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
    assert [s["sites"] for s in federation["scaling"]] == [2, 4]
    assert all(s["round_s"] > 0 for s in federation["scaling"])
    transport = {row["variant"]: row for row in results["transport"]["variants"]}
    assert list(transport) == ["float32", "float16", "secagg-32bit"]
    fp32, fp16 = transport["float32"]["bytes_from_site"], transport["float16"]["bytes_from_site"]
    assert set(fp32) == {"pretrain", "finetune-probe"}
    assert 0.45 < fp16["pretrain"] / fp32["pretrain"] < 0.55  # measured from the received messages
    assert 0 < transport["float16"]["relative_error_vs_float32"] < 1e-2
    assert 0 < transport["secagg-32bit"]["relative_error_vs_float32"] < 1e-2
    assert all(row["aggregated_rounds"] == row["rounds"] == 3 for row in transport.values())


def test_bench_only_ingest_prints_the_worker_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--only", "ingest", "--repeats", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"mode", "ingest"}
    assert results["ingest"]["series"] == 8 and results["ingest"]["cpus"] >= 1
    printed = capsys.readouterr().out
    assert "series/s with 1 worker" in printed and "ratio 2/1 workers" in printed
    assert "loader" not in printed
