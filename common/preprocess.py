"""Turn a site's DICOM folder into a training cache: ``<key>.npy`` + manifest + report.

The FM-CT recipe per series: orient RAS, resample to ``spacing_mm`` isotropic, crop to the
head (HU > ``foreground_hu``), one [0, 1] channel per CT window, resize to
``output_size``^3, store float16 (C, z, y, x) with z inferior->superior, y posterior->
anterior, x left->right.

The cache is incremental and crash-safe: the manifest is rewritten atomically after every
series, and a series whose file contents hash to a manifest entry is skipped. Outputs are
pseudonymous: series and studies appear only as keyed hashes (``privacy.pseudonym``), and
nothing from the DICOM header that identifies a patient is ever written or logged.

``process_studies`` is the per-study part (series choice, load, transform, in workers) that
``ctfed predict`` runs too, on volumes it scores instead of saving.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import fcntl
import hashlib
import json
import logging
import multiprocessing
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ctfed.common.config import ConfigError, PreprocessConfig, SeriesPerStudy, WindowConfig
from ctfed.common.dicom import (
    AIR_HU,
    CTVolume,
    DicomError,
    Rejection,
    ScanResult,
    SeriesRef,
    load_series,
    rank_study_series,
    scan,
    patient_key,
    series_key,
    study_key,
)
from ctfed.common.fileio import write_bytes_atomic, write_json_atomic, write_text_atomic
from ctfed.common.nifti import load_nifti, nifti_key
from ctfed.common.privacy import site_secret

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REPORT = "report.md"
FORMAT = 1
AXES = "C,z(inferior->superior),y(posterior->anterior),x(left->right)"
# labels.csv key columns: a study UID for DICOM, the path under the input folder for NIfTI.
STUDY_COLUMNS = ("StudyInstanceUID", "study_uid")
NIFTI_FILE_COLUMN = "file"
# A manifest *view* (simulations/data/split.py: one simulated site cut from a pooled cache) names
# the folder its entries' files live in, so the volumes are referenced, never copied.
VOLUMES_DIR_FIELD = "volumes_dir"
# Where a run folder keeps those views, and the split's summary (results.json "data_split").
SPLIT_DIR = "split"
SPLIT_SUMMARY = "split.json"
# What Spacing resamples in (a plan key: it changes cached values by float16 rounding). float32
# rather than MONAI's default float64: a 512x512x600 series peaks at 1.6 GB instead of 2.2 GB
# (issue #14's 2 GB bound, docs/benchmarks.md); 0.2% of cached voxels move by one float16 step.
RESAMPLE_DTYPE = "float32"
# Per entry: the size (z, y, x) in mm of a cached voxel, for augmentations in mm. An entry of an
# older cache without it is processed again by the next prepare.
CACHED_VOXEL_FIELD = "cached_voxel_zyx_mm"


@dataclass
class PrepareSummary:
    """What one ``prepare`` run did."""

    accepted: int
    cached: int
    rejected: int
    manifest: Path
    report: Path


def preprocessing_plan(cfg: PreprocessConfig) -> dict[str, Any]:
    return {
        "orientation": "RAS",
        "spacing_mm": cfg.spacing_mm,
        "foreground_hu": cfg.foreground_hu,
        "output_size": cfg.output_size,
        "windows": [asdict(w) if not isinstance(w, dict) else dict(w) for w in cfg.windows],
        "gantry_tilt": cfg.gantry_tilt,
        "dtype": "float16",
        "axes": AXES,
        "resample_dtype": RESAMPLE_DTYPE,
    }


# The keys of a plan that decide a cached volume's voxels (``axes`` and ``dtype`` describe them).
PLAN_KEYS = ("orientation", "spacing_mm", "foreground_hu", "output_size", "windows", "gantry_tilt", "dtype", "axes",
             "resample_dtype")


def config_from_plan(plan: dict[str, Any], **acceptance: Any) -> PreprocessConfig:
    """The ``PreprocessConfig`` that reproduces ``plan`` (a manifest's or a model card's), with
    the settings that decide only which series are accepted (``acceptance``: slice-gap
    tolerances, series selection, workers) as given. ValueError names what the plan lacks."""
    missing = [key for key in PLAN_KEYS if key not in plan]
    if missing:
        older = " (a plan made by an older ctfed: prepare the cache again with this one)" if missing == ["resample_dtype"] else ""
        raise ValueError(f"the preprocessing plan lacks {', '.join(missing)}{older}")
    if plan["orientation"] != "RAS" or plan["dtype"] != "float16" or plan["axes"] != AXES or plan["resample_dtype"] != RESAMPLE_DTYPE:
        raise ValueError(
            f"the preprocessing plan has orientation {plan['orientation']!r}, dtype {plan['dtype']!r}, axes "
            f"{plan['axes']!r}, resampling in {plan['resample_dtype']!r}; this ctfed makes RAS, float16, {AXES}, "
            f"resampling in {RESAMPLE_DTYPE}"
        )
    cfg = PreprocessConfig(
        spacing_mm=float(plan["spacing_mm"]),
        foreground_hu=float(plan["foreground_hu"]),
        output_size=int(plan["output_size"]),
        windows=[WindowConfig(**window) for window in plan["windows"]],
        gantry_tilt=str(plan["gantry_tilt"]),
        **acceptance,
    )
    if preprocessing_plan(cfg) != plan:
        raise ValueError("the preprocessing plan holds values this ctfed does not reproduce")
    return cfg


def plan_differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """``key: expected vs actual`` for every plan key where two plans differ."""
    return [
        f"{key}: {expected.get(key)!r} vs {actual.get(key)!r}"
        for key in sorted(set(expected) | set(actual))
        if expected.get(key) != actual.get(key)
    ]


def content_hash(files: list[Path]) -> str:
    """SHA-256 over the sorted per-file SHA-256s: independent of file names and order."""
    digests = sorted(hashlib.sha256(p.read_bytes()).digest() for p in files)
    return hashlib.sha256(b"".join(digests)).hexdigest()


def import_transforms() -> None:
    """Import MONAI's transforms (seconds): lazily, and once before forking workers."""
    import monai.data  # noqa: F401
    import monai.transforms  # noqa: F401


