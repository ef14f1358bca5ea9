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


# Bins the reported range ends are rounded outward to (min down, max up) when a site's
# policy asks for coarsened ranges: a slice count to a multiple of 10, a spacing to 0.1 mm.
SLICES_BIN = 10
SPACING_BIN_MM = 0.1


def _coarse_range(values: list[float], min_count: int, step: float) -> tuple[float, float]:
    """The range's ends with at least ``min_count`` values at or beyond each (its
    ``min_count``-th smallest and largest), rounded outward to multiples of ``step``; the
    exact min and max when ``min_count`` is 0."""
    if min_count <= 0:
        return min(values), max(values)
    ordered = sorted(values)
    # With fewer than 2k - 1 values the k-th smallest lies above the k-th largest: then the
    # two swap, and the range is the middle of the data.
    low, high = sorted((ordered[min_count - 1], ordered[-min_count]))
    return math.floor(low / step + 1e-9) * step, math.ceil(high / step - 1e-9) * step


def site_data_metrics(volumes: CachedVolumes, min_count: int = 0) -> dict[str, int | float | list[float]]:
    """Scans, slice-count and spacing ranges (z, y, x), labelled scans and positives per label column.

    ``min_count`` (a site's ``policy.min_reported_count`` for what leaves it; 0 for the site's
    own card): each end of a range is then the ``min_count``-th smallest / largest scan's value
    rounded outward (``SLICES_BIN``, ``SPACING_BIN_MM``), so no end is one scan's value, and a
    site of fewer scans sends no range at all. Counts are left to the caller's small-cell rule."""
    entries = volumes.entries
    slices = [int(e["slice_count"]) for e in entries if "slice_count" in e]
    spacings = [[float(s) for s in e["spacing_zyx_mm"]] for e in entries if len(e.get("spacing_zyx_mm", [])) == 3]
    metrics: dict[str, int | float | list[float]] = {SCANS_KEY: len(entries)}
    if slices and len(slices) >= min_count:
        low, high = _coarse_range([float(v) for v in slices], min_count, SLICES_BIN)
        metrics[SLICES_KEYS[0]], metrics[SLICES_KEYS[1]] = int(low), int(high)
    if spacings and len(spacings) >= min_count:
        ranges = [_coarse_range(list(axis), min_count, SPACING_BIN_MM) for axis in zip(*spacings)]
        exact = min_count <= 0
        metrics[SPACING_KEYS[0]] = [low if exact else round(low, 4) for low, _ in ranges]
        metrics[SPACING_KEYS[1]] = [high if exact else round(high, 4) for _, high in ranges]
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
