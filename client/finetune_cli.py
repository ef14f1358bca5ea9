"""``ctfed finetune``: fine-tune an encoder on one site's labelled cache, no federation.

The same ``Finetuner`` federated phase 2 and the compare study use (``finetune.mode``:
progressive freezing - linear probe, then top blocks unfrozen with discriminative LRs - or
``full`` / ``linear_probe``), on the cache's labelled scans, split the way a federated site
splits them (the labels' ``finetune_split`` column where it has one; else stratified,
``finetune.test_fraction`` held out, ``finetune.split_seed``). The
held-out scans are scored (AUROC, AP, balanced accuracy, F1 with bootstrap 95% CIs) and the
classifier is saved as ``classifier.safetensors`` with its model card (``classifier.json``:
model and fine-tuning config, encoder source, split sizes, PHI-free data summary, metrics).

``--encoder`` takes an encoder checkpoint (``ctfed pretrain``'s ``local_round_NNNN``, a
federation's ``global_round_NNNN`` of phase 1, the compare study's arms); the checkpoint's
model config is the architecture. Without it the encoder is trained from scratch.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ctfed.common.checkpoint import load_checkpoint, save_checkpoint
from ctfed.common.config import ConfigError, RunConfig, load_run_config
from ctfed.common.data_summary import card_data_summary, site_data_metrics
from ctfed.common.finetune import CLASSIFIER_KIND_SUFFIX, Finetuner, build_classifier
from ctfed.common.labelled import LabelledScans, NotEvaluableError, site_split
from ctfed.common.metrics import evaluation_dict, operating_points
from ctfed.common.model import encoder_part
from ctfed.common.preprocess import CachedVolumes

CLASSIFIER_STEM = "classifier"
CLASSIFIER_KIND = f"local-{CLASSIFIER_KIND_SUFFIX}"
ENCODER_KIND_SUFFIX = "encoder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache", required=True, type=Path, help="a prepared cache folder with labels (ctfed prepare --labels)"
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for the classifier checkpoint and its card")
    parser.add_argument(
        "--encoder", type=Path,
        help="pretrained encoder checkpoint (.safetensors with its .json card); omitted: train from scratch",
    )
    parser.add_argument(
        "--n-boot", type=int, default=1000, help="bootstrap resamples of the metrics' 95%% CIs (default %(default)s)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="Hydra overrides, e.g. finetune.mode=full finetune.label_names=[any,sdh] finetune.pooling=mean_patch",
    )


def _pretrained_encoder(path: Path, cfg: RunConfig, overrides: list[str]) -> tuple[dict, RunConfig, dict[str, Any]]:
    """The checkpoint's weights, the run config on its architecture, and what the card says of it."""
    try:
        state, model_cfg, card = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"--encoder: {err}") from None
    kind = str(card.get("kind", ""))
    if not kind.endswith(ENCODER_KIND_SUFFIX):
        raise ConfigError(f"--encoder {path} is a '{kind}' checkpoint; fine-tuning starts from an encoder")
    if model_cfg != cfg.model and any(o.split("=", 1)[0].startswith("model") for o in overrides):
        raise ConfigError(
            f"--encoder {path} is a '{model_cfg.name}' encoder, but the overrides ask for model '{cfg.model.name}' "
            "(drop the model override: the checkpoint defines the architecture)"
        )
    # A federation's global encoder may carry its shared SSL heads (train.share_heads): not for fine-tuning.
    return encoder_part(state), replace(cfg, model=model_cfg), {"kind": kind, "sha256": card.get("sha256"), "round": card.get("round")}


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.overrides)
    if args.n_boot < 1:
        raise ConfigError("--n-boot must be >= 1")
    if not args.cache.is_dir():
        raise ConfigError(f"--cache {args.cache} is not a folder")
    encoder_state = None
    source: dict[str, Any] = {"kind": "scratch"}
    if args.encoder is not None:
        encoder_state, cfg, source = _pretrained_encoder(args.encoder, cfg, list(args.overrides))
    finetune = cfg.finetune

    dataset = CachedVolumes(args.cache)
    cache_size = int(dataset.preprocessing.get("output_size", cfg.model.image_size))
    if cache_size < cfg.model.image_size:
        raise ConfigError(
            f"the cache holds {cache_size}^3 volumes, the '{cfg.model.name}' encoder takes "
            f"{cfg.model.image_size}^3; prepare the cache with preprocess.output_size={cfg.model.image_size}"
        )
    try:
        split = site_split(dataset, finetune.label_names, finetune.test_fraction, finetune.split_seed)
    except NotEvaluableError as err:
        raise ConfigError(f"cannot split the cache's labelled scans: {err}") from None
    train = LabelledScans(dataset, split.train, finetune.label_names, cfg.model.image_size)
    test = LabelledScans(dataset, split.test, finetune.label_names, cfg.model.image_size)
    classifier = build_classifier(
        cfg.model, finetune.num_outputs, encoder_state, seed=finetune.seed, pooling=finetune.pooling
    )
    finetuner = Finetuner(classifier, finetune, train)
    plan = ", ".join(f"{phase} {steps} steps" for phase, steps in finetuner.phases())
    print(
        f"fine-tuning the {cfg.model.name} encoder ({source['kind']}) on {len(train)} labelled scans "
        f"({', '.join(finetune.label_names)}), {len(test)} held out: {plan}"
    )

    started = time.perf_counter()
    with tqdm(total=finetune.total_steps, desc="finetune", unit="step") as bar:

        def on_step(phase: str, loss: float) -> None:
            bar.set_postfix_str(f"{phase} loss {loss:.4f}")
            bar.update()

        fit = finetuner.fit(on_step)
    probs, labels = finetuner.predict(test)
    evaluation = evaluation_dict(labels, probs, finetune.label_names, args.n_boot, finetune.split_seed)
    # `ctfed predict`'s decisions: Youden's J on the held-out scans (the only labelled scans
    # the classifier did not train on), so the card's metrics at 0.5 and this point share them.
    operating_point = operating_points(labels, probs, finetune.label_names, split="held-out")

    args.out.mkdir(parents=True, exist_ok=True)
    weights = save_checkpoint(
        args.out / CLASSIFIER_STEM,
        classifier.state_dict(),
        cfg.model,
        kind=CLASSIFIER_KIND,
        label_names=list(finetune.label_names),
        pooling=finetune.pooling.value,
        finetune=asdict(finetune),
        encoder=source,
        train_scans=len(train),
        test_scans=len(test),
        steps=len(fit.losses),
        losses=fit.losses,
        evaluation=evaluation,
        operating_point=operating_point,
        # One site, named generically: a cache folder's name may be anything the site chose.
        data_summary=card_data_summary({"local": site_data_metrics(dataset)}, dataset.preprocessing),
    )
    print(f"held-out scans ({len(test)}), {args.n_boot} bootstrap resamples:")
    for task, metrics in evaluation.items():
        cells = ", ".join(f"{name} {m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]" for name, m in metrics.items())
        print(f"  {task}: {cells}")
    for task, point in operating_point.items():
        print(
            f"  {task}: operating point {point['threshold']:.4f} (Youden's J on the held-out scans: sensitivity "
            f"{point['sensitivity']:.3f}, specificity {point['specificity']:.3f})"
        )
    print(f"done in {time.perf_counter() - started:.0f} s; classifier {weights} (card {weights.with_suffix('.json')})")
    return 0