def volume_to_tensor(volume: CTVolume, cfg: PreprocessConfig) -> np.ndarray:
    """Apply the FM-CT transform chain (MONAI) to a HU volume; float16 (C, S, S, S)."""
    return transform_volume(volume, cfg)[0]


def transform_volume(volume: CTVolume, cfg: PreprocessConfig, consume: bool = False) -> tuple[np.ndarray, list[float]]:
    """``volume_to_tensor``'s array and the size in mm (z, y, x) of one of its voxels: the head's
    foreground box at ``spacing_mm`` resized to ``output_size`` per axis (so not 1 mm, and
    not isotropic: a head is longer than it is wide). ``consume``: the volume's HU array is
    released once copied (``volume.hu`` is then None), so a thin-slice series is held once,
    not twice, while it is resampled (issue #14's memory bound); the result is the same."""
    from monai.data import MetaTensor
    from monai.transforms import CropForeground, Orientation, Resize, ScaleIntensityRange, Spacing

    affine = volume.affine_lps
    affine[:2] *= -1.0  # LPS -> RAS, MONAI's world convention
    # MONAI wants the spatial axes in the affine's column order (x, y, z). Work on HU+1024
    # so that the zero padding of resampling means air, not water: shifted in place in the one
    # contiguous copy (a second copy of a 512x512x600 volume is 630 MB; issue #14's bound).
    shifted = np.ascontiguousarray(volume.hu.transpose(2, 1, 0))
    if consume:
        volume.hu = None  # type: ignore[assignment]  # the caller took what it needs of it
    shifted -= AIR_HU
    image = MetaTensor(torch.from_numpy(shifted[None]), affine=torch.as_tensor(affine))
    del shifted
    image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    image = Spacing(pixdim=(cfg.spacing_mm,) * 3, mode="bilinear", padding_mode="zeros", dtype=getattr(torch, RESAMPLE_DTYPE))(image)
    image = image + AIR_HU
    threshold = cfg.foreground_hu
    image = CropForeground(select_fn=lambda x: x > threshold, allow_smaller=True)(image)
    if min(image.shape[1:]) < 1:
        raise DicomError(f"no voxels above {threshold} HU (empty foreground)")
    channels = []
    for window in cfg.windows:
        lo, hi = window.level - window.width / 2.0, window.level + window.width / 2.0
        channels.append(ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(image))
    stacked = torch.cat([torch.as_tensor(c) for c in channels], dim=0)
    size = cfg.output_size
    resized = Resize(spatial_size=(size, size, size), mode="trilinear", anti_aliasing=True)(stacked)
    array = torch.as_tensor(resized).clamp_(0.0, 1.0).numpy()
    # Resize maps the box's extent onto `size` voxels (trilinear, corners not aligned).
    voxel_xyz_mm = [side * cfg.spacing_mm / size for side in stacked.shape[1:]]
    # (C, x, y, z) RAS -> (C, z, y, x), the numpy order used everywhere else.
    return (
        np.ascontiguousarray(array.transpose(0, 3, 2, 1)).astype(np.float16),
        [round(float(v), 4) for v in reversed(voxel_xyz_mm)],
    )


