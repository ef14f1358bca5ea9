"""``ctfed predict``: score a folder of new studies with a fine-tuned classifier, at the site.

The studies go through exactly what ``ctfed prepare`` does to them (``common/preprocess.py``
``process_studies``: the scan, the per-study series choice, the transform chain, NIfTI
included), with the preprocessing plan recorded in the classifier's card; no volume is
written. The classifier then scores every accepted study in batches, on ``--device``.

Output, all local (nothing predict writes is sent anywhere):

* ``predictions.csv``: one row per study and task: the study, the series scored, the task,
  the probability, the card's operating point for the task and the decision
  (``probability >= operating point``; empty when the card has none). The study column is
  the site's pseudonym by default (``study_key``: the key ``prepare`` gives the study, under
  the same site secret when ``--cache`` names the site's cache); ``--id-column
  StudyInstanceUID|AccessionNumber`` puts that identifier there instead (a NIfTI file has
  neither: its path under the input folder is used).
* ``<stem>.key.csv`` (pseudonym column only): study_key -> StudyInstanceUID (NIfTI: the
  file's path), so results map back to the study inside the hospital. Mode 0600.
* ``<stem>.report.md``: the plan, counts and the rejected series with their reasons, as in
  prepare's report (pseudonymous refs only).

Refused, with the reason: an encoder checkpoint (no head), an input plan (``--size``,
``--spacing`` or ``--cache``'s manifest) that differs from the classifier's, and a classifier
whose feature statistics stayed at the sites (a federated phase-2 one) without ``--cache`` to
fit them on.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ctfed.common.checkpoint import card_preprocessing_plan, load_checkpoint
from ctfed.common.config import ConfigError, Precision, PreprocessConfig, SeriesPerStudy, SeriesSelectionConfig, TrainConfig
from ctfed.common.device import autocast, check_precision, resolve_device

if TYPE_CHECKING:
    from ctfed.common.finetune import Classifier

logger = logging.getLogger(__name__)

STUDY_KEY_COLUMN = "study_key"
ID_COLUMNS = ("StudyInstanceUID", "AccessionNumber")
PREDICTION_COLUMNS = ("series_key", "source", "task", "probability", "operating_point", "decision")
KEY_FILE_SUFFIX = ".key.csv"
REPORT_SUFFIX = ".report.md"
ENCODER_KIND_SUFFIX = "encoder"


@dataclass
class PredictSummary:
    """What one ``predict`` run did."""

    scored: int
    rejected: int
    predictions: Path
    key_file: Path | None
    report: Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PreprocessConfig()
    parser.add_argument("--classifier", type=Path, required=True,
                        help="a classifier checkpoint (.safetensors with its .json card): ctfed finetune's "
                             "classifier.safetensors or a federation's phase-2 global_round_NNNN.safetensors")
    parser.add_argument("--input", type=Path, required=True, help="folder with the studies to score (DICOM and/or NIfTI)")
    parser.add_argument("--output", type=Path, required=True, help="predictions CSV to write")
    parser.add_argument("--id-column", choices=ID_COLUMNS, default=None,
                        help="put this identifier in the CSV instead of the site's pseudonym (then no key file)")
    parser.add_argument("--key-file", type=Path, default=None,
                        help=f"pseudonym -> StudyInstanceUID map (default: <output stem>{KEY_FILE_SUFFIX})")
    parser.add_argument("--cache", type=Path, default=None,
                        help="the site's prepared cache: its site secret keys the pseudonyms (the study keys "
                             "prepare wrote), its plan must be the classifier's, and a federated classifier's "
                             "feature statistics are fitted on its scans")
    parser.add_argument("--size", type=int, default=None, help="preprocess.output_size (default: the classifier's)")
    parser.add_argument("--spacing", type=float, default=None, help="preprocess.spacing_mm (default: the classifier's)")
    parser.add_argument("--slice-gap-tolerance", type=float, default=defaults.slice_gap_tolerance,
                        help="as in ctfed prepare (default %(default)s)")
    parser.add_argument("--slice-gap-tolerance-mm", type=float, default=defaults.slice_gap_tolerance_mm,
                        help="as in ctfed prepare (default %(default)s)")
    parser.add_argument("--all-series", action="store_true", help="score every usable series of a study, as prepare's")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="preprocessing processes (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="studies per forward pass (default %(default)s)")
    train = TrainConfig()  # the forward pass runs where and how training does, unless told otherwise
    parser.add_argument("--device", default=train.device, help="auto, cpu, cuda or cuda:N, as train.device (default %(default)s)")
    parser.add_argument("--precision", choices=[p.value for p in Precision], default=train.precision.value,
                        help="autocast of the forward pass, as train.precision (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    try:
        device = resolve_device(args.device)
        precision = Precision(args.precision)
        check_precision(precision, device)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    acceptance = {
        "slice_gap_tolerance": args.slice_gap_tolerance,
        "slice_gap_tolerance_mm": args.slice_gap_tolerance_mm,
        "series_selection": SeriesSelectionConfig(per_study=SeriesPerStudy.all if args.all_series else SeriesPerStudy.one),
        "workers": args.workers,
    }
    summary = predict(
        args.classifier, args.input, args.output,
        id_column=args.id_column, key_file=args.key_file, cache=args.cache,
        size=args.size, spacing=args.spacing, acceptance=acceptance,
        batch_size=args.batch_size, device=device, precision=precision, progress=not args.no_progress,
    )
    print(f"scored {summary.scored} studies, rejected {summary.rejected} series")
    print(f"predictions: {summary.predictions}")
    if summary.key_file is not None:
        print(f"key file:    {summary.key_file} (pseudonym -> StudyInstanceUID; keep it inside the hospital)")
    print(f"report:      {summary.report}")
    if summary.scored == 0:
        print(f"ctfed predict: no usable CT study under {args.input}; see {summary.report}", file=sys.stderr)
        return 1
    return 0


def load_for_prediction(path: Path) -> tuple[Classifier, dict[str, Any]]:
    """The classifier and its card; ConfigError for an encoder or anything not a classifier."""
    from ctfed.common.finetune import load_classifier

    try:
        _, _, card = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"--classifier: {err}") from None
    kind = str(card.get("kind", ""))
    if kind.endswith(ENCODER_KIND_SUFFIX):
        raise ConfigError(
            f"--classifier {path} is an encoder checkpoint ('{kind}'): it has no classification head; "
            "fine-tune it first (ctfed finetune --encoder, or a federation's phase 2)"
        )
    try:
        return load_classifier(path)
    except ValueError as err:
        raise ConfigError(f"--classifier: {err}") from None


def _input_plan(card: dict[str, Any], cache: Path | None, size: int | None, spacing: float | None,
                acceptance: dict[str, Any]) -> PreprocessConfig:
    """The classifier's plan as a config; ConfigError when the input's plan differs from it."""
    from ctfed.common.preprocess import MANIFEST, config_from_plan, plan_differences, preprocessing_plan

    plan = card_preprocessing_plan(card)
    if cache is not None:
        manifest = cache / MANIFEST
        if not manifest.is_file():
            raise ConfigError(f"--cache {cache} holds no {MANIFEST}; run ctfed prepare first")
        cache_plan = json.loads(manifest.read_text(encoding="utf-8")).get("preprocessing") or {}
        if plan is None:
            plan = cache_plan  # an older card: the site's own cache says how its scans were made
        elif cache_plan != plan:
            raise ConfigError(
                f"the classifier was trained on volumes preprocessed differently from --cache {cache} "
                f"(classifier vs cache): {'; '.join(plan_differences(plan, cache_plan))}"
            )
    if plan is None:
        raise ConfigError("the classifier's card records no preprocessing plan; pass --cache with the site's cache")
    try:
        cfg = config_from_plan(plan, **acceptance)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"the classifier's preprocessing plan cannot be reproduced: {err}") from None
    asked = {"output_size": size, "spacing_mm": spacing}
    wanted = dict(plan, **{key: value for key, value in asked.items() if value is not None})
    if wanted != plan:
        raise ConfigError(
            "the input's preprocessing differs from the classifier's plan (classifier vs input): "
            + "; ".join(plan_differences(plan, wanted))
        )
    assert preprocessing_plan(cfg) == plan
    return cfg


def _operating_points(card: dict[str, Any], tasks: list[str]) -> dict[str, float | None]:
    """Each task's threshold from the card; one warning for the tasks without one."""
    points = card.get("operating_point") or {}
    thresholds: dict[str, float | None] = {}
    for task in tasks:
        value = (points.get(task) or {}).get("threshold")
        thresholds[task] = float(value) if isinstance(value, (int, float)) and 0.0 <= value <= 1.0 else None
    missing = [task for task, value in thresholds.items() if value is None]
    if missing:
        logger.warning(
            "the classifier's card has no operating point for %s (trained before cards held one, or its validation "
            "split had one class): the decision column stays empty there; the probabilities are complete",
            ", ".join(missing),
        )
    return thresholds


