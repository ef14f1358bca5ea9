"""The ``ctfed`` command: one entry point, one subcommand per job.

Subcommand modules are imported only when their subcommand runs, so ``ctfed --help`` is
instant (torch and Flower take seconds to import) and this module depends on nothing but
the names below. Each subcommand module exposes ``add_arguments(parser)`` and
``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Subcommand:
    name: str
    module: str
    summary: str


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("synth", "ctfed.simulations.data.synth_cli", "write synthetic hospitals as DICOM series"),
    Subcommand("prepare", "ctfed.client.prepare_cli", "turn a site's DICOM folder into a training cache"),
    Subcommand("pretrain", "ctfed.client.pretrain_cli", "self-supervised pretraining on one cache, no federation"),
    Subcommand("finetune", "ctfed.client.finetune_cli", "fine-tune an encoder on one labelled cache, no federation"),
    Subcommand("predict", "ctfed.client.predict_cli", "score new studies with a fine-tuned classifier (local CSV)"),
    Subcommand("export", "ctfed.common.export", "export a checkpoint as a MONAI bundle or TorchScript"),
    Subcommand("simulate", "ctfed.simulations.runtime.simulate", "run a federation on this machine (Flower simulation)"),
    Subcommand("report", "ctfed.simulations.report.report_cli", "re-render a run folder's report.md and plots from results.json"),
    Subcommand("bench", "ctfed.simulations.bench.bench", "benchmarks: ingest, data loader, secure aggregation, federation cost"),
    Subcommand("certs", "ctfed.server.certs_cli", "make the federation's CA, SuperLink certificate and per-site keys"),
    Subcommand("server", "ctfed.server.deploy_cli", "start the coordinator's SuperLink (TLS, node authentication)"),
    Subcommand("site", "ctfed.client.site_cli", "start this hospital's SuperNode from a site.yaml"),
)


def _build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, Subcommand | None]:
    parser = argparse.ArgumentParser(
        prog="ctfed",
        description="Federated self-supervised pretraining of a 3D head-CT encoder.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    first_word = next((arg for arg in argv if not arg.startswith("-")), None)
    chosen = next((sub for sub in SUBCOMMANDS if sub.name == first_word), None)
    for sub in SUBCOMMANDS:
        sub_parser = subparsers.add_parser(sub.name, help=sub.summary, description=sub.summary)
        if sub is chosen:
            importlib.import_module(sub.module).add_arguments(sub_parser)
    return parser, chosen


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, chosen = _build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from ctfed.common.config import ConfigError
    from ctfed.common.logs import console_logging

    console_logging(logging.DEBUG if args.verbose else logging.INFO)
    assert chosen is not None

    try:
        return int(importlib.import_module(chosen.module).run(args) or 0)
    except ConfigError as err:
        print(f"ctfed {chosen.name}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctfed {chosen.name}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        # A full disk, a read-only or missing folder: one line, not a traceback (-v: both).
        if args.verbose:
            raise
        print(f"ctfed {chosen.name}: {os_error_text(err)}", file=sys.stderr)
        return 1


def os_error_text(err: OSError) -> str:
    """An OSError in words, with the path it concerns: "No space left on device (/cache/x.npy)"."""
    return f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else "")


if __name__ == "__main__":
    sys.exit(main())
