"""``ctfed simulate``: a whole federation on one machine.

Steps: resolve the Hydra config -> make the run folder -> synthesise and prepare site
caches (unless ``simulation.data_dir`` points at prepared ones) -> run the same
ServerApp/ClientApp a deployment runs, in Flower's simulation engine -> summarise.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from ctfed.client.policy import SITE_POLICIES_FILE_KEY, policy_to_dict
from ctfed.client.site import SITES_DIR, site_cache_dirs
from ctfed.common.config import RunConfig, load_run_config, save_run_config
from ctfed.common.fileio import write_json_atomic
from ctfed.common.preprocess import prepare
from ctfed.server.app import RUN_CONFIG_FILE_KEY, RUN_DIR_KEY
from ctfed.server.results import RESULTS_NAME
from ctfed.client.site import DATA_DIR_KEY
from ctfed.simulations.engine import SimulationError, run_app
from ctfed.simulations.report import console_table, load_results, render_report
from ctfed.simulations.synth import synthesize_federation

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
APP_DIR = Path(__file__).resolve().parent.parent  # the repository root: pyproject.toml is the Flower app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="Hydra overrides, e.g. federation.rounds=3 model=small train.local_steps=8",
    )
    parser.add_argument("--show-config", action="store_true", help="print the resolved config and exit")


def make_run_dir(cfg: RunConfig) -> Path:
    name = cfg.run_name or time.strftime("sim-%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output_dir).resolve() / name
    if (run_dir / RESULTS_NAME).exists():
        raise FileExistsError(f"run folder {run_dir} already holds results; choose another run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def synthesize_and_prepare(cfg: RunConfig, run_dir: Path) -> Path:
    """Synthetic hospitals as DICOM, then each site's own prepared cache."""
    dicom_root = run_dir / "dicom"
    cache_root = run_dir / "cache"
    print(f"[1/3] writing {cfg.synth.sites} synthetic hospitals ({cfg.synth.scans_per_site} scans each) to {dicom_root}")
    site_dirs = synthesize_federation(dicom_root, cfg.synth.sites, cfg.synth.scans_per_site, cfg.synth.seed)
    print(f"[2/3] preparing site caches in {cache_root}")
    for site_dir in site_dirs:
        labels = site_dir / "labels.csv"
        summary = prepare(
            site_dir,
            cache_root / site_dir.name,
            cfg.preprocess,
            labels_csv=labels if labels.exists() else None,
            progress=False,
        )
        print(
            f"      {site_dir.name}: {summary.accepted} series cached, {summary.rejected} rejected "
            f"(see {summary.report.relative_to(run_dir)})"
        )
    return cache_root


def write_site_policies(cfg: RunConfig, run_dir: Path, site_ids: list[str]) -> Path:
    """Each simulated site's policy, for its ClientApp (``site-policies-file``)."""
    unknown = sorted({p.site for p in cfg.simulation.site_policies} - set(site_ids))
    if unknown:
        raise ValueError(f"simulation.site_policies names unknown sites {unknown}; the sites are {site_ids}")
    path = run_dir / SITES_DIR / "policies.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {site: policy_to_dict(cfg.simulation.policy_for(site)) for site in site_ids})
    return path


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.overrides)
    if args.show_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return 0
    started = time.perf_counter()
    run_dir = make_run_dir(cfg)
    config_path = run_dir / CONFIG_NAME
    save_run_config(cfg, config_path)
    print(f"ctfed simulate: run folder {run_dir}")

    if cfg.simulation.data_dir:
        data_dir = Path(cfg.simulation.data_dir).resolve()
        print(f"[1/3] using prepared site caches under {data_dir}")
        print("[2/3] (nothing to prepare)")
    else:
        data_dir = synthesize_and_prepare(cfg, run_dir)
    site_ids = [cache.name for cache in site_cache_dirs(data_dir)]
    num_sites = len(site_ids)
    policies_path = write_site_policies(cfg, run_dir, site_ids)

    print(f"[3/3] federated pretraining: {num_sites} sites, {cfg.federation.rounds} rounds (Flower simulation engine)")
    try:
        run_app(
            APP_DIR,
            {
                RUN_CONFIG_FILE_KEY: str(config_path), RUN_DIR_KEY: str(run_dir), DATA_DIR_KEY: str(data_dir),
                SITE_POLICIES_FILE_KEY: str(policies_path),
            },
            num_sites=num_sites,
            client_cpus=cfg.simulation.client_cpus,
            flwr_home=run_dir / ".flwr",
            timeout_s=cfg.simulation.timeout_s,
            log_path=run_dir / "federation.log",
        )
    except SimulationError as err:
        print(f"ctfed simulate: {err}")
        return 1
    results_path = run_dir / RESULTS_NAME
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if results.get("status") != "completed":
        print(f"ctfed simulate: the federation ended without completing; see {run_dir / 'federation.log'}")
        return 1
    print(console_table(load_results(run_dir)))
    # Rendered before the round check below: a report is most useful when rounds failed.
    report_path = render_report(run_dir)
    print(f"report:      {report_path}")
    failed_rounds = [r["round"] for r in results["rounds"] if not r["aggregated"]]
    if failed_rounds:
        print(f"ctfed simulate: rounds {failed_rounds} had too few usable site updates; see {run_dir / 'federation.log'}")
        return 1
    print(f"done in {time.perf_counter() - started:.0f} s")
    print(f"results:     {results_path}")
    print(f"checkpoints: {run_dir / 'checkpoints'}")
    return 0
