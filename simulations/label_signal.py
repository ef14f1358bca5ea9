"""How much label signal do prepared synthetic scans carry? A probe on simple features.

Writes a fresh tuning set of synthetic hospitals (use a seed the compared run does not use),
prepares it with the simulation's preprocessing at ``--size``^3, and reports the 5-fold
cross-validated AUROC of a logistic-regression probe on two model-free features: the raw
voxels of all windows, and each window's intensity histogram. If such a probe is near 0.5,
no encoder comparison on that data can mean much. One run per ``--finding-scale`` value::

    python -m ctfed.simulations.label_signal --seed 1 --finding-scale 1 3 --out /tmp/signal
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ctfed.common.config import PreprocessConfig, SynthConfig
from ctfed.common.preprocess import CachedVolumes, prepare
from ctfed.simulations.synth import synthesize_federation

HISTOGRAM_BINS = 32


def window_histograms(volume: np.ndarray) -> np.ndarray:
    """Per-channel histogram over the open interval (0, 1): voxels clipped at a window's ends
    (air, bone in the brain window) would swamp the bins that hold soft tissue and blood."""
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    rows = []
    for channel in volume:
        inside = channel[(channel > 0.0) & (channel < 1.0)]
        rows.append(np.histogram(inside, bins=edges)[0] / channel.size)
    return np.concatenate(rows)


def probe_auroc(features: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """Out-of-fold AUROC of a standardised, L2-regularised logistic regression (5 folds)."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    scores = cross_val_predict(probe, features, labels, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, scores))


def measure(out: Path, synth: SynthConfig, size: int, label: str) -> dict[str, float]:
    """Synthesize, prepare at ``size``^3 and probe; returns the probe AUROCs and counts."""
    site_dirs = synthesize_federation(
        out / "dicom", synth.sites, synth.scan_counts, synth.seed, finding_scale=synth.finding_scale
    )
    volumes, labels = [], []
    for site_dir in site_dirs:
        cache = out / "cache" / site_dir.name
        prepare(site_dir, cache, PreprocessConfig(output_size=size), labels_csv=site_dir / "labels.csv", progress=False)
        dataset = CachedVolumes(cache)
        for index, entry_label in enumerate(dataset.labels):
            if entry_label is None or label not in entry_label:
                logging.warning("%s: a cached series has no '%s' label; skipped", site_dir.name, label)
                continue
            volumes.append(dataset[index].numpy())
            labels.append(int(entry_label[label]))
    y = np.asarray(labels)
    if min(np.bincount(y, minlength=2)) < 5:
        raise ValueError(f"need >= 5 scans of each class for 5 folds, got {np.bincount(y, minlength=2).tolist()}")
    raw = np.stack([v.ravel() for v in volumes])
    hist = np.stack([window_histograms(v) for v in volumes])
    return {
        "scans": float(len(y)),
        "positives": float(y.sum()),
        "raw_voxels": probe_auroc(raw, y, synth.seed),
        "window_histograms": probe_auroc(hist, y, synth.seed),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (one subfolder per scale)")
    parser.add_argument("--seed", type=int, default=1, help="synth seed of the tuning set (default %(default)s)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--scans-per-site", type=int, default=24)
    parser.add_argument("--size", type=int, default=32, help="prepared volume size (default %(default)s)")
    parser.add_argument("--label", default="any")
    parser.add_argument("--finding-scale", type=float, nargs="+", default=[1.0])
    args = parser.parse_args(argv)
    logging.getLogger("openjpeg").setLevel(logging.WARNING)
    print(f"tuning set: seed {args.seed}, {args.sites} sites x {args.scans_per_site} scans, {args.size}^3, label '{args.label}'")
    print("| finding_scale | positives / scans | raw voxels AUROC | window histograms AUROC |")
    print("|---|---|---|---|")
    for scale in args.finding_scale:
        synth = SynthConfig(sites=args.sites, scans_per_site=args.scans_per_site, seed=args.seed, finding_scale=scale)
        r = measure(args.out / f"scale_{scale:g}_size_{args.size}", synth, args.size, args.label)
        print(f"| {scale:g} | {r['positives']:.0f} / {r['scans']:.0f} | {r['raw_voxels']:.3f} | {r['window_histograms']:.3f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
