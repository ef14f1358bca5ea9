"""``ctfed prepare``: turn a site's DICOM folder into a pseudonymous training cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctfed.common.cli import os_error_text
from ctfed.common.config import ConfigError, PreprocessConfig, SeriesPerStudy, SeriesSelectionConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PreprocessConfig()
    parser.add_argument("--input", type=Path, required=True, help="folder with the site's DICOM export")
    parser.add_argument("--output", type=Path, required=True, help="cache folder (manifest.json, report.md, *.npy)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="CSV with StudyInstanceUID + label columns (default: <input>/labels.csv if present)")
    parser.add_argument("--size", type=int, default=defaults.output_size, help="output edge length (default %(default)s)")
    parser.add_argument("--spacing", type=float, default=defaults.spacing_mm, help="isotropic mm (default %(default)s)")
    parser.add_argument("--gantry-tilt", choices=("resample", "reject"), default=defaults.gantry_tilt,
                        help="what to do with gantry-tilted series (default %(default)s)")
    parser.add_argument("--slice-gap-tolerance", type=float, default=defaults.slice_gap_tolerance,
                        help="allowed deviation of a slice gap from the median, as a fraction (default %(default)s)")
    parser.add_argument("--slice-gap-tolerance-mm", type=float, default=defaults.slice_gap_tolerance_mm,
                        help="... or in mm, whichever is larger (default %(default)s)")
    parser.add_argument("--all-series", action="store_true",
                        help="cache every usable series of a study, not only the preferred one "
                             "(preprocess.series_selection; duplicates over-weight a study)")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help="processes, one core each (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if not args.input.is_dir():
        print(f"ctfed prepare: input folder does not exist: {args.input}", file=sys.stderr)
        return 1
    labels = args.labels
    if labels is None and (args.input / "labels.csv").is_file():
        labels = args.input / "labels.csv"
    if labels is not None and not labels.is_file():
        print(f"ctfed prepare: labels file does not exist: {labels}", file=sys.stderr)
        return 1
    try:
        cfg = PreprocessConfig(
            spacing_mm=args.spacing, output_size=args.size, gantry_tilt=args.gantry_tilt, workers=args.workers,
            slice_gap_tolerance=args.slice_gap_tolerance, slice_gap_tolerance_mm=args.slice_gap_tolerance_mm,
            series_selection=SeriesSelectionConfig(per_study=SeriesPerStudy.all if args.all_series else SeriesPerStudy.one),
        )
    except ConfigError as err:
        print(f"ctfed prepare: {err}", file=sys.stderr)
        return 2
    from ctfed.common.preprocess import prepare

    try:
        summary = prepare(args.input, args.output, cfg, labels_csv=labels, progress=not args.no_progress)
    except OSError as err:
        inside_cache = err.filename is not None and Path(err.filename).resolve().is_relative_to(args.output.resolve())
        if getattr(args, "verbose", False) or not inside_cache:
            raise  # ctfed's own handler prints any other OSError in one line
        # A full disk or a read-only cache folder: every volume is written to a temporary and
        # renamed when whole, and the manifest lists only those, so nothing half-written is used.
        print(f"ctfed prepare: cannot write the cache: {os_error_text(err)}. The manifest lists only the volumes "
              "written whole before it; free space (or fix the folder's permissions) and run the same command again "
              "to continue", file=sys.stderr)
        return 1
    print(f"accepted {summary.accepted}, unchanged (cached) {summary.cached}, rejected {summary.rejected}")
    print(f"manifest: {summary.manifest}")
    print(f"report:   {summary.report}")
    if summary.accepted + summary.cached == 0:
        print(f"ctfed prepare: no usable CT series under {args.input}; see {summary.report}", file=sys.stderr)
        return 1
    return 0
