"""Peak memory of ``ctfed prepare`` on one thin-slice hospital series (issue #14).

``python -m ctfed.simulations.bench.prepare_memory_bench`` writes one synthetic axial head CT of
512 x 512 pixels and 600 slices (uncompressed, 0.47 mm pixels, 0.4 mm slices: 315 MB of
pixels) and runs ``ctfed prepare`` on it in a fresh process at the default output size with one
worker, into a fresh cache folder; the process reports its own peak resident memory (VmHWM)
as it exits. The goal
is 2 GB for such a series; one worker processes one series at a time, so the figure is the
bound per worker (``--workers N``: about N times it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

GOAL_MB = 2048
# The child runs the real command and says how much memory it held at most.
_CHILD = (
    "import sys\n"
    "from ctfed.common.cli import main\n"
    "from ctfed.common.processes import peak_rss_mb\n"
    "code = main(sys.argv[1:])\n"
    "print('peak-rss-mb', peak_rss_mb(), flush=True)\n"
    "sys.exit(code)\n"
)


def run_cli_measuring_peak(args: list[str], timeout: float | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    """``ctfed <args>`` in a fresh process: the finished process (stderr folded into stdout) and
    its peak resident memory in MB (infinity where it died before saying)."""
    done = subprocess.run([sys.executable, "-c", _CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, check=False, timeout=timeout)
    peaks = [float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("peak-rss-mb ")]
    return done, peaks[-1] if peaks else float("inf")


def write_thin_series(out: Path, matrix: int, slices: int, slice_mm: float, factor: int = 4) -> Path:
    """One synthetic head CT of ``slices`` x ``matrix``^2 under ``out``; returns the site folder.

    The phantom is rendered at 1/``factor`` of the size (rendering 512^2 x 600 at once would
    take about 18 GB here) and each of its slices written ``factor`` times, each pixel repeated
    ``factor`` x ``factor``, with the geometry of the fine grid: one slice in memory at a time.
    Memory, not anatomy, is what this series is for."""
    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    from ctfed.simulations.data.synth import PROFILES, write_scan

    coarse = replace(PROFILES[0], matrix=matrix // factor, slices=slices // factor, slice_thickness_mm=slice_mm * factor)
    source = out.parent / f"{out.name}-coarse"
    write_scan(source, coarse, site=0, scan=0, seed=0)
    files = [p for p in source.rglob("*") if p.is_file() and p.suffix != ".csv"]
    headers = [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in files]
    axial = sorted(((p, d) for p, d in headers if "LOCALIZER" not in [str(v).upper() for v in d.get("ImageType", [])]),
                   key=lambda item: float(item[1].ImagePositionPatient[2]))
    series, folder, number = generate_uid(), out / "thin", 0
    folder.mkdir(parents=True, exist_ok=True)
    for path, _ in axial:
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array
        pixels = np.repeat(np.repeat(stored, factor, axis=0), factor, axis=1).astype(stored.dtype).tobytes()
        rows, columns = stored.shape[0] * factor, stored.shape[1] * factor
        spacing = [float(v) / factor for v in ds.PixelSpacing]
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        for sub in range(factor):
            number += 1
            ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.Rows, ds.Columns = rows, columns
            ds.PixelSpacing = spacing
            ds.SliceThickness = slice_mm
            # The first pixel's centre moves with the finer grid; slices step by slice_mm.
            shift = (factor - 1) / 2 * spacing[0]
            ds.ImagePositionPatient = [x - shift, y - shift, z + sub * slice_mm]
            ds.InstanceNumber = number
            ds.PixelData = pixels
            ds.save_as(folder / f"IM{number:05d}.dcm", enforce_file_format=True)
    shutil.rmtree(source)
    return out


def measure_prepare(site_dir: Path, cache_dir: Path, extra: list[str]) -> dict[str, Any]:
    """``ctfed prepare`` of ``site_dir`` in a child process: its peak RSS and wall time."""
    started = time.perf_counter()
    done, peak_mb = run_cli_measuring_peak(["prepare", "--input", str(site_dir), "--output", str(cache_dir), "--no-progress", *extra])
    seconds = time.perf_counter() - started
    if done.returncode != 0 or peak_mb == float("inf"):
        raise RuntimeError(f"ctfed prepare failed (exit {done.returncode}): {done.stdout[-2000:]}")
    return {"peak_rss_mb": peak_mb, "seconds": seconds}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``main`` (tests/unit/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(prog="python -m ctfed.simulations.bench.prepare_memory_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--matrix", type=int, default=512, help="pixels per row and column")
    parser.add_argument("--slices", type=int, default=600)
    parser.add_argument("--slice-mm", type=float, default=0.4, help="slice spacing in mm")
    parser.add_argument("--work", type=Path, default=None, help="keep the series and cache here (default: a temporary folder)")
    parser.add_argument("--prepare-args", nargs=argparse.REMAINDER, default=[], help="passed on to ctfed prepare (e.g. --size 64)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        site = work / "series"
        if not site.exists():
            print(f"writing one {args.slices} x {args.matrix} x {args.matrix} series ...", flush=True)
            write_thin_series(site, args.matrix, args.slices, args.slice_mm)
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)  # a cached series would not be processed again
        entry = measure_prepare(site, cache, list(args.prepare_args))
    raw_mb = args.slices * args.matrix**2 * 2 / 2**20
    print(f"ctfed prepare of one {args.slices}x{args.matrix}x{args.matrix} series ({raw_mb:.0f} MB of 16-bit pixels), "
          f"1 worker: peak RSS {entry['peak_rss_mb']:.0f} MB (goal <= {GOAL_MB} MB), {entry['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
