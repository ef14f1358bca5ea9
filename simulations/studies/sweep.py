"""A sweep of federations on the same sites: what privacy (or any setting) costs.

The base run is the federation ``ctfed simulate`` just ran; every arm in ``sweep.arms`` is
one more federation in ``<run>/arms/<name>/`` with the arm's overrides on top of the base
config and the same site caches. Each final encoder is fine-tuned and tested at every site
exactly as the ``compare`` study does (simulations/studies/compare.py, ``compare.finetune``), and
``sweep.json`` / ``sweep.md`` / ``plots/sweep_epsilon_auroc.png`` put epsilon, AUROC, secure
aggregation and round time side by side. ``sweep.json`` is rewritten after every arm.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ctfed.common.config import save_run_config
from ctfed.simulations.config import SimulationRunConfig, with_overrides
from ctfed.common.fileio import write_json_atomic, write_text_atomic
from ctfed.common.checkpoint import load_checkpoint
from ctfed.common.model import encoder_part
from ctfed.server.results import CHECKPOINT_DIR
from ctfed.simulations.studies.compare import POOLED, SHARED, Pretrained, Site, evaluate_arm, load_sites
from ctfed.common.labelled import NotEvaluableError
from ctfed.simulations.report.report import load_results
from ctfed.simulations.runtime.simulate import site_epsilons

SWEEP_NAME = "sweep.json"
SWEEP_REPORT = "sweep.md"
ARMS_DIR = "arms"
PLOT_NAME = "sweep_epsilon_auroc.png"


def arm_config(base: SimulationRunConfig, overrides: list[str]) -> SimulationRunConfig:
    """The base config with an arm's overrides; the arm runs no study of its own."""
    studies_off = ["compare.enabled=false", "sweep.enabled=false", "label_efficiency.enabled=false"]
    return with_overrides(base, [*overrides, *studies_off], "sweep arm overrides")


def privacy_summary(run_dir: Path) -> dict[str, Any]:
    """Epsilon spent (the worst site for local DP; the coordinator's for central DP; None
    without DP), secure aggregation, and seconds per round of one finished federation."""
    results = load_results(run_dir)
    last = results.rounds[-1]
    site_eps = list(site_epsilons(run_dir, last.sites).values())
    config = results.config
    mode = config.get("privacy", {}).get("mode", "none")
    epsilon = max(site_eps) if site_eps else last.central_epsilon
    rounds = [r.seconds for r in results.rounds]
    return {
        "privacy_mode": mode,
        "epsilon": epsilon,
        "secure_aggregation": bool(config.get("secagg", {}).get("enabled", False)),
        "seconds_per_round": sum(rounds) / len(rounds),
        "rounds_aggregated": sum(r.aggregated for r in results.rounds),
        "rounds": len(results.rounds),
    }


def _pooled_auroc(downstream: dict[str, Any], mode: str, task: str) -> dict[str, float] | None:
    pooled = downstream.get(mode, {}).get(POOLED)
    return pooled["metrics"][task]["auroc"] if pooled else None


def final_encoder(run_dir: Path) -> Pretrained:
    """A finished federation's last global encoder (its hash checked), for evaluation.

    Not ``compare.pretrain_federated``: that insists every site took the same number of
    steps (a budget check), which DP-SGD's Poisson batches, with their skipped empty
    steps, need not meet.
    """
    results = load_results(run_dir)
    weights = run_dir / CHECKPOINT_DIR / results.rounds[-1].checkpoint
    state = encoder_part(load_checkpoint(weights)[0])  # shared SSL heads left out
    return Pretrained(
        encoders={SHARED: state},
        files={SHARED: weights},
        models_trained=1,
        steps_per_model=results.rounds[-1].round * int(results.config.get("train", {}).get("local_steps", 0)),
        volumes_seen=sum(s.num_examples for r in results.rounds for s in r.sites),
        seconds=results.wall_seconds,
    )


def _evaluate(cfg: SimulationRunConfig, run_dir: Path, sites: list[Site]) -> dict[str, Any]:
    pretrained = final_encoder(run_dir)
    downstream, representation = evaluate_arm(cfg, sites, pretrained)
    mode, task = cfg.compare.finetune.mode, cfg.compare.finetune.label_names[0]
    return {
        **privacy_summary(run_dir),
        "run_dir": str(run_dir),
        "pooled_auroc": _pooled_auroc(downstream, mode, task),
        "downstream": {m: {place: v["metrics"] for place, v in by_place.items()} for m, by_place in downstream.items()},
        "representation": representation,
    }


def _fmt_epsilon(value: float | None) -> str:
    if value is None:
        return "no DP (∞)"
    return "∞" if math.isinf(value) else f"{value:.2f}"


def _fmt_auroc(auroc: dict[str, float] | None) -> str:
    return "–" if auroc is None else f"{auroc['value']:.3f} [{auroc['low']:.3f}, {auroc['high']:.3f}]"


