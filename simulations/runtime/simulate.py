"""``ctfed simulate``: a whole federation on one machine.

Steps: resolve the Hydra config -> make the run folder -> synthesise and prepare site
caches (unless ``simulation.data_dir`` points at prepared ones, or ``split.pooled_cache``
at one pooled cache to cut into sites, simulations/data/split.py) -> run the same
ServerApp/ClientApp a deployment runs, in Flower's simulation engine -> summarise.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from ctfed.client.ledger import ledger_path
from ctfed.client.policy import SITE_POLICIES_FILE_KEY, policy_to_dict
from ctfed.client.secagg import SIGNING_KEYS_DIR_KEY
from ctfed.client.site import DATA_DIR_KEY, SITES_DIR, site_cache_dirs
from ctfed.common.certs import ensure_federation_signing_keys
from ctfed.common.config import ConfigError, SitePolicy, save_run_config
from ctfed.common.dp import PrivacyLedger
from ctfed.common.fileio import write_json_atomic
from ctfed.common.preprocess import SPLIT_DIR, SPLIT_SUMMARY, prepare
from ctfed.common.privacy import install_site_secret
from ctfed.common.exchange import RUN_DIR_KEY
from ctfed.server.app import RESUME_KEY, RESUME_OVERRIDE_KEY, RUN_CONFIG_FILE_KEY
from ctfed.server.results import RESULTS_NAME, ResumeError, SiteRoundRecord, resumed_config, saved_run_config
from ctfed.server.rounds import dropout_warning
from ctfed.simulations.config import (
    SimulationRunConfig,
    load_simulation_config,
    read_simulation_config,
    to_simulation_config,
)
from ctfed.simulations.runtime.engine import SimulationError, run_app
from ctfed.simulations.runtime.flower_app import APP_FOLDER, CLIENT_APP, FAULTY_CLIENT_APP, write_app
from ctfed.simulations.report.report import console_table, load_results, render_report
from ctfed.simulations.data.split import SPLIT_REPORT, split_pool
from ctfed.simulations.data.synth import synthesize_federation, synthetic_site_secret

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
SIGNING_KEYS_DIR = "secagg-keys"  # in the run folder: the simulated sites' signing keys and roster


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="Hydra overrides, e.g. federation.rounds=3 model=small train.local_steps=8",
    )
    parser.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue a stopped run from its last completed round with its saved config (overrides may change "
        "federation.rounds / federation.finetune_rounds only, unless --override-config)",
    )
    parser.add_argument(
        "--override-config",
        action="store_true",
        help="with --resume: accept overrides beyond the round counts (recorded in results.json 'resumes')",
    )


def make_run_dir(cfg: SimulationRunConfig) -> Path:
    name = cfg.run_name or time.strftime("sim-%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output_dir).resolve() / name
    if (run_dir / RESULTS_NAME).exists():
        raise FileExistsError(f"run folder {run_dir} already holds results; choose another run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def synthesize_and_prepare(cfg: SimulationRunConfig, run_dir: Path) -> Path:
    """Synthetic hospitals as DICOM, then each site's own prepared cache."""
    dicom_root = run_dir / "dicom"
    cache_root = run_dir / "cache"
    counts = cfg.synth.scan_counts
    sizes = f"{counts[0]} scans each" if len(set(counts)) == 1 else f"{', '.join(map(str, counts))} scans"
    print(f"[1/3] writing {cfg.synth.sites} synthetic hospitals ({sizes}) to {dicom_root}")
    site_dirs = synthesize_federation(
        dicom_root, cfg.synth.sites, counts, cfg.synth.seed, finding_scale=cfg.synth.finding_scale,
        structural_prevalence=cfg.synth.structural_prevalence,
    )
    print(f"[2/3] preparing site caches in {cache_root}")
    for site_dir in site_dirs:
        labels = site_dir / "labels.csv"
        # Pseudonyms from the seed, so the caches (and their order) are the same every run.
        install_site_secret(cache_root / site_dir.name, synthetic_site_secret(cfg.synth.seed, site_dir.name))
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


def split_and_report(cfg: SimulationRunConfig, run_dir: Path) -> Path:
    """Cut the pooled cache into the simulated sites' manifest views (simulations/data/split.py)."""
    print(f"[1/3] splitting the pooled cache {cfg.split.pooled_cache} ({cfg.split.method.value}) into sites")
    data_dir = split_pool(cfg.split, run_dir)
    summary = json.loads((data_dir / SPLIT_SUMMARY).read_text(encoding="utf-8"))
    for site in summary["sites"]:
        mix = ", ".join(f"{cfg.split.label}={label}: {n}" for label, n in site["labels"].items())
        print(f"      {site['site']}: {site['scans']} scans ({mix})")
    print(f"[2/3] (nothing to prepare; label skew {summary['label_skew']:.3f}, see {data_dir / SPLIT_REPORT})")
    return data_dir


