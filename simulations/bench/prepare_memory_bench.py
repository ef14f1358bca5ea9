"""Peak memory of ``ctfed prepare`` on one thin-slice hospital series (issue #14).

``python -m ctfed.simulations.bench.prepare_memory_bench`` writes one synthetic axial head CT of
512 x 512 pixels and 600 slices (uncompressed, 0.47 mm pixels, 0.4 mm slices: 315 MB of
pixels) and runs ``ctfed prepare`` on it in a fresh process at the default output size with one
worker; the process reports its own peak resident memory (``ru_maxrss``) as it exits. The goal
is 2 GB for such a series; one worker processes one series at a time, so the figure is the
bound per worker (``--workers N``: about N times it).
"""

from __future__ import annotations

import argparse
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
    "import resource, sys\n"
    "from ctfed.common.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('peak-rss-kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"
    "sys.exit(code)\n"
)


def write_thin_series(out: Path, matrix: int, slices: int, slice_mm: float) -> Path:
    """One synthetic head CT of ``slices`` x ``matrix``^2 under ``out``; returns the site folder."""
    from ctfed.simulations.data.synth import PROFILES, write_scan

    profile = replace(PROFILES[0], matrix=matrix, slices=slices, slice_thickness_mm=slice_mm)
    write_scan(out, profile, site=0, scan=0, seed=0)
    return out


def measure_prepare(site_dir: Path, cache_dir: Path, extra: list[str]) -> dict[str, Any]:
    """``ctfed prepare`` of ``site_dir`` in a child process: its peak RSS and wall time."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, "prepare", "--input", str(site_dir), "--output", str(cache_dir), "--no-progress", *extra],
        capture_output=True, text=True, check=False,
    )
    seconds = time.perf_counter() - started
    peaks = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("peak-rss-kib ")]
    if done.returncode != 0 or not peaks:
        raise RuntimeError(f"ctfed prepare failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return {"peak_rss_mb": peaks[-1] / 1024.0, "seconds": seconds}


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
        entry = measure_prepare(site, work / "cache", list(args.prepare_args))
    raw_mb = args.slices * args.matrix**2 * 2 / 2**20
    print(f"ctfed prepare of one {args.slices}x{args.matrix}x{args.matrix} series ({raw_mb:.0f} MB of 16-bit pixels), "
          f"1 worker: peak RSS {entry['peak_rss_mb']:.0f} MB (goal <= {GOAL_MB} MB), {entry['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
