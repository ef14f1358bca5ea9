"""Simulated sites cut from one pooled prepared cache (``split.*``, ``ctfed simulate``).

The pool is one cache (``ctfed prepare`` on a whole archive) or a folder of caches, whose
entries then carry their origin site. Each simulated site gets a *manifest view* under
``<run>/split/<site>/manifest.json``: the pool's own entries, unchanged but for ``file``
(made relative to the pool), plus ``volumes_dir`` naming the pool, which
``CachedVolumes`` reads them from. Volumes are referenced, never copied, and no field is
added that the pool did not already hold (keys stay the pool's pseudonyms).

Methods (``SplitMethod``):

* ``iid``: a seeded shuffle cut into near-equal parts;
* ``dirichlet``: the label-skew partition of Hsu et al. 2019 ("Measuring the effects of
  non-identical data distribution"): for every class, the sites' shares of its scans are
  drawn from Dir(alpha); a draw that leaves a site with fewer than ``min_scans`` is redrawn
  (``max_draws`` times, then a ConfigError says what to change);
* ``by_site``: the natural split, one simulated site per origin site.

``label_skew`` measures the result: the mean total-variation distance between each site's
label distribution and the pool's (0: every site looks like the pool).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ctfed.common.config import SITE_ID_RULE, ConfigError
from ctfed.simulations.config import SplitConfig, SplitMethod
from ctfed.common.fileio import write_json_atomic, write_text_atomic
from ctfed.common.preprocess import FORMAT, MANIFEST, SPLIT_DIR, SPLIT_SUMMARY, VOLUMES_DIR_FIELD, volume_path

logger = logging.getLogger(__name__)

SPLIT_REPORT = "split.md"
# The class of entries whose manifest label lacks the split's column.
NO_LABEL = "(none)"
# A pool entry may name the site it came from (pooled by hand); a folder of caches implies it.
ORIGIN_FIELD = "site"


@dataclass
class Pool:
    """The usable entries of a pooled cache, with ``file`` relative to ``root``."""

    root: Path
    preprocessing: dict[str, Any]
    entries: list[dict[str, Any]]
    origins: list[str | None]
    skipped: list[dict[str, str]] = field(default_factory=list)


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"split.pooled_cache: cannot read {path} ({type(err).__name__})") from None
    if data.get("format") != FORMAT or not isinstance(data.get("series"), list):
        raise ConfigError(f"split.pooled_cache: {path} is not a ctfed cache manifest (format {FORMAT})")
    return data


def read_pool(pool_dir: Path) -> Pool:
    """One cache or a folder of caches with one preprocessing plan; entries whose volume is
    missing or that repeat a scan already pooled (same content hash) are skipped and logged."""
    root = pool_dir.resolve()
    if (root / MANIFEST).is_file():
        caches = [(root, None)]
    else:
        caches = [(p.parent, p.parent.name) for p in sorted(root.glob(f"*/{MANIFEST}"))]
    if not caches:
        raise ConfigError(
            f"split.pooled_cache {pool_dir} holds no prepared cache ({MANIFEST}, or */{MANIFEST}); "
            "run `ctfed prepare` first"
        )
    pool = Pool(root=root, preprocessing={}, entries=[], origins=[])
    seen: set[str] = set()
    for cache_dir, folder_origin in caches:
        data = _read_manifest(cache_dir / MANIFEST)
        plan = data.get("preprocessing", {})
        if not pool.entries and not pool.preprocessing:
            pool.preprocessing = plan
        elif plan != pool.preprocessing:
            raise ConfigError(
                f"split.pooled_cache: {cache_dir.name} was prepared with other preprocessing settings than the "
                "caches before it; pool only caches prepared alike"
            )
        for entry in data["series"]:
            key = str(entry.get("key", "?"))
            path = volume_path(cache_dir, entry, cache_dir / MANIFEST)
            if not path.is_file():
                pool.skipped.append({"ref": key, "reason": "volume file missing from the pooled cache"})
                logger.warning("split: skipped %s: its volume file is missing", key)
                continue
            digest = str(entry.get("content_hash", key))
            if digest in seen:
                pool.skipped.append({"ref": key, "reason": "same scan already pooled from another cache"})
                logger.warning("split: skipped %s: the same scan is already in the pool", key)
                continue
            seen.add(digest)
            pool.entries.append({**entry, "file": path.relative_to(root).as_posix()})
            origin = folder_origin if folder_origin is not None else entry.get(ORIGIN_FIELD)
            pool.origins.append(None if origin is None else str(origin))
    if not pool.entries:
        raise ConfigError(f"split.pooled_cache {pool_dir}: no usable scans (see the warnings above)")
    return pool


def label_of(entry: dict[str, Any], column: str) -> str:
    """An entry's class for the split: its label column's value as text (NO_LABEL if absent)."""
    value = (entry.get("label") or {}).get(column)
    return NO_LABEL if value is None else str(value)


def partition(
    labels: Sequence[str], cfg: SplitConfig, origins: Sequence[str | None] | None = None
) -> dict[str, list[int]]:
    """Site name -> sorted entry indices; disjoint, covering every index, a function of the seed."""
    count = len(labels)
    rng = np.random.default_rng(cfg.seed)
    if cfg.method is SplitMethod.by_site:
        return _by_site(origins, cfg)
    if count < cfg.sites * cfg.min_scans:
        raise ConfigError(
            f"split: {count} scans cannot give {cfg.sites} sites {cfg.min_scans} each; "
            "lower split.sites or split.min_scans"
        )
    names = _site_names(cfg.sites)
    if cfg.method is SplitMethod.iid:
        parts = np.array_split(rng.permutation(count), cfg.sites)
        return {name: sorted(int(i) for i in part) for name, part in zip(names, parts)}
    classes = sorted(set(labels))
    by_class = {c: np.array([i for i, label in enumerate(labels) if label == c]) for c in classes}
    smallest = 0
    for _ in range(cfg.max_draws):
        parts: list[list[int]] = [[] for _ in names]
        for c in classes:
            members = rng.permutation(by_class[c])
            shares = rng.dirichlet(np.full(cfg.sites, cfg.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for site, chunk in enumerate(np.split(members, cuts)):
                parts[site].extend(int(i) for i in chunk)
        smallest = min(len(p) for p in parts)
        if smallest >= cfg.min_scans:
            return {name: sorted(part) for name, part in zip(names, parts)}
    raise ConfigError(
        f"split: {cfg.max_draws} Dirichlet draws (alpha={cfg.alpha}, {cfg.sites} sites, {count} scans) all left a "
        f"site with fewer than split.min_scans={cfg.min_scans} scans (last draw: {smallest}); raise split.alpha, "
        "lower split.sites or split.min_scans, or pool more scans"
    )


def _site_names(sites: int) -> list[str]:
    # Zero-padded so the folders sort in site order (site_02 before site_10).
    width = len(str(sites - 1))
    return [f"site_{i:0{width}d}" for i in range(sites)]


def _by_site(origins: Sequence[str | None] | None, cfg: SplitConfig) -> dict[str, list[int]]:
    if not origins or any(o is None for o in origins):
        raise ConfigError(
            "split.method=by_site needs the origin site of every pooled scan: pool a folder of site caches "
            f"(<dir>/<site>/{MANIFEST}) or give every manifest entry a '{ORIGIN_FIELD}' field"
        )
    parts: dict[str, list[int]] = {}
    for index, origin in enumerate(origins):
        parts.setdefault(str(origin), []).append(index)
    bad = [name for name in parts if not SITE_ID_RULE.match(name)]
    if bad:
        raise ConfigError(f"split.method=by_site: origin sites {bad} cannot be site ids (letters, digits, '.', '_', '-')")
    if cfg.sites and cfg.sites != len(parts):
        raise ConfigError(
            f"split.method=by_site: the pool holds {len(parts)} origin sites, but split.sites={cfg.sites} "
            "(set split.sites=0 to take them all)"
        )
    small = sorted(name for name, members in parts.items() if len(members) < cfg.min_scans)
    if small:
        raise ConfigError(f"split.method=by_site: sites {small} have fewer than split.min_scans={cfg.min_scans} scans")
    return dict(sorted(parts.items()))


def label_counts(parts: dict[str, list[int]], labels: Sequence[str]) -> dict[str, dict[str, int]]:
    """Site -> class -> scans, every class listed at every site (zeros included)."""
    classes = sorted(set(labels))
    return {site: {c: sum(1 for i in members if labels[i] == c) for c in classes} for site, members in parts.items()}


def label_skew(parts: dict[str, list[int]], labels: Sequence[str]) -> float:
    """Mean over sites of the total-variation distance between the site's label distribution
    and the pool's: 0 for identical proportions, towards 1 when sites hold disjoint classes."""
    classes = sorted(set(labels))
    pooled = np.array([sum(1 for label in labels if label == c) for c in classes], dtype=float)
    pooled /= pooled.sum()
    distances = []
    for members in parts.values():
        site = np.array([sum(1 for i in members if labels[i] == c) for c in classes], dtype=float)
        if site.sum():
            distances.append(0.5 * float(np.abs(site / site.sum() - pooled).sum()))
    return float(np.mean(distances)) if distances else 0.0


