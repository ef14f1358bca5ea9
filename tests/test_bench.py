"""`ctfed bench --quick` runs end to end and reports the figures it promises (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

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
