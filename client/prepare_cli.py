"""``ctfed prepare``: turn a site's DICOM folder into a pseudonymous training cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctfed.common.config import PreprocessConfig


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
    parser.add_argument("--workers", type=int, default=defaults.workers, help="processes (default %(default)s)")
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
    cfg = PreprocessConfig(spacing_mm=args.spacing, output_size=args.size, gantry_tilt=args.gantry_tilt,
                           workers=args.workers)
    from ctfed.common.preprocess import prepare

    summary = prepare(args.input, args.output, cfg, labels_csv=labels, progress=not args.no_progress)
    print(f"accepted {summary.accepted}, unchanged (cached) {summary.cached}, rejected {summary.rejected}")
    print(f"manifest: {summary.manifest}")
    print(f"report:   {summary.report}")
    if summary.accepted + summary.cached == 0:
        print(f"ctfed prepare: no usable CT series under {args.input}; see {summary.report}", file=sys.stderr)
        return 1
    return 0