class _StudyCandidates:
    """One study's ranked series during ``prepare``: which one is cached, which are left."""

    def __init__(self, ranked: list[SeriesRef], why: dict[str, str]) -> None:
        self.ranked = list(ranked)
        self.remaining = list(ranked)
        self.why = why
        self.chosen: str | None = None  # key of the series cached for this study

    @property
    def settled(self) -> bool:
        return self.chosen is not None or not self.remaining

    def not_chosen(self, secret: bytes) -> list[Rejection]:
        """Rejections for the series left untried because another of the study was cached.

        Only keys and the configured patterns appear: descriptions are free text that
        may hold a name."""
        if self.chosen is None:
            return []
        chosen = next(r for r in self.ranked if series_key(secret, r.series_uid) == self.chosen)
        return [
            Rejection(
                f"series:{series_key(secret, ref.series_uid)}",
                f"another series of the same study was preferred: series:{self.chosen} "
                f"({self.why[chosen.series_uid]}); this one {self.why[ref.series_uid]}",
            )
            for ref in self.remaining
        ]


@dataclass
class _Job:
    key: str
    files: list[Path]
    digest: str
    # Where the volume is saved (``prepare``); None: it comes back in the result's
    # ``TENSOR_FIELD`` instead (``predict`` scores it and writes no volume).
    output_dir: Path | None
    cfg: PreprocessConfig
    label: dict[str, Any] | None
    study: str
    nifti: bool = False
    # The patient pseudonym (``patient_key``); "" when the series has no PatientID (NIfTI never has).
    patient: str = ""


# A result's in-memory volume when its job has no output folder (never in a manifest).
TENSOR_FIELD = "tensor"


def _process(job: _Job) -> dict[str, Any]:
    """Load, transform and save one series; returns a manifest entry or {'rejected': reason}."""
    try:
        if job.nifti:
            volume = load_nifti(job.files[0])
        else:
            volume = load_series(
                job.files,
                gantry_tilt=job.cfg.gantry_tilt,
                spacing_tolerance=job.cfg.slice_gap_tolerance,
                spacing_tolerance_mm=job.cfg.slice_gap_tolerance_mm,
            )
        facts = _volume_facts(volume)  # first: the transform releases the HU array
        tensor, cached_voxel_mm = transform_volume(volume, job.cfg, consume=True)
    except DicomError as err:
        return {"rejected": str(err)}
    except Exception as err:  # noqa: BLE001 - one bad series must never stop a site's run
        return {"rejected": f"unexpected {type(err).__name__} while processing"}
    name = f"{job.key}.npy"
    if job.output_dir is not None:
        # Not caught: a full disk or a read-only folder stops the prepare (common/cli.py says
        # why in one line); the manifest lists only the volumes written whole before it.
        write_bytes_atomic(job.output_dir / name, lambda handle: np.save(handle, tensor))
    entry = _entry(job, name, facts, tensor, cached_voxel_mm)
    if job.output_dir is None:
        entry[TENSOR_FIELD] = tensor
    return entry