def split_pool(cfg: SplitConfig, run_dir: Path) -> Path:
    """Write one manifest view per simulated site, ``split.json`` and ``split.md`` under
    ``run_dir/split``; returns that folder (the simulation's data dir)."""
    pool = read_pool(Path(cfg.pooled_cache).expanduser())
    labels = [label_of(entry, cfg.label) for entry in pool.entries]
    parts = partition(labels, cfg, pool.origins)
    out = run_dir / SPLIT_DIR
    if out.exists():
        # Views of an earlier attempt in this run folder (no results yet): a stale site
        # folder would otherwise become one more simulated site.
        shutil.rmtree(out)
    for site, members in parts.items():
        (out / site).mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / site / MANIFEST, {
            "format": FORMAT,
            "preprocessing": pool.preprocessing,
            VOLUMES_DIR_FIELD: str(pool.root),
            "series": [pool.entries[i] for i in members],
            "rejected": [],
        })
    summary = {
        "pooled_cache": str(pool.root),
        "method": cfg.method.value,
        "seed": cfg.seed,
        "label": cfg.label,
        **({"alpha": cfg.alpha} if cfg.method is SplitMethod.dirichlet else {}),
        "scans": len(pool.entries),
        "label_skew": round(label_skew(parts, labels), 4),
        "sites": [
            {"site": site, "scans": len(members), "labels": counts}
            for (site, members), counts in zip(parts.items(), label_counts(parts, labels).values())
        ],
        "skipped": pool.skipped,
    }
    write_json_atomic(out / SPLIT_SUMMARY, summary)
    write_text_atomic(out / SPLIT_REPORT, "\n".join(split_markdown(summary)) + "\n")
    return out


