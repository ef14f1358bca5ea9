"""How many labels does a pretrained encoder need before it beats training from scratch?

On a tuning set (``label_signal.tuning_set``: never a study's test split), half the scans are a
labelled pool and half are held out. For each count of labelled scans ``n`` (drawn from the pool,
``--draws`` times) and each fine-tuning length, a classifier for every task at once (one sigmoid
per task) is fine-tuned from the untrained encoder (scratch) and from each ``--encoder``
checkpoint, either head only (``probe``) or every weight (``full``), and scored on the held-out
half: mean AUROC per task over the draws. ``--cnn`` adds a small supervised 3D ResNet (MONAI) as
a reference for what the prepared scans allow a model with no patch tokens to reach.

    python -m ctfed.simulations.studies.few_label_finetune --out /tmp/recipe --seed 11 --sites 3 \\
        --scans-per-site 150 60 100 --finding-scale 3 --encoder dino3000=/tmp/enc/encoder_3000.pt \\
        --labels 8 24 48 155 --steps 200 1000

(encoders from ``label_signal --curve --save-encoders DIR``; docs/studies.md, "How many labels ...").
The recipe is deliberately plain (AdamW with a one-cycle schedule, batch 8, left-right flips,
feature standardisation fitted on the labelled scans), so that scratch and pretrained differ in
their initial weights only. ``--recipe study`` fine-tunes with the label-efficiency study's own
``Finetuner`` recipe instead (``label_efficiency.finetune``, its probe share of the steps kept,
batch ``--batch-size``) in its modes ``linear_probe``, ``progressive``, ``full``: how its
fine-tuning budget is chosen without touching a study scan.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import TensorDataset

from ctfed.common.config import FINETUNE_MODES, FinetuneConfig, ModelConfig
from ctfed.common.finetune import Finetuner, build_classifier
from ctfed.simulations.config import load_simulation_config
from ctfed.simulations.data.label_signal import tuning_set, tuning_synth

MODES = ("probe", "full")
# Head-only training moves far fewer weights, so it takes a larger step (as MAE's linear probe).
MODE_LR = {"probe": 1e-3, "full": 3e-4}
BATCH_SIZE = 8


def small_cnn(in_channels: int, num_outputs: int) -> nn.Module:
    """A 0.9M-parameter 3D ResNet (one basic block per stage, 16-128 wide): the reference."""
    from monai.networks.nets import ResNet

    return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[16, 32, 64, 128], spatial_dims=3,
                  n_input_channels=in_channels, num_classes=num_outputs)


def finetune_auroc(
    model_cfg: ModelConfig,
    encoder_state: dict[str, torch.Tensor] | None,
    volumes: torch.Tensor,
    labels: torch.Tensor,
    train: np.ndarray,
    test: np.ndarray,
    mode: str,
    steps: int,
    seed: int,
) -> list[float]:
    """Per-task test AUROC of one fine-tuning on ``volumes[train]`` (``mode`` ``probe``/``full``
    on the ViT, ``cnn``: ``small_cnn`` from scratch, ``encoder_state`` ignored). A task with no
    positive (or no negative) among the labelled scans scores 0.5: nothing could be learnt."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    if mode == "cnn":
        model: nn.Module = small_cnn(volumes.shape[1], labels.shape[1])
    elif mode in MODES:
        classifier = build_classifier(model_cfg, labels.shape[1], encoder_state)
        if mode == "full":
            classifier.set_trainable(blocks=range(classifier.num_blocks), stem=True)
        classifier.fit_standardizer([(volumes[i],) for i in train])
        model = classifier
    else:
        raise ValueError(f"mode must be one of {', '.join(MODES)} or cnn, got {mode!r}")
    lr = MODE_LR.get(mode, MODE_LR["full"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(steps):
        batch = rng.choice(train, min(BATCH_SIZE, len(train)), replace=False)
        x = volumes[batch].clone()
        flip = torch.rand(len(batch)) < 0.5
        x[flip] = x[flip].flip(-1)  # the cache's x axis is left-right
        loss = loss_fn(model(x), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        scores = torch.cat([torch.sigmoid(model(volumes[test[i : i + 32]])) for i in range(0, len(test), 32)]).numpy()
    aurocs = []
    for task in range(labels.shape[1]):
        seen = labels[train, task]
        learnable = 0 < float(seen.sum()) < len(train)
        aurocs.append(float(roc_auc_score(labels[test, task].numpy(), scores[:, task])) if learnable else 0.5)
    return aurocs


def study_recipe(base: FinetuneConfig, tasks: Sequence[str], steps: int, batch_size: int, seed: int) -> FinetuneConfig:
    """``base`` (the study's recipe) stretched to ``steps`` with its probe share kept."""
    probe = int(round(steps * base.probe_steps / base.total_steps))
    return replace(base, probe_steps=probe, stage_steps=steps - probe, batch_size=batch_size, label_names=list(tasks), seed=seed)


def study_finetune_auroc(
    model_cfg: ModelConfig,
    recipe: FinetuneConfig,
    mode: str,
    encoder_state: dict[str, torch.Tensor] | None,
    volumes: torch.Tensor,
    labels: torch.Tensor,
    train: np.ndarray,
    test: np.ndarray,
) -> list[float]:
    """Per-task test AUROC of one ``Finetuner`` run in ``mode`` (0.5 where nothing was learnable)."""
    classifier = build_classifier(model_cfg, labels.shape[1], encoder_state, seed=recipe.seed, pooling=recipe.pooling)
    finetuner = Finetuner(classifier, replace(recipe, mode=mode), TensorDataset(volumes[train], labels[train]))
    finetuner.fit()
    scores, _ = finetuner.predict(TensorDataset(volumes[test], labels[test]))
    return [
        float(roc_auc_score(labels[test, k].numpy(), scores[:, k])) if 0 < float(labels[train, k].sum()) < len(train) else 0.5
        for k in range(labels.shape[1])
    ]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``main`` (tests/unit/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(prog="python -m ctfed.simulations.studies.few_label_finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder of the tuning set (label_signal's)")
    parser.add_argument("--seed", type=int, default=11, help="synth seed of the tuning set")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--scans-per-site", type=int, nargs="+", default=[150, 60, 100])
    parser.add_argument("--finding-scale", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=32, help="prepared volume size")
    parser.add_argument("--encoder", action="append", default=[], metavar="NAME=PATH",
                        help="a pretrained encoder state (torch.save of LocalTrainer.encoder_state()); repeatable")
    parser.add_argument("--labels", type=int, nargs="+", default=[8, 24, 48, 155], help="labelled scans drawn from the pool")
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 1000], help="fine-tuning lengths, optimiser steps")
    parser.add_argument("--recipe", choices=("plain", "study"), default="plain",
                        help="plain: this driver's recipe; study: label_efficiency.finetune's Finetuner")
    parser.add_argument("--modes", nargs="+", default=None, choices=(*MODES, *FINETUNE_MODES),
                        help=f"default: {' '.join(MODES)} (plain), {' '.join(FINETUNE_MODES)} (study)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="fine-tuning batch (--recipe study)")
    parser.add_argument("--draws", type=int, default=5, help="random labelled draws per cell")
    parser.add_argument("--cnn", action="store_true", help="also the supervised small 3D CNN, at every count and length")
    parser.add_argument("--json", type=Path, default=None, help="default: OUT/few_label_finetune.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    synth = tuning_synth(args.sites, args.seed, args.finding_scale, args.scans_per_site)
    data = tuning_set(args.out / f"scale_{args.finding_scale:g}_size_{args.size}", synth, args.size)
    tasks = list(data.labels)
    volumes = torch.stack(data.volumes)
    labels = torch.tensor(np.stack([data.labels[t] for t in tasks], axis=1), dtype=torch.float32)
    order = np.random.default_rng(0).permutation(len(volumes))
    pool, test = order[: len(order) // 2], order[len(order) // 2 :]
    if max(args.labels) > len(pool):
        raise SystemExit(f"--labels {max(args.labels)} exceeds the labelled pool of {len(pool)} scans")
    study_cfg = load_simulation_config(["preset=label_efficiency", f"model.image_size={args.size}", f"preprocess.output_size={args.size}"])
    model_cfg = study_cfg.model
    modes = args.modes or list(MODES if args.recipe == "plain" else FINETUNE_MODES)
    allowed = MODES if args.recipe == "plain" else FINETUNE_MODES
    if any(mode not in allowed for mode in modes):
        raise SystemExit(f"--recipe {args.recipe} takes --modes among {', '.join(allowed)}")
    encoders: dict[str, dict[str, torch.Tensor] | None] = {"scratch": None}
    encoder_paths = {"scratch": "-"}
    for spec in args.encoder:
        name, sep, path = spec.partition("=")
        if not sep or not name or name == "scratch":
            raise SystemExit(f"--encoder wants NAME=PATH with a name other than scratch, got {spec!r}")
        encoders[name] = torch.load(path, weights_only=True)
        encoder_paths[name] = path
    torch.set_num_threads(1)  # one core per run; the figures compare arms, not machines
    report: dict[str, Any] = {"tasks": tasks, "pool": len(pool), "test": len(test), "seed": args.seed, "size": args.size,
                              "draws": args.draws, "recipe": args.recipe, "encoders": encoder_paths, "rows": []}
    json_path = args.json or args.out / "few_label_finetune.json"
    arms = [(name, mode) for name in encoders for mode in modes] + ([("cnn", "cnn")] if args.cnn else [])
    print(f"tuning set seed {args.seed}: {len(pool)} pool / {len(test)} held-out scans, {len(tasks)} tasks")
    print("| labelled | steps | arm | mode | mean AUROC | seconds |\n|---|---|---|---|---|---|")
    for n in args.labels:
        for steps in args.steps:
            for name, mode in arms:
                started = time.perf_counter()
                runs = []
                for draw in range(args.draws):
                    train = np.random.default_rng([n, draw]).choice(pool, n, replace=False)
                    if args.recipe == "study" and mode != "cnn":
                        recipe = study_recipe(study_cfg.label_efficiency.finetune, tasks, steps, args.batch_size, seed=draw)
                        runs.append(study_finetune_auroc(model_cfg, recipe, mode, encoders.get(name), volumes, labels, train, test))
                    else:
                        runs.append(finetune_auroc(model_cfg, encoders.get(name), volumes, labels, train, test, mode, steps, seed=draw))
                per_task = np.mean(runs, axis=0)
                row = {"labelled": n, "steps": steps, "arm": name, "mode": mode, "mean": round(float(per_task.mean()), 4),
                       "tasks": dict(zip(tasks, np.round(per_task, 3).tolist())), "seconds": round(time.perf_counter() - started, 1)}
                report["rows"].append(row)
                print(f"| {n} | {steps} | {name} | {mode} | {row['mean']:.3f} | {row['seconds']:.0f} |", flush=True)
                json_path.write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
