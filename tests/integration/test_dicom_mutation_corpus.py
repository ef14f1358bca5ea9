"""`ctfed prepare` against a corpus of broken DICOM built here (issue #14, "Faults and bad input").

Each mutant starts from a real file (a slice of a synthetic series, pydicom's CT and MR samples),
gets its own study, series and instance UIDs (so it can never join a good series) and is then
broken: cut short at many offsets, bytes flipped in its header and in its pixels, element
lengths and VRs rewritten in the raw bytes, pixel data removed, absurd dimensions, a frame
count of 2^31 - 1; and whole copies of a good series, native or compressed (RLE, JPEG 2000,
JPEG-LS), with one slice's bytes flipped or cut, so the decoders meet them. ``ctfed prepare`` runs in its own process over the good series and every
mutant together and must finish within a time bound, stay under a memory bound, cache every
good series and reject (with a reason, no traceback, no identifier) every mutant that has no
usable pixels.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from ctfed.simulations.bench.prepare_memory_bench import run_cli_measuring_peak
from ctfed.simulations.data.synth import synthesize_federation

# What one prepare of this corpus may take: well above the ~20 s it needs idle, far below a hang.
TIME_BOUND_S = 240
# Peak resident memory of the prepare process: the interpreter with torch and MONAI is about
# 0.5 GB; decoding one of the mutants' declared sizes (65535^2 x 2 bytes, 2^31 frames) would be
# gigabytes. The bound the site's operator can rely on for this input.
MEMORY_BOUND_MB = 1536
SAMPLES = ("CT_small.dcm", "MR_small.dcm")


def _fresh_uids(path: Path, out: Path, edit: Callable[[pydicom.Dataset], None] | None = None) -> bytes:
    """``path`` rewritten with new study, series and instance UIDs (and ``edit`` applied), as bytes."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    if "MediaStorageSOPInstanceUID" in ds.file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if edit is not None:
        edit(ds)
    ds.save_as(out, enforce_file_format=False)
    data = out.read_bytes()
    out.unlink()
    return data


def _patch_element(data: bytes, tag: tuple[int, int], vr: bytes | None = None, length: int | None = None) -> bytes:
    """The raw bytes with the first explicit-VR little-endian header of ``tag`` rewritten: another
    VR and/or another declared length (the value bytes stay as they were)."""
    group, element = tag
    key = struct.pack("<HH", group, element)
    at = data.find(key, 132)
    if at < 0:
        raise AssertionError(f"tag {tag} not found")
    old_vr = data[at + 4 : at + 6]
    long_form = old_vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN")
    header = bytearray(data[at : at + (12 if long_form else 8)])
    if vr is not None:
        header[4:6] = vr
    if length is not None:
        if long_form:
            header[8:12] = struct.pack("<I", length)
        else:
            header[6:8] = struct.pack("<H", length)
    return data[:at] + bytes(header) + data[at + len(header) :]


def _flip(data: bytes, start: int, stop: int, count: int, seed: int) -> bytes:
    rng = random.Random(seed)
    out = bytearray(data)
    for _ in range(count):
        position = rng.randrange(start, min(stop, len(out)))
        out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