def _volume_facts(volume: CTVolume) -> dict[str, Any]:
    """What the manifest entry keeps of the loaded volume (numbers only)."""
    hu = volume.hu
    return {
        "shape_zyx": list(hu.shape),
        "spacing_zyx_mm": [round(float(s), 4) for s in volume.spacing_zyx],
        "hu_min": round(float(hu.min()), 2),
        "hu_max": round(float(hu.max()), 2),
        "hu_mean": round(float(hu.mean()), 2),
        "slice_count": volume.slice_count,
        "notes": list(volume.warnings),
    }


def _entry(job: _Job, name: str, facts: dict[str, Any], tensor: np.ndarray, cached_voxel_mm: list[float]) -> dict[str, Any]:
    """The manifest entry of one processed series (keys and numbers only)."""
    return {
        "key": job.key,
        "study_key": job.study,
        **({"patient_key": job.patient} if job.patient else {}),
        "file": name,
        "content_hash": job.digest,
        "shape_zyx": facts["shape_zyx"],
        "spacing_zyx_mm": facts["spacing_zyx_mm"],
        CACHED_VOXEL_FIELD: cached_voxel_mm,
        "hu_min": facts["hu_min"],
        "hu_max": facts["hu_max"],
        "hu_mean": facts["hu_mean"],
        # Per window channel: mean and mean square of the cached voxels, pooled into the
        # manifest's channel_stats (what the model's input standardisation is checked against).
        "channel_mean": [round(float(c.mean()), 6) for c in tensor.astype(np.float32)],
        "channel_sq_mean": [round(float(np.square(c).mean()), 6) for c in tensor.astype(np.float32)],
        "slice_count": facts["slice_count"],
        "notes": facts["notes"],
        "label": job.label,
        "source": "nifti" if job.nifti else "dicom",
    }


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Run with ``count`` torch threads, then restore the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _worker_init() -> None:
    # Workers split the cores between them; more torch threads each only oversubscribe them.
    # With forked workers this is also what keeps torch out of OpenMP regions the parent's
    # thread pool may have left unusable (PyTorch's DataLoader workers do the same).
    torch.set_num_threads(1)


_Runner = Callable[[list[tuple["_Job", Any]]], Iterator[tuple["_Job", Any, dict[str, Any]]]]


@contextlib.contextmanager
def _job_runner(workers: int, first_round: int) -> Iterator[_Runner]:
    """A function that processes jobs and yields (job, tag, result) as each one finishes.

    Workers are forked on Linux: a spawned worker first re-imports torch and MONAI, seconds
    per worker, which made 2 workers slower than 1 on small sites. Fewer jobs than workers
    get fewer workers, and one job needs no pool at all. Each worker, and the caller when
    there is no pool, runs torch on one thread: ``workers`` is the number of cores prepare
    uses; parallelism comes from more workers. (Measured on a busy 2-core machine: the
    transform chain of a series took 6x longer on torch's default 2 threads than on 1.)
    """
    processes = min(workers, first_round)
    if processes <= 1:
        with _torch_threads(1):
            yield lambda jobs: ((job, tag, _process(job)) for job, tag in jobs)
        return
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    if method == "fork":
        import_transforms()  # inherited by every worker instead of imported by each
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=processes, mp_context=context, initializer=_worker_init) as pool:
        def run(jobs: list[tuple[_Job, Any]]) -> Iterator[tuple[_Job, Any, dict[str, Any]]]:
            futures = {pool.submit(_process, job): (job, tag) for job, tag in jobs}
            for future in as_completed(futures):
                job, tag = futures[future]
                yield job, tag, future.result()

        yield run


def read_labels(path: Path, secret: bytes) -> dict[str, dict[str, Any]]:
    """labels.csv (StudyInstanceUID, or ``file`` for NIfTI, + label columns) -> {study key: {column: value}}."""
    # utf-8-sig: spreadsheet programs often save CSV with a byte-order mark before the header.
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise ValueError(f"labels file {path} is empty")
        key_column = next((c for c in reader.fieldnames if c in (*STUDY_COLUMNS, NIFTI_FILE_COLUMN)), None)
        if key_column is None:
            raise ValueError(
                f"labels file {path} needs a 'StudyInstanceUID' column (or '{NIFTI_FILE_COLUMN}' for NIfTI "
                f"input: the path under the input folder); has {reader.fieldnames}"
            )
        labels = {}
        for row in reader:
            ident = row.pop(key_column).strip()
            key = nifti_key(secret, ident) if key_column == NIFTI_FILE_COLUMN else study_key(secret, ident)
            labels[key] = {k: _number(v) for k, v in row.items()}
    return labels


