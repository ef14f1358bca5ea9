"""``ctfed report RUN_DIR``: re-render a run folder's report.md (and compare.md, sweep.md) and plots, without training.

Useful mid-run (the coordinator rewrites results.json after every round), after a run
that died, and after the report itself has improved.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder holding results.json")


def run(args: argparse.Namespace) -> int:
    # Imported here so that argument errors show before matplotlib and torch load.
    from ctfed.simulations.report.report import ReportError, render_report

    try:
        report = render_report(args.run_dir)
    except ReportError as err:
        print(f"ctfed report: {err}", file=sys.stderr)
        return 1
    print(report)
    from ctfed.simulations.studies.compare import COMPARE_JSON

    if (args.run_dir / COMPARE_JSON).is_file():  # a compare study: its verdicts and plots too
        from ctfed.simulations.studies.compare_report import render_compare_report

        print(render_compare_report(args.run_dir))
    from ctfed.simulations.studies.label_efficiency import STUDY_DIR, STUDY_JSON

    if (args.run_dir / STUDY_DIR / STUDY_JSON).is_file():  # the label-efficiency study
        from ctfed.simulations.studies.label_efficiency_report import render_study_report

        print(render_study_report(args.run_dir))
    from ctfed.simulations.studies.sweep import SWEEP_NAME, render_sweep_report

    sweep = args.run_dir / SWEEP_NAME
    if sweep.is_file():  # a sweep (the privacy preset): its table and plot too
        print(render_sweep_report(args.run_dir, json.loads(sweep.read_text(encoding="utf-8"))))
    return 0