def split_markdown(summary: dict[str, Any]) -> list[str]:
    """The split as report lines: settings, then scans per site per label."""
    classes = sorted({c for site in summary["sites"] for c in site["labels"]})
    column = summary["label"]
    settings = f"method `{summary['method']}`, seed {summary['seed']}"
    if "alpha" in summary:
        settings += f", alpha {summary['alpha']:g}"
    lines = [
        "## Data split",
        "",
        f"{summary['scans']} scans of the pooled cache `{summary['pooled_cache']}` split into "
        f"{len(summary['sites'])} sites ({settings}); label `{summary['label']}`; label skew "
        f"{summary['label_skew']:.3f} (mean total-variation distance of a site's label mix from the pool's; 0: iid).",
        "",
        "| site | scans | " + " | ".join(f"{column}={c}" for c in classes) + " |",
        "|---|---|" + "---|" * len(classes),
    ]
    for site in summary["sites"]:
        lines.append(f"| {site['site']} | {site['scans']} | " + " | ".join(str(site["labels"].get(c, 0)) for c in classes) + " |")
    if summary.get("skipped"):
        lines += ["", f"Skipped {len(summary['skipped'])} pooled entries: " + "; ".join(
            f"{s['ref']} ({s['reason']})" for s in summary["skipped"]
        )]
    lines.append("")
    return lines