def _resume_config(run_dir: Path, overrides: list[str], override_config: bool = False) -> SimulationRunConfig:
    """The stopped run's own config, with ``key=value`` overrides (e.g. more rounds) on top.

    Checked here, before anything is written, by the rule the ServerApp applies again
    (server/results.py ``resumed_config``): overrides beyond the round counts are refused,
    with the differences listed, unless ``override_config``.
    """
    from omegaconf import OmegaConf

    saved_path = run_dir / CONFIG_NAME
    saved = read_simulation_config(saved_path)
    cfg = saved
    if overrides:
        try:
            cfg = to_simulation_config(OmegaConf.merge(OmegaConf.load(saved_path), OmegaConf.from_dotlist(overrides)))
        except ValueError as err:  # OmegaConf's dotlist parser
            raise ConfigError(f"invalid override: {err}") from None
        if cfg.model != saved.model:
            raise ConfigError("a resumed run keeps its model; model overrides are not allowed with --resume")
    try:
        # results.json holds what the run ran with; config.yaml is only this command's copy.
        resumed, _ = resumed_config(saved_run_config(run_dir, SimulationRunConfig), cfg, override_config)
    except ResumeError as err:
        raise ConfigError(f"cannot resume {run_dir}: {err}") from None
    return resumed


def _existing_data_dir(cfg: SimulationRunConfig, run_dir: Path) -> Path:
    if cfg.simulation.data_dir:
        data_dir = Path(cfg.simulation.data_dir).resolve()
    else:
        # A resumed split run keeps the sites it was cut into: the views are not redrawn.
        data_dir = run_dir / (SPLIT_DIR if cfg.split.enabled else "cache")
    if cfg.label_efficiency.enabled:
        # ... and a study's federation its pretraining views (splits.json is not redrawn either).
        from ctfed.simulations.studies.label_efficiency import PRETRAIN_VIEWS, STUDY_DIR

        data_dir = run_dir / STUDY_DIR / PRETRAIN_VIEWS
    site_cache_dirs(data_dir)  # raises a clear error if the caches are gone
    return data_dir


def write_site_policies(cfg: SimulationRunConfig, run_dir: Path, site_ids: list[str]) -> Path:
    """Each simulated site's policy, for its ClientApp (``site-policies-file``)."""
    unknown = sorted({p.site for p in cfg.simulation.site_policies} - set(site_ids))
    if unknown:
        raise ValueError(f"simulation.site_policies names unknown sites {unknown}; the sites are {site_ids}")
    path = run_dir / SITES_DIR / "policies.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {site: policy_to_dict(cfg.simulation.policy_for(site)) for site in site_ids})
    return path


def site_epsilons(run_dir: Path, sites: list[SiteRoundRecord]) -> dict[str, float]:
    """Each site's own epsilon for a study's summary, given the outcomes of a federation's last
    round (``sites``, run in ``run_dir``): the one its reply carried, or, where the site kept
    it (under local DP it gives away a volume count the site does not share,
    client/privacy_round.py), the total in the site's own ledger in the run's site folder, at
    its policy's delta. Sites with neither are left out."""
    policies_file = run_dir / SITES_DIR / "policies.json"
    policies = json.loads(policies_file.read_text()) if policies_file.is_file() else {}
    epsilons: dict[str, float] = {}
    for site in sites:
        if site.epsilon is not None:
            epsilons[site.site] = site.epsilon
            continue
        ledger_file = ledger_path(run_dir / SITES_DIR / site.site)
        if ledger_file.is_file():
            delta = float(policies.get(site.site, {}).get("delta", SitePolicy().delta))
            epsilons[site.site] = PrivacyLedger.load(ledger_file).epsilon(delta)
    return epsilons


