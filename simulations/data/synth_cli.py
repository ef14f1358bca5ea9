"""``ctfed synth``: write synthetic hospitals as DICOM folders for demos and simulations."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ctfed.simulations.config import SynthConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SynthConfig()
    parser.add_argument("--sites", type=int, default=defaults.sites, help="number of hospitals (default %(default)s)")
    parser.add_argument("--scans-per-site", type=int, default=defaults.scans_per_site,
                        help="head-CT series per hospital (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="same seed, same files (default %(default)s)")
    parser.add_argument("--finding-scale", type=float, default=defaults.finding_scale,
                        help="finding size multiplier; 1.0 = realistic sizes (default %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write site_<k>/ folders into")


def run(args: argparse.Namespace) -> int:
    # Validates the counts with the same rules as the config file.
    cfg = SynthConfig(
        sites=args.sites, scans_per_site=args.scans_per_site, seed=args.seed, finding_scale=args.finding_scale
    )
    from ctfed.simulations.data.synth import site_profile, synthesize_federation

    # The JPEG 2000 encoder logs one INFO line per tile; that is noise here.
    logging.getLogger("openjpeg").setLevel(logging.WARNING)

    site_dirs = synthesize_federation(args.out, cfg.sites, cfg.scans_per_site, cfg.seed, finding_scale=cfg.finding_scale)
    for index, site_dir in enumerate(site_dirs):
        profile = site_profile(index)
        files = sum(1 for p in site_dir.rglob("*") if p.is_file() and p.name != "labels.csv")
        print(
            f"{site_dir}: {cfg.scans_per_site} series + 1 localizer, {files} files, profile {profile.name} "
            f"({profile.matrix}x{profile.matrix}x{profile.slices}, {profile.pixel_spacing_mm} mm pixels, "
            f"{profile.slice_thickness_mm} mm slices, {profile.transfer_syntax.name})"
        )
    return 0