def _number(text: str | None) -> Any:
    if text is None or text.strip() == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _load_manifest(path: Path, plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Entries of an existing manifest made with the same plan, by key."""
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        logger.warning("existing manifest is unreadable; rebuilding the cache")
        return {}
    if old.get("format") != FORMAT or old.get("preprocessing") != plan:
        logger.warning("preprocessing settings changed since the cache was built; rebuilding it")
        return {}
    return {entry["key"]: entry for entry in old.get("series", [])}


@dataclass
class ProcessedSeries:
    """One series ``process_studies`` loaded and transformed (or failed to)."""

    job: _Job
    # A manifest entry (with ``TENSOR_FIELD`` when the job had no output folder), or
    # {'rejected': reason}.
    result: dict[str, Any]
    # Where it came from, for the caller's local use only (UIDs and paths: never written by
    # this module): the DICOM series, or the NIfTI file.
    series: SeriesRef | None
    nifti_path: Path | None


# reuse(series key, content hash, study key, patient key or "") -> True when the caller already holds this
# unchanged series (prepare's cache), so it is not processed again.
Reuse = Callable[[str, str, str, str], bool]


def process_studies(
    input_dir: Path,
    found: ScanResult,
    secret: bytes,
    cfg: PreprocessConfig,
    rejected: list[Rejection],
    *,
    output_dir: Path | None,
    labels: dict[str, dict[str, Any]] | None = None,
    reuse: Reuse | None = None,
    progress: bool = True,
    desc: str = "prepare",
) -> Iterator[ProcessedSeries]:
    """The per-study work ``prepare`` and ``predict`` share: every NIfTI file, and per DICOM
    study its series in ``rank_study_series`` order until one loads, loaded and transformed
    (``cfg.workers`` processes); yields each series as it finishes.

    A study whose series fails gets its next-ranked series in the following round; a series
    ``reuse`` claims counts as the study's choice without being processed. Rejections (files
    unreadable, series that failed, series left untried because another of the study was
    chosen) are appended to ``rejected``, identifier-free. With ``output_dir`` each volume is
    saved there as ``<key>.npy``; without it, it travels back in the result.
    """
    labels = labels or {}
    reused: Reuse = reuse or (lambda key, digest, study, patient: False)
    # One job per study and round: its best remaining series.
    studies = [_StudyCandidates(choice.ranked, choice.why) for choice in rank_study_series(found.series, cfg.series_selection)]
    sources: dict[str, SeriesRef | Path] = {}
    nifti_jobs: list[_Job] = []
    for path in found.nifti:
        # A NIfTI file is its own study: its key stands for both, and labels name its path.
        key = nifti_key(secret, path.relative_to(input_dir).as_posix())
        try:
            digest = content_hash([path])
        except OSError as err:
            rejected.append(Rejection(f"file:{key}", f"file unreadable ({type(err).__name__})"))
            continue
        if not reused(key, digest, key, ""):
            sources[key] = path
            nifti_jobs.append(_Job(key, [path], digest, output_dir, cfg, labels.get(key), key, nifti=True))

    def next_jobs() -> list[tuple[_Job, _StudyCandidates | None]]:
        jobs: list[tuple[_Job, _StudyCandidates | None]] = []
        for study in studies:
            while study.remaining and study.chosen is None:
                ref = study.remaining.pop(0)
                key = series_key(secret, ref.series_uid)
                try:
                    digest = content_hash(ref.files)
                except OSError as err:
                    rejected.append(Rejection(f"series:{key}", f"files unreadable ({type(err).__name__})"))
                    continue
                study_ref = study_key(secret, ref.study_uid)
                patient_ref = patient_key(secret, ref.patient_id)
                if reused(key, digest, study_ref, patient_ref):
                    study.chosen = key
                    continue
                sources[key] = ref
                jobs.append((
                    _Job(key, ref.files, digest, output_dir, cfg, labels.get(study_ref), study_ref,
                         patient=patient_ref),
                    study,
                ))
                break
        return jobs

    bar = tqdm(total=len(studies) + len(nifti_jobs), desc=desc, unit="study", disable=not progress)
    first: list[tuple[_Job, _StudyCandidates | None]] = [(job, None) for job in nifti_jobs] + next_jobs()
    with _job_runner(cfg.workers, len(first)) as run_jobs:
        round_jobs = first
        while round_jobs:
            for job, study, result in run_jobs(round_jobs):
                if "rejected" in result:
                    rejected.append(Rejection(f"series:{job.key}", result["rejected"]))
                    logger.warning("series %s rejected: %s", job.key, result["rejected"])
                elif study is not None:
                    study.chosen = job.key
                source = sources.pop(job.key)
                yield ProcessedSeries(
                    job, result,
                    series=source if isinstance(source, SeriesRef) else None,
                    nifti_path=source if isinstance(source, Path) else None,
                )
                if study is None or study.settled:
                    bar.update()
            round_jobs = next_jobs()
    bar.update(bar.total - bar.n)  # studies the caller already held
    bar.close()
    for study in studies:
        rejected.extend(study.not_chosen(secret))


PREPARE_LOCK = ".prepare.lock"


@contextlib.contextmanager
def _only_writer(output_dir: Path) -> Iterator[None]:
    """Hold ``output_dir``'s prepare lock (an advisory ``flock``, released when the process
    ends, however it ends). Two prepares writing one cache would rewrite each other's manifest
    (each starts from an empty series list) and race on its temporary file."""
    with open(output_dir / PREPARE_LOCK, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another 'ctfed prepare' is writing the cache {output_dir} now; wait for it to finish "
                "(a second one then only adds what is new) or prepare into another folder"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare(
    input_dir: Path,
    output_dir: Path,
    cfg: PreprocessConfig,
    labels_csv: Path | None = None,
    progress: bool = True,
) -> PrepareSummary:
    """Build or update the cache in ``output_dir`` from ``input_dir``: a tree of DICOM files,
    NIfTI volumes (``.nii``/``.nii.gz``, values in HU), or both."""
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder does not exist: {input_dir}")
    output_dir.mkdir(parents=True, exist_ok=True)
    with _only_writer(output_dir):
        return _prepare(input_dir, output_dir, cfg, labels_csv, progress)


def _prepare(input_dir: Path, output_dir: Path, cfg: PreprocessConfig, labels_csv: Path | None, progress: bool) -> PrepareSummary:
    secret = site_secret(output_dir)
    plan = preprocessing_plan(cfg)
    manifest_path = output_dir / MANIFEST
    previous = _load_manifest(manifest_path, plan)
    labels = read_labels(labels_csv, secret) if labels_csv is not None else {}

    found = scan(input_dir, secret)
    rejected: list[Rejection] = list(found.rejected)
    entries: dict[str, dict[str, Any]] = {}
    cached = 0

    def write_manifest() -> None:
        series = [entries[k] for k in sorted(entries)]
        write_json_atomic(manifest_path, {
            "format": FORMAT,
            "preprocessing": plan,
            "channel_stats": channel_stats(series),
            "series": series,
            "rejected": [asdict(r) for r in rejected],
        })

    def reuse(key: str, digest: str, label_key: str, patient: str) -> bool:
        """Take an unchanged series from the previous manifest (labels and, for a cache from
        before patient pseudonyms, its ``patient_key`` may have changed)."""
        nonlocal cached
        old = previous.get(key)
        if not (old and old.get("content_hash") == digest and (output_dir / old["file"]).exists()):
            return False
        if CACHED_VOXEL_FIELD not in old:
            return False
        old["label"] = labels.get(label_key, old.get("label")) if labels else old.get("label")
        if patient:
            old["patient_key"] = patient
        else:
            old.pop("patient_key", None)
        entries[key] = old
        cached += 1
        logger.debug("series %s unchanged; using the cache", key)
        return True

    write_manifest()
    for done in process_studies(
        input_dir, found, secret, cfg, rejected, output_dir=output_dir, labels=labels, reuse=reuse, progress=progress
    ):
        if "rejected" not in done.result:
            entries[done.job.key] = done.result
            logger.debug("series %s cached as %s", done.job.key, done.result["file"])
        write_manifest()

    write_manifest()
    report_path = output_dir / REPORT
    write_text_atomic(report_path, report_text(plan, entries, rejected, cached, acceptance_lines(cfg)))
    accepted = len(entries) - cached
    logger.info("prepare: %d new, %d cached, %d rejected", accepted, cached, len(rejected))
    return PrepareSummary(accepted=accepted, cached=cached, rejected=len(rejected),
                          manifest=manifest_path, report=report_path)


def acceptance_lines(cfg: PreprocessConfig) -> list[str]:
    """Report lines for the settings that decide which series are cached (not how)."""
    selection = cfg.series_selection
    if selection.per_study == SeriesPerStudy.all:
        chosen = "- series per study: all usable series"
    else:
        chosen = (
            "- series per study: one; preferred patterns (best first): "
            + ", ".join(f"`{p}`" for p in selection.preferred)
            + "; excluded (taken only if nothing else loads): "
            + ", ".join(f"`{p}`" for p in selection.excluded)
            + f"; then {selection.tie_break.value.replace('_', ' ')}"
        )
    return [
        chosen,
        f"- slice gaps may deviate from the median by max({cfg.slice_gap_tolerance:.0%}, "
        f"{cfg.slice_gap_tolerance_mm:g} mm); larger deviations reject the series",
    ]


def report_text(
    plan: dict[str, Any],
    entries: dict[str, dict[str, Any]],
    rejected: list[Rejection],
    cached: int,
    acceptance: list[str] | None = None,
    title: str = "Site preprocessing report",
    count_line: str | None = None,
) -> str:
    """Human-readable account of the cache, in the spirit of nnU-Net's plans file (``ctfed
    predict`` writes the same for the series it scored: its ``title`` and ``count_line``)."""
    lines = [
        f"# {title}",
        "",
        count_line or f"- series in cache: {len(entries)} ({cached} unchanged from the previous run)",
        f"- rejected: {len(rejected)}",
        "",
        "## Plan",
        "",
        f"1. orient {plan['orientation']}",
        f"2. resample to {plan['spacing_mm']} mm isotropic (bilinear)",
        f"3. crop to the bounding box of HU > {plan['foreground_hu']}",
        "4. window channels, clipped and scaled to [0, 1]: "
        + ", ".join(f"{w['name']} (L{w['level']:g}/W{w['width']:g})" for w in plan["windows"]),
        f"5. resize to {plan['output_size']}^3 (trilinear, anti-aliased), store {plan['dtype']} ({plan['axes']})",
        f"- gantry-tilted series: {plan['gantry_tilt']}",
        *(acceptance or []),
        "",
        "## Series",
        "",
        "| key | slices | shape z,y,x | spacing z,y,x (mm) | HU min / mean / max | label | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in sorted(entries):
        e = entries[key]
        label = ", ".join(f"{k}={v}" for k, v in (e.get("label") or {}).items()) or "-"
        lines.append(
            f"| {key} | {e['slice_count']} | {'x'.join(map(str, e['shape_zyx']))} | "
            f"{', '.join(f'{s:g}' for s in e['spacing_zyx_mm'])} | "
            f"{e['hu_min']:.0f} / {e['hu_mean']:.0f} / {e['hu_max']:.0f} | {label} | {'; '.join(e.get('notes') or []) or '-'} |"
        )
    lines += ["", "## Rejected", ""]
    if rejected:
        lines += ["| ref | reason |", "|---|---|"] + [f"| {r.ref} | {r.reason} |" for r in rejected]
    else:
        lines.append("none")
    return "\n".join(lines) + "\n"


def channel_stats(entries: list[dict[str, Any]]) -> dict[str, list[float]] | None:
    """Per-channel mean and std over a cache's volumes (every volume weighs the same), from
    the entries' channel means and mean squares; None if no entry has them (older caches)."""
    rows = [e for e in entries if e.get("channel_mean") and e.get("channel_sq_mean")]
    if not rows:
        return None
    mean = np.mean([e["channel_mean"] for e in rows], axis=0)
    sq_mean = np.mean([e["channel_sq_mean"] for e in rows], axis=0)
    std = np.sqrt(np.maximum(sq_mean - mean**2, 0.0))
    return {"mean": [round(float(m), 4) for m in mean], "std": [round(float(v), 4) for v in std], "volumes": len(rows)}