def _corpus(source: Path, out: Path) -> dict[str, bool]:
    """Write the mutants of ``source`` into ``out``; ``{name: must be rejected}`` (flipped
    pixel bits, for one, still decode: such a file may be cached)."""
    name = source.stem
    mutants: dict[str, tuple[bytes, bool]] = {}
    clean = _fresh_uids(source, out / "tmp.dcm")
    pixels_at = clean.rfind(struct.pack("<HH", 0x7FE0, 0x0010))
    for fraction in (0.0, 0.05, 0.25, 0.5, 0.75, 0.999):
        cut = max(132, int(len(clean) * fraction)) if fraction else 100  # 100: inside the preamble
        mutants[f"cut_{fraction:g}"] = (clean[:cut], True)
    mutants["cut_in_pixel_header"] = (clean[: pixels_at + 6], True)
    for seed in range(6):
        # Header bits: anything may break, or nothing that matters; it must not crash or hang.
        mutants[f"flip_header_{seed}"] = (_flip(clean, 132, pixels_at, 24, seed), False)
        mutants[f"flip_pixels_{seed}"] = (_flip(clean, pixels_at + 12, len(clean), 64, seed), False)
    mutants["rows_length_huge"] = (_patch_element(clean, (0x0028, 0x0010), length=0xFFF0), True)
    mutants["pixel_length_past_end"] = (_patch_element(clean, (0x7FE0, 0x0010), length=0xFFFFFFF0), True)
    mutants["pixel_length_odd"] = (_patch_element(clean, (0x7FE0, 0x0010), length=len(clean) - pixels_at - 13), True)
    mutants["rows_as_sequence"] = (_patch_element(clean, (0x0028, 0x0010), vr=b"SQ"), False)
    mutants["rows_as_text"] = (_patch_element(clean, (0x0028, 0x0010), vr=b"LO"), False)
    mutants["position_as_bytes"] = (_patch_element(clean, (0x0020, 0x0032), vr=b"OB"), False)

    def edited(edit: Callable[[pydicom.Dataset], None]) -> bytes:
        return _fresh_uids(source, out / "tmp.dcm", edit)

    mutants["no_pixel_data"] = (edited(lambda ds: delattr(ds, "PixelData")), True)
    mutants["rows_65535"] = (edited(lambda ds: setattr(ds, "Rows", 65535)), True)
    mutants["rows_and_columns_65535"] = (edited(lambda ds: (setattr(ds, "Rows", 65535), setattr(ds, "Columns", 65535))), True)
    mutants["rows_0"] = (edited(lambda ds: setattr(ds, "Rows", 0)), True)
    mutants["bits_allocated_0"] = (edited(lambda ds: setattr(ds, "BitsAllocated", 0)), True)
    mutants["bits_allocated_64"] = (edited(lambda ds: setattr(ds, "BitsAllocated", 64)), True)
    mutants["samples_per_pixel_3"] = (edited(lambda ds: setattr(ds, "SamplesPerPixel", 3)), True)
    mutants["frames_2147483647"] = (edited(lambda ds: setattr(ds, "NumberOfFrames", 2147483647)), True)
    mutants["frames_negative"] = (edited(lambda ds: setattr(ds, "NumberOfFrames", -5)), True)
    for key, (data, must_reject) in mutants.items():
        (out / f"{name}_{key}").write_bytes(data)
    return {f"{name}_{key}": must_reject for key, (_, must_reject) in mutants.items()}


