"""The label-efficiency study's targets read the verdicts as issue #11 states them."""

from __future__ import annotations

from typing import Any

from ctfed.simulations.studies.label_efficiency import targets

CONFIG = {
    "judged_labels_per_site": 8, "heads": ["site"], "target_gain_over_scratch": 0.05, "min_tasks_beating_scratch": 3,
    "max_gap_to_centralized": 0.02, "max_dp_cost": 0.05,
}


def _against_scratch(task: str, value: float, low: float, level: int = 8) -> dict[str, Any]:
    return {"key": "pretrained_vs_scratch", "task": task, "labels_per_site": level, "heads": "site",
            "met": value > 0.05, "ci_clears_target": low > 0.05, "difference": {"value": value, "low": low, "high": value + 0.1}}


def _beats_scratch(verdicts: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    rows = targets({"config": CONFIG, "verdicts": verdicts, "arms": {}}, structural=[])
    issue, strict = (r for r in rows if "beats scratch" in r["target"] or "(stricter)" in r["target"])
    return issue, strict


def test_a_gain_of_005_whose_ci_excludes_zero_counts_for_the_issue_target() -> None:
    verdicts = [
        _against_scratch("a", 0.08, 0.01),  # >= 0.05, CI above 0: counts
        _against_scratch("b", 0.12, 0.06),  # CI above 0.05 too: counts for both
        _against_scratch("c", 0.07, 0.002),
        _against_scratch("d", 0.09, -0.01),  # CI reaches 0: does not count
        _against_scratch("e", 0.04, 0.01),  # below the gain: does not count
        _against_scratch("f", 0.30, 0.20, level=4),  # another level: not judged
    ]
    issue, strict = _beats_scratch(verdicts)
    assert issue["met"] and issue["detail"] == "3 of 5 tasks: a, b, c"
    assert not strict["met"] and strict["detail"] == "1 of 5 tasks: b"
    issue, _ = _beats_scratch(verdicts[1:])
    assert not issue["met"] and issue["detail"].startswith("2 of 4")
