"""Turn a site's DICOM folder into a training cache: ``<key>.npy`` + manifest + report.

The FM-CT recipe per series: orient RAS, resample to ``spacing_mm`` isotropic, crop to the
head (HU > ``foreground_hu``), one [0, 1] channel per CT window, resize to
``output_size``^3, store float16 (C, z, y, x) with z inferior->superior, y posterior->
anterior, x left->right.

The cache is incremental and crash-safe: the manifest is rewritten atomically after every
series, and a series whose file contents hash to a manifest entry is skipped. Outputs are
pseudonymous: series and studies appear only as keyed hashes (``privacy.pseudonym``), and
nothing from the DICOM header that identifies a patient is ever written or logged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ctfed.common.config import PreprocessConfig
from ctfed.common.dicom import (
    AIR_HU,
    CTVolume,
    DicomError,
    Rejection,
    load_series,
    scan,
    series_key,
    study_key,
)
from ctfed.common.fileio import write_json_atomic
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
# A manifest *view* (simulations/split.py: one simulated site cut from a pooled cache) names
# the folder its entries' files live in, so the volumes are referenced, never copied.
VOLUMES_DIR_FIELD = "volumes_dir"
# Where a run folder keeps those views, and the split's summary (results.json "data_split").
SPLIT_DIR = "split"
SPLIT_SUMMARY = "split.json"


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
    }


def content_hash(files: list[Path]) -> str:
    """SHA-256 over the sorted per-file SHA-256s: independent of file names and order."""
    digests = sorted(hashlib.sha256(p.read_bytes()).digest() for p in files)
    return hashlib.sha256(b"".join(digests)).hexdigest()


def volume_to_tensor(volume: CTVolume, cfg: PreprocessConfig) -> np.ndarray:
    """Apply the FM-CT transform chain (MONAI) to a HU volume; float16 (C, S, S, S)."""
    from monai.data import MetaTensor
    from monai.transforms import CropForeground, Orientation, Resize, ScaleIntensityRange, Spacing

    affine = volume.affine_lps
    affine[:2] *= -1.0  # LPS -> RAS, MONAI's world convention
    # MONAI wants the spatial axes in the affine's column order (x, y, z). Work on HU+1024
    # so that the zero padding of resampling means air, not water.
    image = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(volume.hu.transpose(2, 1, 0))[None] - AIR_HU),
        affine=torch.as_tensor(affine),
    )
    image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    image = Spacing(pixdim=(cfg.spacing_mm,) * 3, mode="bilinear", padding_mode="zeros")(image)
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
    # (C, x, y, z) RAS -> (C, z, y, x), the numpy order used everywhere else.
    return np.ascontiguousarray(array.transpose(0, 3, 2, 1)).astype(np.float16)


@dataclass
class _Job:
    key: str
    files: list[Path]
    digest: str
    output_dir: Path
    cfg: PreprocessConfig
    label: dict[str, Any] | None
    study: str
    nifti: bool = False


def _process(job: _Job) -> dict[str, Any]:
    """Load, transform and save one series; returns a manifest entry or {'rejected': reason}."""
    try:
        if job.nifti:
            volume = load_nifti(job.files[0])
        else:
            volume = load_series(job.files, gantry_tilt=job.cfg.gantry_tilt)
        tensor = volume_to_tensor(volume, job.cfg)
    except DicomError as err:
        return {"rejected": str(err)}
    except Exception as err:  # noqa: BLE001 - one bad series must never stop a site's run
        return {"rejected": f"unexpected {type(err).__name__} while processing"}
    name = f"{job.key}.npy"
    tmp = job.output_dir / f".{name}.tmp"
    with open(tmp, "wb") as handle:
        np.save(handle, tensor)
    os.replace(tmp, job.output_dir / name)
    hu = volume.hu
    return {
        "key": job.key,
        "study_key": job.study,
        "file": name,
        "content_hash": job.digest,
        "shape_zyx": list(hu.shape),
        "spacing_zyx_mm": [round(float(s), 4) for s in volume.spacing_zyx],
        "hu_min": round(float(hu.min()), 2),
        "hu_max": round(float(hu.max()), 2),
        "hu_mean": round(float(hu.mean()), 2),
        "slice_count": volume.slice_count,
        "notes": volume.warnings,
        "label": job.label,
        "source": "nifti" if job.nifti else "dicom",
    }


def read_labels(path: Path, secret: bytes) -> dict[str, dict[str, Any]]:
    """labels.csv (StudyInstanceUID, or ``file`` for NIfTI, + label columns) -> {study key: {column: value}}."""
    with open(path, newline="") as handle:
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
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        logger.warning("existing manifest is unreadable; rebuilding the cache")
        return {}
    if old.get("format") != FORMAT or old.get("preprocessing") != plan:
        logger.warning("preprocessing settings changed since the cache was built; rebuilding it")
        return {}
    return {entry["key"]: entry for entry in old.get("series", [])}


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
    secret = site_secret(output_dir)
    plan = preprocessing_plan(cfg)
    manifest_path = output_dir / MANIFEST
    previous = _load_manifest(manifest_path, plan)
    labels = read_labels(labels_csv, secret) if labels_csv is not None else {}

    found = scan(input_dir, secret)
    rejected: list[Rejection] = list(found.rejected)
    entries: dict[str, dict[str, Any]] = {}
    jobs: list[_Job] = []
    cached = 0
    for ref in found.series:
        key = series_key(secret, ref.series_uid)
        try:
            digest = content_hash(ref.files)
        except OSError as err:
            rejected.append(Rejection(f"series:{key}", f"files unreadable ({type(err).__name__})"))
            continue
        study = study_key(secret, ref.study_uid)
        old = previous.get(key)
        if old and old.get("content_hash") == digest and (output_dir / old["file"]).exists():
            old["label"] = labels.get(study, old.get("label")) if labels else old.get("label")
            entries[key] = old
            cached += 1
            logger.debug("series %s unchanged; using the cache", key)
            continue
        jobs.append(_Job(key, ref.files, digest, output_dir, cfg, labels.get(study), study))
    for path in found.nifti:
        # A NIfTI file is its own study: its key stands for both, and labels name its path.
        key = nifti_key(secret, path.relative_to(input_dir).as_posix())
        try:
            digest = content_hash([path])
        except OSError as err:
            rejected.append(Rejection(f"file:{key}", f"file unreadable ({type(err).__name__})"))
            continue
        old = previous.get(key)
        if old and old.get("content_hash") == digest and (output_dir / old["file"]).exists():
            old["label"] = labels.get(key, old.get("label")) if labels else old.get("label")
            entries[key] = old
            cached += 1
            continue
        jobs.append(_Job(key, [path], digest, output_dir, cfg, labels.get(key), key, nifti=True))

    def write_manifest() -> None:
        write_json_atomic(manifest_path, {
            "format": FORMAT,
            "preprocessing": plan,
            "series": [entries[k] for k in sorted(entries)],
            "rejected": [asdict(r) for r in rejected],
        })

    def record(job: _Job, result: dict[str, Any]) -> None:
        if "rejected" in result:
            rejected.append(Rejection(f"series:{job.key}", result["rejected"]))
            logger.warning("series %s rejected: %s", job.key, result["rejected"])
        else:
            entries[job.key] = result
            logger.debug("series %s cached as %s", job.key, result["file"])
        write_manifest()

    write_manifest()
    bar = tqdm(total=len(jobs), desc="prepare", unit="series", disable=not progress)
    if cfg.workers > 1 and len(jobs) > 1:
        # spawn: forking a process that already runs torch threads can deadlock.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=context) as pool:
            futures = {pool.submit(_process, job): job for job in jobs}
            for future in as_completed(futures):
                record(futures[future], future.result())
                bar.update()
    else:
        for job in jobs:
            record(job, _process(job))
            bar.update()
    bar.close()

    write_manifest()
    report_path = output_dir / REPORT
    report_path.write_text(_report(plan, entries, rejected, cached))
    accepted = len(entries) - cached
    logger.info("prepare: %d new, %d cached, %d rejected", accepted, cached, len(rejected))
    return PrepareSummary(accepted=accepted, cached=cached, rejected=len(rejected),
                          manifest=manifest_path, report=report_path)


def _report(plan: dict[str, Any], entries: dict[str, dict[str, Any]], rejected: list[Rejection], cached: int) -> str:
    """Human-readable account of the cache, in the spirit of nnU-Net's plans file."""
    lines = [
        "# Site preprocessing report",
        "",
        f"- series in cache: {len(entries)} ({cached} unchanged from the previous run)",
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
        data = json.loads(manifest.read_text())
        self.entries: list[dict[str, Any]] = data.get("series", [])
        if not self.entries:
            raise ValueError(f"the cache in {self.cache_dir} holds no series (see its {REPORT})")
        self.preprocessing: dict[str, Any] = data.get("preprocessing", {})
        self.labels: list[dict[str, Any] | None] = [e.get("label") for e in self.entries]
        volumes_dir = Path(data[VOLUMES_DIR_FIELD]) if data.get(VOLUMES_DIR_FIELD) else self.cache_dir
        self.volume_paths = [volume_path(volumes_dir, entry, manifest) for entry in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> torch.Tensor:
        array = np.load(self.volume_paths[index], mmap_mode="r")
        return torch.from_numpy(np.asarray(array, dtype=np.float32))
