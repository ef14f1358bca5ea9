"""How much label signal do prepared synthetic scans carry? Model-free probes, per task.

Writes a fresh tuning set of synthetic hospitals (use a seed the compared run does not use),
prepares it with the simulation's preprocessing at ``--size``^3, and reports, for every label
column of labels.csv (the haemorrhage types, ``any`` and the structural findings), the 5-fold
cross-validated AUROC of a logistic-regression probe on two model-free features: the raw
voxels of all windows, and each window's intensity histogram. A task a histogram already
solves needs no encoder; where such a probe is near 0.5, no encoder comparison on that data
can mean much. One run per ``--finding-scale`` value; a table per run and ``--json``::

    python -m ctfed.simulations.data.label_signal --seed 1 --finding-scale 1 3 --out /tmp/signal

With ``--pretrain-steps``, the same probe on an encoder's features (every ``finetune.pooling``,
plus probe-only maxima of the patch tokens, ``PROBE_POOLINGS``) after centralized pretraining on
the pooled tuning set for that many steps (compare preset, plus ``--train`` overrides): does
pretraining add label signal over an untrained encoder::

    python -m ctfed.simulations.data.label_signal --seed 1 --finding-scale 3 --out /tmp/signal \
        --pretrain-steps 0 100 1000 --train train.mim_objective=mae train.dino_weight=0

Each step count is its own pretraining (its own LR schedule); ``--curve`` instead pretrains once,
for the largest count, and probes that one encoder at every listed count on the way (rounds of
``--round-steps``, default the counts' greatest common divisor): where more budget leads.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch.utils.data import ConcatDataset, Dataset

from ctfed.client.train import LocalTrainer
from ctfed.common.config import FeaturePooling, PreprocessConfig
from ctfed.simulations.config import SynthConfig, load_simulation_config
from ctfed.common.finetune import build_classifier
from ctfed.common.metrics import embedding_std
from ctfed.common.monitor import encoder_features
from ctfed.common.preprocess import CachedVolumes, prepare
from ctfed.simulations.data.synth import LABEL_COLUMNS, synthesize_federation

logger = logging.getLogger(__name__)

HISTOGRAM_BINS = 32
FOLDS = 5
# Random labelled subsets per few-label probe: its mean moves by about 0.01 between seeds at 20.
FEW_LABEL_REPEATS = 20


def window_histograms(volume: np.ndarray) -> np.ndarray:
    """Per-channel histogram over the open interval (0, 1): voxels clipped at a window's ends
    (air, bone in the brain window) would swamp the bins that hold soft tissue and blood."""
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    rows = []
    for channel in volume:
        inside = channel[(channel > 0.0) & (channel < 1.0)]
        rows.append(np.histogram(inside, bins=edges)[0] / channel.size)
    return np.concatenate(rows)


class RowSpan(TransformerMixin, BaseEstimator):
    """Coordinates in the span of the training rows (an orthonormal basis of it).

    An L2-regularised linear model's weights lie in that span (representer theorem), and the
    basis keeps their norm, so a logistic regression fits the same scores on these <= n
    features as on the p raw ones: the raw-voxel probe (p = 3 x 32^3) gets hundreds of times
    cheaper, and unchanged.
    """

    def fit(self, features: np.ndarray, labels: np.ndarray | None = None) -> "RowSpan":
        rows = np.asarray(features, dtype=np.float64)
        # From the n x n Gram matrix: its eigenvectors U give the basis rows^T U / sqrt(eigenvalue).
        eigenvalues, vectors = np.linalg.eigh(rows @ rows.T)
        keep = eigenvalues > eigenvalues.max() * 1e-12
        self.basis_ = rows.T @ (vectors[:, keep] / np.sqrt(eigenvalues[keep]))
        return self

    def transform(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float64) @ self.basis_


def linear_probe(row_span: bool = True) -> Pipeline:
    """The probe every label-signal figure uses: standardised features, an L2-regularised
    logistic regression (C=0.1); ``row_span`` fits it in the training rows' span (the same
    scores, far cheaper when features outnumber scans)."""
    return make_pipeline(StandardScaler(), *([RowSpan()] if row_span else []), LogisticRegression(C=0.1, max_iter=2000))


def probe_auroc(features: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """Out-of-fold AUROC of ``linear_probe`` (5 folds)."""
    probe = linear_probe()
    folds = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=seed)
    # One BLAS thread: the fits are tiny (<= n features), and threads that spin-wait made them
    # 10-40x slower on a loaded 2-core machine.
    with threadpool_limits(limits=1, user_api="blas"):
        scores = cross_val_predict(probe, features, labels, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, scores))


def few_label_auroc(features: np.ndarray, labels: np.ndarray, n_labels: int, seed: int, repeats: int = FEW_LABEL_REPEATS) -> float:
    """Mean AUROC, over ``repeats`` random draws, of the same probe fitted on ``n_labels`` scans
    and scored on all the others: the few-label regime the label-efficiency study asks about
    (a 5-fold probe on every scan's label measures a different, many-label question). A draw
    holding one class only is drawn again; labels that leave no such draw are an error."""
    if not 0 < n_labels < len(labels) - 1 or min(int(labels.sum()), int(len(labels) - labels.sum())) < 2:
        raise ValueError(
            f"a few-label probe of {n_labels} scans needs >= 2 scans of each class and some left to score, "
            f"got {int(labels.sum())} positive of {len(labels)}"
        )
    generator = np.random.default_rng(seed)
    aurocs = []
    with threadpool_limits(limits=1, user_api="blas"):
        while len(aurocs) < repeats:
            chosen = generator.permutation(len(labels))[:n_labels]
            held_out = np.setdiff1d(np.arange(len(labels)), chosen)
            if len(set(labels[chosen].tolist())) < 2 or len(set(labels[held_out].tolist())) < 2:
                continue
            probe = linear_probe().fit(features[chosen], labels[chosen])
            aurocs.append(roc_auc_score(labels[held_out], probe.predict_proba(features[held_out])[:, 1]))
    return float(np.mean(aurocs))


def not_probeable(labels: np.ndarray) -> str | None:
    """Why ``labels`` cannot be probed with 5 stratified folds, or None if they can."""
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if min(positives, negatives) < FOLDS:
        return f"{positives} positive / {negatives} negative scans; {FOLDS}-fold CV needs >= {FOLDS} of each"
    return None


@dataclass
class TuningSet:
    caches: list[CachedVolumes]
    volumes: list[torch.Tensor]  # the scans labelled for every task, (C, S, S, S)
    labels: dict[str, np.ndarray]  # task -> 0/1 per scan, in the order of ``volumes``


def tuning_synth(sites: int, seed: int, finding_scale: float, scans_per_site: Sequence[int]) -> SynthConfig:
    """The synthetic federation of a tuning set: one scan count for every site, or one per site."""
    counts = list(scans_per_site)
    if len(counts) == 1:
        return SynthConfig(sites=sites, seed=seed, finding_scale=finding_scale, scans_per_site=counts[0])
    return SynthConfig(sites=sites, seed=seed, finding_scale=finding_scale, scans_per_site=max(counts), scans_per_site_list=counts)


def tuning_set(out: Path, synth: SynthConfig, size: int, tasks: Sequence[str] = LABEL_COLUMNS) -> TuningSet:
    """Synthesize and prepare at ``size``^3 (``prepare`` reuses what ``out`` already holds)."""
    site_dirs = synthesize_federation(
        out / "dicom", synth.sites, synth.scan_counts, synth.seed, finding_scale=synth.finding_scale,
        structural_prevalence=synth.structural_prevalence,
    )
    caches, volumes = [], []
    labels: dict[str, list[int]] = {task: [] for task in tasks}
    for site_dir in site_dirs:
        cache = out / "cache" / site_dir.name
        prepare(site_dir, cache, PreprocessConfig(output_size=size), labels_csv=site_dir / "labels.csv", progress=False)
        dataset = CachedVolumes(cache)
        caches.append(dataset)
        # In content order: a cache's own order follows its keyed pseudonyms, which change with
        # every new site secret, and the probe's folds follow the order (up to 0.04 AUROC apart).
        order = sorted(range(len(dataset)), key=lambda i: str(dataset.entries[i].get("content_hash", i)))
        for index in order:
            entry_label = dataset.labels[index] or {}
            missing = [task for task in tasks if entry_label.get(task) not in (0, 1)]
            if missing:
                logger.warning("%s: a cached series has no 0/1 label for %s; skipped", site_dir.name, ", ".join(missing))
                continue
            volumes.append(dataset[index])
            for task in tasks:
                labels[task].append(int(entry_label[task]))
    if len(volumes) < 2 * FOLDS:
        raise ValueError(f"{len(volumes)} scans carry every task's label ({', '.join(tasks)}); need >= {2 * FOLDS}")
    return TuningSet(caches, volumes, {task: np.asarray(values) for task, values in labels.items()})


def model_free_features(data: TuningSet) -> dict[str, np.ndarray]:
    """The two model-free feature sets: every voxel of every window, and the window histograms."""
    return {
        "raw_voxels": np.stack([v.numpy().ravel() for v in data.volumes]),
        "window_histograms": np.stack([window_histograms(v.numpy()) for v in data.volumes]),
    }


def measure(data: TuningSet, seed: int, few_labels: int = 0) -> list[dict[str, Any]]:
    """One row per task: its counts and the probe AUROC of each model-free feature set (None,
    with the reason in ``skipped``, where the task has too few scans of a class)."""
    features = model_free_features(data)
    rows = []
    for task, labels in data.labels.items():
        reason = not_probeable(labels)
        row: dict[str, Any] = {"task": task, "scans": len(labels), "positives": int(labels.sum()), "skipped": reason}
        for name, values in features.items():
            row[name] = None if reason else probe_auroc(values, labels, seed)
            if few_labels:
                row[f"{name}_few"] = None if reason else few_label_auroc(values, labels, few_labels, seed)
        rows.append(row)
    return rows


# Poolings the probe reads: every fine-tuning pooling, plus the per-dimension maximum of the
# patch tokens (alone and beside CLS + mean), which a finding in a single patch survives where a
# mean over 64 patches dilutes it. Probe-only: no fine-tuning head reads them.
PROBE_POOLINGS = (*(p.value for p in FeaturePooling), "max_patch", "cls_mean_max_patch")


def encoder_probe(
    data: TuningSet, overrides: list[str], steps: int, seed: int, few_labels: int = 0
) -> dict[str, dict[str, float]]:
    """Pretrain one centralized encoder on the pooled tuning set for ``steps`` steps (the
    compare preset plus ``overrides``), then probe the features of every pooling for every
    probeable task: {task: {pooling: AUROC, pooling_spread: embedding_std / uniform}}."""
    ((_, rows),) = encoder_curve(data, overrides, [steps], seed, few_labels)
    return rows


def encoder_curve(
    data: TuningSet, overrides: list[str], checkpoints: Sequence[int], seed: int, few_labels: int = 0, round_steps: int = 0,
    save_dir: Path | None = None,
) -> list[tuple[int, dict[str, dict[str, float]]]]:
    """One centralized pretraining for ``max(checkpoints)`` steps (one LR schedule), in rounds
    of ``round_steps`` (0: the checkpoints' greatest common divisor), probed as in
    ``encoder_probe`` at every checkpoint: [(steps, rows)] in step order. With ``save_dir``
    each checkpoint's encoder state is also saved there as ``encoder_<steps>.pt``."""
    ordered = sorted(set(checkpoints))
    if not ordered or ordered[0] < 0:
        raise ValueError(f"checkpoints must be step counts >= 0, got {list(checkpoints)}")
    chunk = round_steps or math.gcd(*ordered) or 1
    if any(steps % chunk for steps in ordered):
        raise ValueError(f"every checkpoint must be a multiple of the round length {chunk}: {ordered}")
    size = int(data.volumes[0].shape[-1])
    cfg = load_simulation_config(["preset=compare", f"model.image_size={size}", f"preprocess.output_size={size}", *overrides])
    train_cfg = replace(cfg.train, local_steps=chunk, schedule_rounds=max(ordered[-1] // chunk, 1))
    trainer = LocalTrainer(cfg.model, train_cfg, ConcatDataset(data.caches), seed=0)
    curve, done = [], 0
    for steps in ordered:
        while done < steps:
            trainer.train_round(done // chunk)
            done += chunk
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            torch.save(trainer.encoder_state(), save_dir / f"encoder_{steps}.pt")
        curve.append((steps, _probe_rows(cfg.model, trainer.encoder_state(), data, seed, few_labels)))
    return curve


@torch.no_grad()
def _pooled_features(model_cfg: Any, encoder_state: dict[str, torch.Tensor], volumes: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """{pooling: (N, D) features} of every ``PROBE_POOLINGS`` entry, the encoder in eval mode."""
    features = {pooling.value: encoder_features(model_cfg, encoder_state, _Scans(volumes), pooling) for pooling in FeaturePooling}
    encoder = build_classifier(model_cfg, 1, encoder_state).encoder.eval()
    features["max_patch"] = np.concatenate(
        [encoder(torch.stack(volumes[i : i + 16]))[:, 1:].amax(dim=1).float().numpy() for i in range(0, len(volumes), 16)]
    )
    features["cls_mean_max_patch"] = np.concatenate([features[FeaturePooling.cls_mean_patch.value], features["max_patch"]], axis=1)
    return features


def _probe_rows(
    model_cfg: Any, encoder_state: dict[str, torch.Tensor], data: TuningSet, seed: int, few_labels: int
) -> dict[str, dict[str, float]]:
    tasks = {task: labels for task, labels in data.labels.items() if not_probeable(labels) is None}
    rows: dict[str, dict[str, float]] = {task: {} for task in tasks}
    for pooling, features in _pooled_features(model_cfg, encoder_state, data.volumes).items():
        spread = embedding_std(features) * math.sqrt(features.shape[1])
        for task, labels in tasks.items():
            rows[task][pooling] = probe_auroc(features, labels, seed)
            rows[task][f"{pooling}_spread"] = spread
            if few_labels:
                rows[task][f"{pooling}_few"] = few_label_auroc(features, labels, few_labels, seed)
    return rows


class _Scans(Dataset):
    """(volume, no label) pairs, the shape ``encoder_features`` reads."""

    def __init__(self, volumes: list[torch.Tensor]) -> None:
        self.volumes = volumes

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, None]:
        return self.volumes[index], None


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``main`` (tests/unit/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (one subfolder per scale)")
    parser.add_argument("--seed", type=int, default=1, help="synth seed of the tuning set (default %(default)s)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument(
        "--scans-per-site", type=int, nargs="+", default=[24],
        help="one scan count for every site, or one per site (default %(default)s)",
    )
    parser.add_argument("--size", type=int, default=32, help="prepared volume size (default %(default)s)")
    parser.add_argument(
        "--tasks", nargs="+", default=list(LABEL_COLUMNS), choices=LABEL_COLUMNS, metavar="TASK",
        help="label columns to probe (default: all of them)",
    )
    parser.add_argument("--finding-scale", type=float, nargs="+", default=[1.0])
    parser.add_argument("--json", type=Path, help="write every figure here (default: OUT/label_signal.json)")
    parser.add_argument(
        "--pretrain-steps", type=int, nargs="*", default=[],
        help="also probe encoders pretrained (centralized, compare preset) for these many steps (0: untrained)",
    )
    parser.add_argument(
        "--curve", action="store_true",
        help="pretrain once for the largest --pretrain-steps and probe that encoder at each count (one LR schedule)",
    )
    parser.add_argument("--round-steps", type=int, default=0, help="with --curve: steps per training round (0: the counts' gcd)")
    parser.add_argument("--save-encoders", type=Path, default=None, metavar="DIR",
                        help="with --curve: also save each checkpoint's encoder as DIR/encoder_<steps>.pt (few_label_finetune reads them)")
    parser.add_argument(
        "--train", nargs="*", default=[], metavar="KEY=VALUE",
        help="Hydra overrides of the pretraining, e.g. train.mim_objective=mae train.dino_weight=0",
    )
    parser.add_argument(
        "--few-labels", type=int, default=0, metavar="N",
        help="also probe with N labelled scans only (mean of %d random draws, scored on the rest); 0: off" % FEW_LABEL_REPEATS,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("openjpeg").setLevel(logging.WARNING)
    counts = list(args.scans_per_site)
    report: dict[str, Any] = {
        "seed": args.seed, "sites": args.sites, "scans_per_site": counts, "size": args.size, "tasks": list(args.tasks),
        "probe": f"logistic regression (standardised, C=0.1), {FOLDS}-fold stratified out-of-fold AUROC",
        "runs": [],
    }
    json_path = args.json or args.out / "label_signal.json"
    print(f"tuning set: seed {args.seed}, {args.sites} sites x {'/'.join(map(str, counts))} scans, {args.size}^3")
    sets = {}
    for scale in args.finding_scale:
        synth = tuning_synth(args.sites, args.seed, scale, counts)
        started = time.perf_counter()
        sets[scale] = tuning_set(args.out / f"scale_{scale:g}_size_{args.size}", synth, args.size, args.tasks)
        prepared = time.perf_counter()
        rows = measure(sets[scale], args.seed, args.few_labels)
        probed = time.perf_counter()
        run = {
            "finding_scale": scale,
            "seconds": {"synthesize_and_prepare": round(prepared - started, 1), "model_free_probes": round(probed - prepared, 1)},
            "model_free": rows,
            "encoder": [],
        }
        report["runs"].append(run)
        print(f"\nfinding_scale {scale:g} ({len(sets[scale].volumes)} scans; synthesize + prepare "
              f"{prepared - started:.0f} s, probes {probed - prepared:.0f} s; a reused work folder skips the writing)")
        few = f" ({args.few_labels} labels)" if args.few_labels else ""
        print(f"| task | positives / scans | raw voxels AUROC{few} | window histograms AUROC{few} |")
        print("|---|---|---|---|")
        for r in rows:
            note = f" ({r['skipped']})" if r["skipped"] else ""
            cells = [_cell(r[name]) + (f" ({_cell(r[name + '_few'])})" if args.few_labels else "")
                     for name in ("raw_voxels", "window_histograms")]
            print(f"| {r['task']} | {r['positives']} / {r['scans']} | {cells[0]} | {cells[1]}{note} |", flush=True)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    if args.pretrain_steps:
        few = f", with {args.few_labels} labels" if args.few_labels else ""
        print(f"\nencoder features ({' '.join(args.train) or 'compare preset'}), probe AUROC (spread / uniform{few}):")
        print("| finding_scale | steps | task | " + " | ".join(PROBE_POOLINGS) + " |")
        print("|---|---|---|" + "---|" * len(PROBE_POOLINGS))
        for run, (scale, data) in zip(report["runs"], sets.items()):
            started = time.perf_counter()
            if args.curve:
                run["curve"] = True  # one pretraining; "seconds" then count from its start
                probes = encoder_curve(data, list(args.train), args.pretrain_steps, args.seed, args.few_labels, args.round_steps,
                                       args.save_encoders)
            else:
                probes = ((steps, encoder_probe(data, list(args.train), steps, args.seed, args.few_labels))
                          for steps in args.pretrain_steps)
            for steps, by_task in probes:
                run["encoder"].append({"steps": steps, "seconds": round(time.perf_counter() - started, 1), "tasks": by_task})
                if not args.curve:
                    started = time.perf_counter()
                for task, row in by_task.items():
                    cells = " | ".join(
                        f"{row[p]:.3f} ({row[p + '_spread']:.3f}" + (f"; {row[p + '_few']:.3f})" if args.few_labels else ")")
                        for p in PROBE_POOLINGS
                    )
                    print(f"| {scale:g} | {steps} | {task} | {cells} |", flush=True)
                if args.few_labels:
                    means = {p: float(np.mean([row[p + "_few"] for row in by_task.values()])) for p in PROBE_POOLINGS}
                    print(f"| {scale:g} | {steps} | mean, {args.few_labels} labels | "
                          + " | ".join(f"{means[p]:.3f}" for p in PROBE_POOLINGS) + " |", flush=True)
                json_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