def _plot(arms: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    with_dp = [(n, a) for n, a in arms.items() if a.get("epsilon") is not None and a.get("pooled_auroc")]
    for name, arm in with_dp:
        auroc = arm["pooled_auroc"]
        ax.errorbar(
            arm["epsilon"], auroc["value"], yerr=[[auroc["value"] - auroc["low"]], [auroc["high"] - auroc["value"]]],
            fmt="o", capsize=4, label=name,
        )
    for name, arm in arms.items():
        if arm.get("epsilon") is None and arm.get("pooled_auroc"):
            ax.axhline(arm["pooled_auroc"]["value"], linestyle="--", color="grey", label=f"{name} (no DP)")
    ax.set_xlabel("epsilon spent (worst site, or the coordinator's)")
    ax.set_ylabel("pooled AUROC (95% CI)")
    ax.set_title("Privacy against downstream AUROC")
    if with_dp:
        ax.set_xscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_sweep_report(run_dir: Path, data: dict[str, Any]) -> Path:
    arms = data["arms"]
    plot = run_dir / "plots" / PLOT_NAME
    _plot(arms, plot)
    lines = [
        f"# Sweep: {run_dir.name}",
        "",
        f"Every arm is a federation on the same {data['sites']} sites with the base config plus its "
        f"overrides, fine-tuned ({data['finetune_mode']}) and tested at every site; AUROC is pooled over "
        "the sites' held-out scans with a bootstrap 95% CI.",
        "",
        "| arm | overrides | privacy | epsilon | secure aggregation | s / round | rounds aggregated | pooled AUROC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        overrides = " ".join(f"`{o}`" for o in arm.get("overrides", [])) or "(base)"
        lines.append(
            f"| {name} | {overrides} | {arm['privacy_mode']} | {_fmt_epsilon(arm['epsilon'])} | "
            f"{'on' if arm['secure_aggregation'] else 'off'} | {arm['seconds_per_round']:.1f} | "
            f"{arm['rounds_aggregated']} of {arm['rounds']} | {_fmt_auroc(arm['pooled_auroc'])} |"
        )
    lines += ["", f"![epsilon against AUROC](plots/{PLOT_NAME})", ""]
    if data.get("small"):
        lines += [
            "> A run this small is a smoke test, not evidence: with few held-out scans the AUROC CIs "
            "overlap whatever the privacy setting. Scale sites, scans and rounds up for a study.",
            "",
        ]
    path = run_dir / SWEEP_REPORT
    write_text_atomic(path, "\n".join(lines))
    return path


def run_sweep(cfg: SimulationRunConfig, run_dir: Path, data_dir: Path) -> int:
    """Run every arm after the base federation, evaluate all of them, write the report."""
    from ctfed.simulations.runtime.simulate import CONFIG_NAME, run_federation_simulation

    started = time.perf_counter()
    try:
        sites = load_sites(cfg, data_dir)
    except NotEvaluableError as err:
        print(f"ctfed simulate: sweep: {err}")
        return 1
    arm_configs = {arm.name: (arm.overrides, arm_config(cfg, arm.overrides)) for arm in cfg.sweep.arms}
    test_scans = sum(len(s.split.test) for s in sites if s.split)
    data: dict[str, Any] = {
        "sites": len(sites),
        "finetune_mode": cfg.compare.finetune.mode,
        "small": test_scans < 100,
        "arms": {},
    }
    path = run_dir / SWEEP_NAME
    total = len(arm_configs) + 1
    print(f"[sweep 1/{total}] {cfg.sweep.base_name}: the federation above")
    data["arms"][cfg.sweep.base_name] = {"overrides": [], **_evaluate(cfg, run_dir, sites)}
    write_json_atomic(path, data)
    for number, (name, (overrides, arm_cfg)) in enumerate(arm_configs.items(), start=2):
        arm_dir = run_dir / ARMS_DIR / name
        arm_dir.mkdir(parents=True, exist_ok=True)
        config_path = arm_dir / CONFIG_NAME
        save_run_config(arm_cfg, config_path)
        print(f"[sweep {number}/{total}] {name}: {' '.join(overrides)}")
        if run_federation_simulation(arm_cfg, arm_dir, config_path, data_dir) != 0:
            data["arms"][name] = {"overrides": overrides, "failed": f"see {arm_dir / 'federation.log'}"}
            write_json_atomic(path, data)
            print(f"ctfed simulate: sweep arm {name} failed; see {arm_dir}")
            return 1
        data["arms"][name] = {"overrides": overrides, **_evaluate(arm_cfg, arm_dir, sites)}
        write_json_atomic(path, data)
    report = render_sweep_report(run_dir, data)
    for name, arm in data["arms"].items():
        print(f"      {name:<14} epsilon {_fmt_epsilon(arm['epsilon']):<10} pooled AUROC {_fmt_auroc(arm['pooled_auroc'])}")
    print(f"sweep done in {time.perf_counter() - started:.0f} s")
    print(f"sweep:       {path}")
    print(f"report:      {report}")
    return 0