def input_stats_mismatch(
    stats: dict[str, Any] | None, model_mean: list[float], model_std: list[float], tolerance: float = 0.5
) -> str | None:
    """Why a cache's channel statistics do not fit a model's input standardisation (a channel
    mean more than ``tolerance`` model stds away, or a std off by more than a factor 2), else None."""
    if not stats:
        return None
    if len(stats["mean"]) != len(model_mean):
        return f"the cache has {len(stats['mean'])} channels, the model standardises {len(model_mean)}"
    problems = []
    for channel, (mean, std, m_mean, m_std) in enumerate(zip(stats["mean"], stats["std"], model_mean, model_std)):
        if abs(mean - m_mean) > tolerance * m_std or not 0.5 <= std / m_std <= 2.0:
            problems.append(f"channel {channel}: mean {mean:.3f} / std {std:.3f} vs the model's {m_mean:.3f} / {m_std:.3f}")
    return "; ".join(problems) or None


def volume_path(volumes_dir: Path, entry: dict[str, Any], manifest: Path) -> Path:
    """Where an entry's volume lives: its ``file`` under ``volumes_dir``, which it may not leave
    (a manifest must not make a site read files outside its cache or pool)."""
    name = Path(str(entry.get("file", "")))
    if not name.parts or name.is_absolute() or ".." in name.parts:
        raise ValueError(f"{manifest}: entry {entry.get('key', '?')} has file '{name}'; expected a path inside the cache")
    return volumes_dir / name


