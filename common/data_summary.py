"""The data summary of a model card: aggregate numbers about the scans, never an identifier.

A site summarises its cache as flat numeric metrics (``site_data_metrics``: they travel in a
round's Flower metrics, in clear, beside the loss); a card combines them per site
(``card_data_summary``). Only counts, ranges of slice counts and voxel spacing, label
prevalence and the preprocessing plan appear: no series key, UID, name or path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ctfed.common.preprocess import CachedVolumes

# Not "data-": the round metrics already carry "data-seconds" (loader time).
DATA_PREFIX = "data-summary-"
SCANS_KEY = DATA_PREFIX + "scans"
LABELLED_KEY = DATA_PREFIX + "labelled"
POSITIVE_PREFIX = DATA_PREFIX + "positive-"
SLICES_KEYS = (DATA_PREFIX + "slices-min", DATA_PREFIX + "slices-max")
SPACING_KEYS = (DATA_PREFIX + "spacing-min-mm", DATA_PREFIX + "spacing-max-mm")


def site_data_metrics(volumes: CachedVolumes) -> dict[str, int | float | list[float]]:
    """Scans, slice-count and spacing ranges (z, y, x), labelled scans and positives per label column."""
    entries = volumes.entries
    slices = [int(e["slice_count"]) for e in entries if "slice_count" in e]
    spacings = [[float(s) for s in e["spacing_zyx_mm"]] for e in entries if len(e.get("spacing_zyx_mm", [])) == 3]
    metrics: dict[str, int | float | list[float]] = {SCANS_KEY: len(entries)}
    if slices:
        metrics[SLICES_KEYS[0]], metrics[SLICES_KEYS[1]] = min(slices), max(slices)
    if spacings:
        metrics[SPACING_KEYS[0]] = [min(axis) for axis in zip(*spacings)]
        metrics[SPACING_KEYS[1]] = [max(axis) for axis in zip(*spacings)]
    labelled = [label for label in volumes.labels if label]
    metrics[LABELLED_KEY] = len(labelled)
    for name in sorted({name for label in labelled for name in label}):
        values = [label[name] for label in labelled if isinstance(label.get(name), (int, float))]
        metrics[POSITIVE_PREFIX + name] = sum(1 for v in values if v > 0)
    return metrics


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def data_metrics_from(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The data summary keys of a site's reply, numbers and 3-vectors only (anything else dropped)."""
    kept: dict[str, Any] = {}
    for key, value in metrics.items():
        if not key.startswith(DATA_PREFIX):
            continue
        if _finite(value):
            kept[key] = value
        elif isinstance(value, list) and len(value) == 3 and all(_finite(v) for v in value):
            kept[key] = [float(v) for v in value]
    return kept


def card_data_summary(per_site: Mapping[str, Mapping[str, Any]], preprocessing: Mapping[str, Any]) -> dict[str, Any]:
    """Sites, scans per site and in all, slice and spacing ranges, label prevalence, preprocessing."""
    sites = {site: m for site, m in per_site.items() if SCANS_KEY in m}
    summary: dict[str, Any] = {
        "sites": len(sites),
        "scans_per_site": {site: int(m[SCANS_KEY]) for site, m in sorted(sites.items())},
        "scans": int(sum(m[SCANS_KEY] for m in sites.values())),
    }
    lows = [m[SLICES_KEYS[0]] for m in sites.values() if SLICES_KEYS[0] in m]
    highs = [m[SLICES_KEYS[1]] for m in sites.values() if SLICES_KEYS[1] in m]
    if lows and highs:
        summary["slices"] = {"min": int(min(lows)), "max": int(max(highs))}
    low_spacing = [m[SPACING_KEYS[0]] for m in sites.values() if SPACING_KEYS[0] in m]
    high_spacing = [m[SPACING_KEYS[1]] for m in sites.values() if SPACING_KEYS[1] in m]
    if low_spacing and high_spacing:
        summary["spacing_zyx_mm"] = {
            "min": [round(min(axis), 4) for axis in zip(*low_spacing)],
            "max": [round(max(axis), 4) for axis in zip(*high_spacing)],
        }
    labelled = sum(int(m.get(LABELLED_KEY, 0)) for m in sites.values())
    if labelled:
        names = sorted({k[len(POSITIVE_PREFIX):] for m in sites.values() for k in m if k.startswith(POSITIVE_PREFIX)})
        summary["labels"] = {"labelled_scans": labelled}
        for name in names:
            positive = sum(int(m.get(POSITIVE_PREFIX + name, 0)) for m in sites.values())
            summary["labels"][name] = {"positive": positive, "prevalence": round(positive / labelled, 4)}
    summary["preprocessing"] = dict(preprocessing)
    return summary