def _fit_statistics(classifier: Classifier, cache: Path | None, image_size: int) -> None:
    """A federated classifier's feature statistics stay at the sites: fit them on this site's cache."""
    if classifier.standardizer.fitted:
        return
    if cache is None:
        raise ConfigError(
            "the classifier has no feature statistics (a federated classifier's stay at the sites); pass "
            "--cache with this site's prepared cache to fit them on its scans"
        )
    from ctfed.common.finetune import fit_standardizer_on_cache

    fit_standardizer_on_cache(classifier, cache, image_size)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically, readable by its owner only (it may map pseudonyms to UIDs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _batches(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict(
    classifier_path: Path,
    input_dir: Path,
    output: Path,
    *,
    id_column: str | None = None,
    key_file: Path | None = None,
    cache: Path | None = None,
    size: int | None = None,
    spacing: float | None = None,
    acceptance: dict[str, Any] | None = None,
    batch_size: int = 4,
    device: torch.device | None = None,
    precision: Precision = Precision.fp32,
    progress: bool = True,
) -> PredictSummary:
    """Score every accepted study under ``input_dir`` (see the module docstring)."""
    from ctfed.common.dicom import Rejection, scan
    from ctfed.common.labelled import model_input
    from ctfed.common.preprocess import TENSOR_FIELD, acceptance_lines, report_text, preprocessing_plan, process_studies
    from ctfed.common.privacy import site_secret

    if id_column is not None and id_column not in ID_COLUMNS:
        raise ConfigError(f"--id-column must be one of {', '.join(ID_COLUMNS)}, got {id_column!r}")
    if id_column is not None and key_file is not None:
        raise ConfigError("--key-file maps the pseudonym column; with --id-column the CSV holds the identifier and no key file is written")
    if not input_dir.is_dir():
        raise ConfigError(f"--input {input_dir} is not a folder")
    device = device or torch.device("cpu")
    classifier, card = load_for_prediction(classifier_path)
    image_size = int(card["model"]["image_size"])
    cfg = _input_plan(card, cache, size, spacing, acceptance or {})
    if cfg.output_size < image_size:
        raise ConfigError(
            f"the plan makes {cfg.output_size}^3 volumes, the classifier's encoder takes {image_size}^3"
        )
    tasks = [str(name) for name in card["label_names"]]
    thresholds = _operating_points(card, tasks)
    _fit_statistics(classifier, cache, image_size)
    classifier.eval()

    # The site's secret keys the pseudonyms: the cache's when given (prepare's study keys),
    # otherwise one kept beside the predictions.
    secret = site_secret(cache if cache is not None else output.parent)
    found = scan(input_dir, secret)
    rejected: list[Rejection] = list(found.rejected)
    rows: list[list[Any]] = []
    keys: dict[str, list[str]] = {}
    scored_entries: dict[str, dict[str, Any]] = {}
    scored = 0
    missing_ids = 0
    done = (d for d in process_studies(
        input_dir, found, secret, cfg, rejected, output_dir=None, progress=progress, desc="predict"
    ) if "rejected" not in d.result)
    with torch.no_grad():
        for index, batch in enumerate(_batches(done, batch_size)):
            if index == 0:
                # Only now: the preprocessing workers are forked by then, before CUDA is initialised.
                classifier.to(device)
            volumes = torch.stack([
                model_input(torch.from_numpy(np.asarray(d.result.pop(TENSOR_FIELD), dtype=np.float32)), image_size)
                for d in batch
            ]).to(device)
            with autocast(device, precision):
                logits = classifier(volumes)
            probabilities = torch.sigmoid(logits.float()).cpu().numpy()
            for item, probs in zip(batch, probabilities):
                study = item.job.study
                if item.series is not None:
                    uid, accession = item.series.study_uid, item.series.accession_number
                else:
                    assert item.nifti_path is not None
                    uid = accession = item.nifti_path.relative_to(input_dir).as_posix()
                identifier = study
                if id_column == "StudyInstanceUID":
                    identifier = uid
                elif id_column == "AccessionNumber":
                    identifier = accession
                    missing_ids += not accession
                keys[study] = [uid if item.series is not None else "", "" if item.series is not None else uid]
                for task, probability in zip(tasks, probs):
                    threshold = thresholds[task]
                    decision = "" if threshold is None else int(float(probability) >= threshold)
                    rows.append([identifier, item.job.key, item.result["source"], task, f"{float(probability):.6f}",
                                 "" if threshold is None else f"{threshold:.6f}", decision])
                scored_entries[item.job.key] = item.result
                scored += 1
    if missing_ids:
        logger.warning("%d scored studies have no AccessionNumber; their id cell is empty", missing_ids)

    # Workers finish in any order: the file is sorted by study and series, tasks in the card's order.
    rows.sort(key=lambda row: (row[0], row[1], tasks.index(row[3])))
    id_header = id_column or STUDY_KEY_COLUMN
    # The CSV maps results to patients' studies only through the key file, or holds an
    # identifier itself: owner-only either way.
    _write_private(output, _csv_text([id_header, *PREDICTION_COLUMNS], rows))
    written_key: Path | None = None
    if id_column is None:
        written_key = key_file or output.with_name(output.stem + KEY_FILE_SUFFIX)
        _write_private(written_key, _csv_text(
            [STUDY_KEY_COLUMN, "StudyInstanceUID", "nifti_file"], [[study, *ids] for study, ids in sorted(keys.items())]
        ))
    report = output.with_name(output.stem + REPORT_SUFFIX)
    _write_private(report, report_text(
        preprocessing_plan(cfg), scored_entries, rejected, 0, acceptance_lines(cfg), title="ctfed predict report",
        count_line=f"- studies scored: {scored} ({len(tasks)} task(s): {', '.join(tasks)})",
    ))
    logger.info("predict: %d studies scored, %d series rejected", scored, len(rejected))
    return PredictSummary(scored=scored, rejected=len(rejected), predictions=output, key_file=written_key, report=report)