class CachedVolumes(torch.utils.data.Dataset):
    """The prepared volumes of one site as float32 tensors (C, S, S, S)."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)
        manifest = self.cache_dir / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(
                f"no {MANIFEST} in {self.cache_dir}; run `ctfed prepare --input <dicom> --output {self.cache_dir}`"
            )
        data = json.loads(manifest.read_text(encoding="utf-8"))
        self.entries: list[dict[str, Any]] = data.get("series", [])
        if not self.entries:
            raise ValueError(f"the cache in {self.cache_dir} holds no series (see its {REPORT})")
        self.preprocessing: dict[str, Any] = data.get("preprocessing", {})
        self.channel_stats: dict[str, Any] | None = data.get("channel_stats") or channel_stats(self.entries)
        self.labels: list[dict[str, Any] | None] = [e.get("label") for e in self.entries]
        # Where the entries' files are: the cache itself, or the pool a manifest view names.
        self.volumes_dir = Path(data[VOLUMES_DIR_FIELD]) if data.get(VOLUMES_DIR_FIELD) else self.cache_dir
        self.volume_paths = [volume_path(self.volumes_dir, entry, manifest) for entry in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def subset(self, indices: Sequence[int]) -> CachedVolumes:
        """The same cache restricted to ``indices`` (in that order); its channel statistics stay
        the whole cache's (what the model's input standardisation was checked against)."""
        view = copy.copy(self)
        view.entries = [self.entries[i] for i in indices]
        view.labels = [self.labels[i] for i in indices]
        view.volume_paths = [self.volume_paths[i] for i in indices]
        return view

    def cached_voxel_mm(self) -> tuple[float, float, float] | None:
        """The median cached voxel size (z, y, x) in mm over the entries that record it (None if none
        does): one size for the site's views, since heads differ in size by about 10%."""
        sizes = [entry[CACHED_VOXEL_FIELD] for entry in self.entries if len(entry.get(CACHED_VOXEL_FIELD) or ()) == 3]
        if not sizes:
            return None
        z, y, x = (float(v) for v in np.median(np.asarray(sizes, dtype=np.float64), axis=0))
        return z, y, x

    def __getitem__(self, index: int) -> torch.Tensor:
        array = np.load(self.volume_paths[index], mmap_mode="r")
        return torch.from_numpy(np.asarray(array, dtype=np.float32))
