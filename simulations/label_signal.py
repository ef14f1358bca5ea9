"""How much label signal do prepared synthetic scans carry? A probe on simple features.

Writes a fresh tuning set of synthetic hospitals (use a seed the compared run does not use),
prepares it with the simulation's preprocessing at ``--size``^3, and reports the 5-fold
cross-validated AUROC of a logistic-regression probe on two model-free features: the raw
voxels of all windows, and each window's intensity histogram. If such a probe is near 0.5,
no encoder comparison on that data can mean much. One run per ``--finding-scale`` value::

    python -m ctfed.simulations.label_signal --seed 1 --finding-scale 1 3 --out /tmp/signal

With ``--pretrain-steps``, the same probe on an encoder's features (every ``finetune.pooling``)
after centralized pretraining on the pooled tuning set for that many steps (compare preset,
plus ``--train`` overrides): does pretraining add label signal over an untrained encoder::

    python -m ctfed.simulations.label_signal --seed 1 --finding-scale 3 --out /tmp/signal \
        --pretrain-steps 0 100 1000 --train train.mim_objective=mae train.dino_weight=0
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import ConcatDataset, Dataset

from ctfed.client.train import LocalTrainer
from ctfed.common.config import FeaturePooling, PreprocessConfig, SynthConfig, load_run_config
from ctfed.common.metrics import embedding_std
from ctfed.common.monitor import encoder_features
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


@dataclass
class TuningSet:
    caches: list[CachedVolumes]
    volumes: list[torch.Tensor]  # the labelled scans, (C, S, S, S)
    labels: np.ndarray  # 0/1 per scan


def tuning_set(out: Path, synth: SynthConfig, size: int, label: str) -> TuningSet:
    """Synthesize and prepare at ``size``^3 (``prepare`` reuses what ``out`` already holds)."""
    site_dirs = synthesize_federation(
        out / "dicom", synth.sites, synth.scan_counts, synth.seed, finding_scale=synth.finding_scale
    )
    caches, volumes, labels = [], [], []
    for site_dir in site_dirs:
        cache = out / "cache" / site_dir.name
        prepare(site_dir, cache, PreprocessConfig(output_size=size), labels_csv=site_dir / "labels.csv", progress=False)
        dataset = CachedVolumes(cache)
        caches.append(dataset)
        # In content order: a cache's own order follows its keyed pseudonyms, which change with
        # every new site secret, and the probe's folds follow the order (up to 0.04 AUROC apart).
        order = sorted(range(len(dataset)), key=lambda i: str(dataset.entries[i].get("content_hash", i)))
        for index in order:
            entry_label = dataset.labels[index]
            if entry_label is None or label not in entry_label:
                logging.warning("%s: a cached series has no '%s' label; skipped", site_dir.name, label)
                continue
            volumes.append(dataset[index])
            labels.append(int(entry_label[label]))
    y = np.asarray(labels)
    if min(np.bincount(y, minlength=2)) < 5:
        raise ValueError(f"need >= 5 scans of each class for 5 folds, got {np.bincount(y, minlength=2).tolist()}")
    return TuningSet(caches, volumes, y)


def measure(data: TuningSet, seed: int) -> dict[str, float]:
    """Probe AUROCs of the model-free features, and the counts."""
    raw = np.stack([v.numpy().ravel() for v in data.volumes])
    hist = np.stack([window_histograms(v.numpy()) for v in data.volumes])
    return {
        "scans": float(len(data.labels)),
        "positives": float(data.labels.sum()),
        "raw_voxels": probe_auroc(raw, data.labels, seed),
        "window_histograms": probe_auroc(hist, data.labels, seed),
    }


def encoder_probe(data: TuningSet, overrides: list[str], steps: int, seed: int) -> dict[str, float]:
    """Pretrain one centralized encoder on the pooled tuning set for ``steps`` steps (the
    compare preset plus ``overrides``), then probe the features of every pooling; with their
    spread (``embedding_std`` / uniform)."""
    size = int(data.volumes[0].shape[-1])
    cfg = load_run_config(["preset=compare", f"model.image_size={size}", f"preprocess.output_size={size}", *overrides])
    trainer = LocalTrainer(
        cfg.model, replace(cfg.train, local_steps=max(steps, 1), schedule_rounds=1), ConcatDataset(data.caches), seed=0
    )
    if steps:
        trainer.train_round(0)
    row: dict[str, float] = {}
    for pooling in FeaturePooling:
        features = encoder_features(cfg.model, trainer.encoder_state(), _Scans(data.volumes), pooling)
        row[pooling.value] = probe_auroc(features, data.labels, seed)
        row[f"{pooling.value}_spread"] = embedding_std(features) * math.sqrt(features.shape[1])
    return row


class _Scans(Dataset):
    """(volume, no label) pairs, the shape ``encoder_features`` reads."""

    def __init__(self, volumes: list[torch.Tensor]) -> None:
        self.volumes = volumes

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, None]:
        return self.volumes[index], None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (one subfolder per scale)")
    parser.add_argument("--seed", type=int, default=1, help="synth seed of the tuning set (default %(default)s)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--scans-per-site", type=int, default=24)
    parser.add_argument("--size", type=int, default=32, help="prepared volume size (default %(default)s)")
    parser.add_argument("--label", default="any")
    parser.add_argument("--finding-scale", type=float, nargs="+", default=[1.0])
    parser.add_argument(
        "--pretrain-steps", type=int, nargs="*", default=[],
        help="also probe encoders pretrained (centralized, compare preset) for these many steps (0: untrained)",
    )
    parser.add_argument(
        "--train", nargs="*", default=[], metavar="KEY=VALUE",
        help="Hydra overrides of the pretraining, e.g. train.mim_objective=mae train.dino_weight=0",
    )
    args = parser.parse_args(argv)
    logging.getLogger("openjpeg").setLevel(logging.WARNING)
    print(f"tuning set: seed {args.seed}, {args.sites} sites x {args.scans_per_site} scans, {args.size}^3, label '{args.label}'")
    print("| finding_scale | positives / scans | raw voxels AUROC | window histograms AUROC |")
    print("|---|---|---|---|")
    sets = {}
    for scale in args.finding_scale:
        synth = SynthConfig(sites=args.sites, scans_per_site=args.scans_per_site, seed=args.seed, finding_scale=scale)
        sets[scale] = tuning_set(args.out / f"scale_{scale:g}_size_{args.size}", synth, args.size, args.label)
        r = measure(sets[scale], args.seed)
        print(f"| {scale:g} | {r['positives']:.0f} / {r['scans']:.0f} | {r['raw_voxels']:.3f} | {r['window_histograms']:.3f} |",
              flush=True)
    if args.pretrain_steps:
        print(f"\nencoder features ({' '.join(args.train) or 'compare preset'}), probe AUROC (spread / uniform):")
        print("| finding_scale | steps | " + " | ".join(p.value for p in FeaturePooling) + " |")
        print("|---|---|" + "---|" * len(FeaturePooling))
        for scale, data in sets.items():
            for steps in args.pretrain_steps:
                row = encoder_probe(data, list(args.train), steps, args.seed)
                cells = " | ".join(f"{row[p.value]:.3f} ({row[p.value + '_spread']:.3f})" for p in FeaturePooling)
                print(f"| {scale:g} | {steps} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