def _series_mutants(slices: list[Path], out: Path) -> dict[str, bool]:
    """Whole copies of a good series, each its own series, with one slice broken after an
    optional compression (native, RLE, JPEG 2000, JPEG-LS): the decoders meet the broken bytes.
    ``{name: must be rejected}``; a flipped bit in pixels may still decode (cached or not)."""
    broken = len(slices) // 2
    variants: dict[str, tuple[str | None, Callable[[bytes], bytes], bool]] = {
        "native_pixels_flipped": (None, lambda b: _flip(b, len(b) - 4000, len(b), 200, 1), False),
        "native_slice_cut": (None, lambda b: b[: len(b) // 2], False),
        "rle_stream_flipped": (RLELossless, lambda b: _flip(b, len(b) - 2000, len(b), 200, 2), False),
        "rle_slice_cut": (RLELossless, lambda b: b[: len(b) - len(b) // 3], False),
        "j2k_stream_flipped": (JPEG2000Lossless, lambda b: _flip(b, len(b) - 2000, len(b), 200, 3), False),
        "j2k_slice_cut": (JPEG2000Lossless, lambda b: b[: len(b) - len(b) // 3], False),
        "jpegls_stream_flipped": (JPEGLSLossless, lambda b: _flip(b, len(b) - 2000, len(b), 200, 4), False),
    }
    for name, (syntax, mutate, _) in variants.items():
        folder = out / name
        folder.mkdir()
        study, series = generate_uid(), generate_uid()
        for index, path in enumerate(slices):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            if syntax is not None:
                ds.compress(syntax, generate_instance_uid=False)
            target = folder / f"{index:03d}.dcm"
            ds.save_as(target, enforce_file_format=True)
            if index == broken:
                target.write_bytes(mutate(target.read_bytes()))
    return {name: must_reject for name, (_, _, must_reject) in variants.items()}


def _prepare(input_dir: Path, output: Path) -> tuple[int, float, float, str]:
    """``ctfed prepare`` in a child process: (exit code, seconds, peak RSS in MB, output)."""
    started = time.monotonic()
    try:
        done, peak_mb = run_cli_measuring_peak(
            ["prepare", "--input", str(input_dir), "--output", str(output), "--size", "32", "--no-progress"], timeout=TIME_BOUND_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"ctfed prepare did not finish within {TIME_BOUND_S} s on the mutation corpus:\n{str(err.output)[-3000:]}")
    return done.returncode, time.monotonic() - started, peak_mb, done.stdout


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("mutants")
    site = synthesize_federation(root / "synth", sites=1, scans_per_site=2, seed=3)[0]
    input_dir = root / "input"
    shutil.copytree(site, input_dir / "good")
    mutant_dir = input_dir / "mutants"
    mutant_dir.mkdir()
    good_slices = sorted(p for p in (input_dir / "good").rglob("*") if p.is_file() and p.suffix != ".csv")
    # A CT slice of the synthetic series (the dataset ctfed writes) and pydicom's own samples.
    sources = [next(p for p in good_slices if pydicom.dcmread(p, stop_before_pixels=True).get("ImageType", [""])[-1:] != ["LOCALIZER"])]
    sources += [Path(get_testdata_file(name)) for name in SAMPLES]
    must_reject: dict[str, bool] = {}
    for source in sources:
        target = mutant_dir / source.stem
        target.mkdir()
        must_reject.update({f"{source.stem}/{k}": v for k, v in _corpus(source, target).items()})
    uid = pydicom.dcmread(sources[0], stop_before_pixels=True).SeriesInstanceUID
    series_slices = [p for p in good_slices if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == uid]
    (mutant_dir / "series").mkdir()
    series_mutants = _series_mutants(series_slices, mutant_dir / "series")
    code, seconds, peak_mb, output = _prepare(input_dir, root / "cache")
    manifest = json.loads((root / "cache" / "manifest.json").read_text()) if (root / "cache" / "manifest.json").is_file() else {}
    return {"code": code, "seconds": seconds, "peak_mb": peak_mb, "output": output, "manifest": manifest,
            "must_reject": must_reject, "mutant_files": len(must_reject), "series_mutants": series_mutants}


def test_prepare_finishes_in_bounded_time_and_memory(prepared: dict) -> None:
    assert prepared["code"] == 0, prepared["output"][-3000:]
    assert prepared["seconds"] < TIME_BOUND_S
    assert prepared["peak_mb"] < MEMORY_BOUND_MB, f"peak RSS {prepared['peak_mb']:.0f} MB"
    assert "Traceback" not in prepared["output"], prepared["output"][-3000:]


def test_every_good_series_is_cached_beside_the_mutants(prepared: dict) -> None:
    series = prepared["manifest"]["series"]
    # The two synthetic head CTs, plus whichever broken copies of one still made a volume (a
    # slice whose flipped pixels decode, or a cut slice the series does without); no one-file
    # mutant is a volume.
    good = 2
    assert good <= len(series) <= good + len(prepared["series_mutants"]), [e.get("reason") for e in prepared["manifest"]["rejected"]]


def test_each_mutant_without_usable_pixels_is_rejected_with_a_reason(prepared: dict) -> None:
    rejected = prepared["manifest"]["rejected"]
    certain = sum(prepared["must_reject"].values())
    # Every mutant is its own one-file series: a rejection each, by file or by series.
    assert len(rejected) >= certain
    for rejection in rejected:
        assert rejection["reason"].strip() and "Traceback" not in rejection["reason"]
        assert rejection["ref"].startswith(("file:", "series:"))
        assert "mutants" not in rejection["ref"] and "/" not in rejection["ref"]  # no path, no file name