def run_federation_simulation(
    cfg: SimulationRunConfig, run_dir: Path, config_path: Path, data_dir: Path, resume: bool = False, override_config: bool = False
) -> int:
    """Run the federation of ``cfg`` on the site caches under ``data_dir`` in Flower's
    simulation engine, then print its table and write its report; 0 when every round
    aggregated. The run folder must exist and hold ``config_path``."""
    site_ids = [cache.name for cache in site_cache_dirs(data_dir)]
    num_sites = len(site_ids)
    policies_path = write_site_policies(cfg, run_dir, site_ids)
    # One machine plays every hospital: it makes their signing keys and the roster they pin.
    keys_dir = run_dir / SIGNING_KEYS_DIR
    ensure_federation_signing_keys(keys_dir, site_ids)

    run_config: dict[str, object] = {
        RUN_CONFIG_FILE_KEY: str(config_path),
        RUN_DIR_KEY: str(run_dir),
        DATA_DIR_KEY: str(data_dir),
        RESUME_KEY: resume,
        RESUME_OVERRIDE_KEY: override_config,
        SITE_POLICIES_FILE_KEY: str(policies_path),
        SIGNING_KEYS_DIR_KEY: str(keys_dir),
    }
    client_app = CLIENT_APP
    if cfg.simulation.faults:
        client_app = FAULTY_CLIENT_APP  # it reads the faults from the run config file
        print(f"      injecting {len(cfg.simulation.faults)} site fault(s): " + ", ".join(
            f"site {f.site} {f.kind.value} in rounds {f.rounds or 'all'}" for f in cfg.simulation.faults
        ))
    app_dir = write_app(run_dir / APP_FOLDER, client_app)

    phases = [f"pretraining {cfg.federation.rounds} rounds"] * bool(cfg.federation.rounds)
    phases += [f"fine-tuning {cfg.federation.finetune_rounds} rounds"] * bool(cfg.federation.finetune_rounds)
    print(f"[3/3] federated {', then '.join(phases)}: {num_sites} sites (Flower simulation engine)")
    warning = dropout_warning(cfg, num_sites)
    if warning:
        print(f"      WARNING: {warning}")
    if cfg.simulation.ray_address:
        print(f"      sites run on the Ray cluster at simulation.ray_address={cfg.simulation.ray_address}")
    try:
        run_app(
            app_dir,
            run_config,
            num_sites=num_sites,
            client_cpus=cfg.simulation.client_cpus,
            client_gpus=cfg.simulation.client_gpus,
            concurrent_sites=cfg.simulation.concurrent_sites,
            ray_address=cfg.simulation.ray_address,
            flwr_home=run_dir / ".flwr",
            timeout_s=cfg.simulation.timeout_s,
            log_path=run_dir / ("federation-resumed.log" if resume else "federation.log"),
        )
    except SimulationError as err:
        print(f"ctfed simulate: {err}")
        return 1
    results_path = run_dir / RESULTS_NAME
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.exists() else {}
    if results.get("status") != "completed":
        if results.get("status") == "failed":  # stopped with a reason: its rounds are worth a report
            print(f"report:      {render_report(run_dir)}")
        reason = results.get("reason") or "it did not finish"
        print(f"ctfed simulate: the federation ended {results.get('status', 'without results')}: {reason}; see {run_dir / 'federation.log'}")
        return 1
    print(console_table(load_results(run_dir)))
    # Rendered before the round check below: a report is most useful when rounds failed.
    report_path = render_report(run_dir)
    print(f"report:      {report_path}")
    failed_rounds = [r["round"] for r in results["rounds"] if not r["aggregated"]]
    if failed_rounds:
        print(f"ctfed simulate: rounds {failed_rounds} had too few usable site updates; see {run_dir / 'federation.log'}")
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    resume = args.resume is not None
    if resume:
        run_dir = args.resume.resolve()
        cfg = _resume_config(run_dir, args.overrides, args.override_config)
    elif args.override_config:
        raise ConfigError("--override-config applies to --resume RUN_DIR only")
    else:
        cfg = load_simulation_config(args.overrides)
    if args.show_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return 0
    started = time.perf_counter()
    if resume:
        config_path = run_dir / CONFIG_NAME
        save_run_config(cfg, config_path)
        print(f"ctfed simulate: resuming {run_dir}")
        data_dir = _existing_data_dir(cfg, run_dir)
        print(f"[1/3] using the run's site caches under {data_dir}")
        print("[2/3] (nothing to prepare)")
    else:
        run_dir = make_run_dir(cfg)
        config_path = run_dir / CONFIG_NAME
        save_run_config(cfg, config_path)
        print(f"ctfed simulate: run folder {run_dir}")
        if cfg.simulation.data_dir:
            data_dir = Path(cfg.simulation.data_dir).resolve()
            print(f"[1/3] using prepared site caches under {data_dir}")
            print("[2/3] (nothing to prepare)")
        elif cfg.split.enabled:
            data_dir = split_and_report(cfg, run_dir)
        else:
            data_dir = synthesize_and_prepare(cfg, run_dir)
        if cfg.label_efficiency.enabled:
            # The study holds out test and validation scans before anyone pretrains.
            from ctfed.simulations.studies.label_efficiency import write_pretraining_views

            print("      label efficiency: cutting each site into test, validation and labelled scans")
            data_dir = write_pretraining_views(cfg, run_dir, data_dir)
    code = run_federation_simulation(cfg, run_dir, config_path, data_dir, resume, resume and args.override_config)
    if code:
        return code
    print(f"done in {time.perf_counter() - started:.0f} s")
    print(f"results:     {run_dir / RESULTS_NAME}")
    print(f"checkpoints: {run_dir / 'checkpoints'}")
    if cfg.compare.enabled:
        # The federation above is the study's federated arm; the other arms reuse its sites.
        from ctfed.simulations.studies.compare import run_comparison

        code = run_comparison(cfg, run_dir, data_dir)
        if code:
            return code
    if cfg.label_efficiency.enabled:
        # The federation above is the study's federated arm, on the sites' pretraining views.
        from ctfed.simulations.studies.label_efficiency import run_label_efficiency

        return run_label_efficiency(cfg, run_dir, data_dir)
    if cfg.sweep.enabled:
        # The federation above is the sweep's base arm; each other arm is one more federation.
        from ctfed.simulations.studies.sweep import run_sweep

        return run_sweep(cfg, run_dir, data_dir)
    return 0
