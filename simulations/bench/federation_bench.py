"""``ctfed bench`` figures that need a whole federation: cost per round, bytes, memory, scaling.

Each measurement is a real ``ctfed simulate`` run (Flower's simulation engine, secure
aggregation on, as a user runs it) read back from its results.json:

* Federation overhead: a round's wall time against the local training it contains, run
  on this machine's cores as well as any schedule could: ``round_s / best_schedule_s``,
  where ``best_schedule_s`` packs the sites' training times onto the sites that run at once
  (cores / ``simulation.client_cpus``), longest first. 3 equal sites on 2 cores cannot
  beat two trainings back to back, so that is the denominator, not 1.5 trainings.
* Bytes per round per site, phase 1 (SSL, whole encoder) against phase 2's probe and
  progressive rounds (trainable parameters only).
* Peak resident memory of a site process.
* Scaling: round time against the number of sites.
* Scaling with the model: round time, bytes per round and peak site memory against the
  encoder size (``conf/model/*.yaml``), 2 sites and 2 local steps; a run it shares with the
  site-count series (same model, sites and steps) is run once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
from pathlib import Path
from typing import Any, Sequence

from ctfed.common.cli import main as ctfed_main

logger = logging.getLogger(__name__)


def _simulate(work: Path, name: str, overrides: Sequence[str]) -> dict[str, Any]:
    # The representation monitor is evaluation, not federation cost: off, so a round is
    # training plus what the federation adds.
    code = ctfed_main(["simulate", f"output_dir={work}", f"run_name={name}", "monitor.enabled=false", *overrides])
    results_path = work / name / "results.json"
    if code != 0 or not results_path.is_file():
        log = work / name / "federation.log"
        # The work folder is temporary: the reason goes into the results, not just a path.
        raise RuntimeError(f"benchmark federation {name} failed (code {code}): {failure_reason(log)}")
    return json.loads(results_path.read_text(encoding="utf-8"))


_RAY_OOM = re.compile(r"Memory on the node \(IP: [^)]*\) was ([\d.]+GB / [\d.]+GB)")
_RAY_TOP_USERS = re.compile(r"Top 10 memory users: PID\tMEM\(GB\)\tCOMMAND, (.*?)(?:, Refer|$)")
_CTFED_ERROR = re.compile(r"ERROR ctfed\.[\w.]+: (.+)")


def _program(command: str) -> str:
    """``ctfed bench`` for ``/path/.venv/bin/python .venv/bin/ctfed bench --out ...``."""
    words = [w for w in command.split() if not Path(w).name.startswith("python")]
    if not words:
        return command.strip()
    name = Path(words[0]).name
    return f"{name} {words[1]}" if len(words) > 1 and not words[1].startswith(("-", "/", ".")) else name


def failure_reason(log: Path) -> str:
    """Why a simulated federation failed, from its log: Ray's out-of-memory kill with the
    largest processes, else the last error ctfed logged."""
    if not log.is_file():
        return f"no log at {log}"
    text = log.read_text(encoding="utf-8", errors="replace")
    if oom := _RAY_OOM.search(text):
        users = _RAY_TOP_USERS.search(text)
        top = ""
        if users:
            entries = [entry.split("\t") for entry in users.group(1).split(", ")]
            largest = [f"{_program(command)} {gb} GB" for _, gb, command in (e for e in entries if len(e) == 3)][:3]
            top = "; largest processes: " + ", ".join(largest)
        return f"Ray killed a site process: the machine's memory reached {oom.group(1)}{top}"
    errors = _CTFED_ERROR.findall(text)
    return errors[-1] if errors else f"see {log}"


# Runs of the scaling federation, by (model, sites, local steps, cores per site): the
# site-count and the model-size series share a point, which is run once.
_scaling_runs: dict[tuple[str, int, int, int], dict[str, Any]] = {}


def _scaling_run(work: Path, model: str, sites: int, local_steps: int, client_cpus: int = 1) -> dict[str, Any]:
    """Phase 1 alone, 2 rounds, 2 scans per site; shares and threshold any site count can meet."""
    key = (model, sites, local_steps, client_cpus)
    if key not in _scaling_runs or not (work / _scaling_name(*key) / "results.json").is_file():
        shares = max(3, min(sites, 5))
        _scaling_runs[key] = _simulate(
            work, _scaling_name(*key),
            [f"model={model}", f"train.local_steps={local_steps}", f"synth.sites={sites}", "synth.scans_per_site=2",
             "federation.rounds=2", f"secagg.num_shares={shares}",  # threshold: the default, above 2/3 of the neighbourhood
             "federation.min_sites=2", f"simulation.client_cpus={client_cpus}"],
        )
    return _scaling_runs[key]


def _scaling_name(model: str, sites: int, local_steps: int, client_cpus: int) -> str:
    name = f"scale-{model}-{sites}sites-{local_steps}steps"
    return name if client_cpus == 1 else f"{name}-{client_cpus}cpus"


def best_schedule_seconds(durations: Sequence[float], parallel: int) -> float:
    """Makespan of ``durations`` (sites' training, which cannot be split) on ``parallel`` slots.

    Longest-first onto the least-loaded slot (Graham's LPT): the optimum when the jobs are
    equal, as a federation's sites with the same local steps nearly are, and within 4/3 of
    it otherwise.
    """
    if parallel < 1:
        raise ValueError("parallel must be >= 1")
    slots = [0.0] * min(parallel, max(len(durations), 1))
    for duration in sorted(durations, reverse=True):
        slots[slots.index(min(slots))] += duration
    return max(slots)


def _round_figures(record: dict[str, Any], parallel: int) -> dict[str, Any]:
    sites = [s for s in record["sites"] if s.get("train_seconds") is not None]
    train = [s["train_seconds"] for s in sites]
    best = best_schedule_seconds(train, parallel) if train else 0.0
    return {
        "round": record["round"],
        "phase": record.get("phase", "pretrain"),
        "round_s": record["seconds"],
        "site_train_s_sum": sum(train),
        "best_schedule_s": best,
        "overhead_ratio": record["seconds"] / best if best > 0 else None,
        "bytes_from_site": statistics.median(s["bytes_received"] for s in record["sites"]) if record["sites"] else 0,
        "bytes_to_site": statistics.median(s.get("bytes_sent", 0) for s in record["sites"]) if record["sites"] else 0,
        "peak_rss_mb": max((s["peak_rss_mb"] for s in sites if s.get("peak_rss_mb")), default=None),
    }


def _sites_in_parallel(client_cpus: int = 1) -> int:
    """How many sites Ray runs at once: one per ``client_cpus`` cores."""
    return max(1, (os.cpu_count() or 1) // client_cpus)


def bench_federation(
    work: Path, model: str, site_counts: Sequence[int], local_steps: int, scans_per_site: Sequence[int] = (16, 8, 16)
) -> dict[str, Any]:
    """Phase 1 + 2 on hospitals of different sizes (``scans_per_site``), then phase 1 alone per site count."""
    parallel = _sites_in_parallel()
    common = [f"model={model}", f"train.local_steps={local_steps}"]
    scans = ",".join(str(n) for n in scans_per_site)
    phases = _simulate(
        work, "phases",
        [*common, f"synth.sites={len(scans_per_site)}", f"synth.scans_per_site_list=[{scans}]",
         "federation.rounds=2", "federation.finetune_rounds=3"],
    )
    # Round 1 includes each site worker's first call (their start is in the warm-up before it,
    # simulation.warmup_timeout_s); the steady state is the rounds after it.
    rounds = [_round_figures(r, parallel) for r in phases["rounds"]]
    scaling = []
    for count in site_counts:
        run = _scaling_run(work, model, count, local_steps)
        steady = [_round_figures(r, parallel) for r in run["rounds"][1:]]
        overheads = [r["overhead_ratio"] for r in steady if r["overhead_ratio"]]
        peaks = [r["peak_rss_mb"] for r in steady if r["peak_rss_mb"]]
        scaling.append({
            "sites": count,
            "round_s": statistics.mean(r["round_s"] for r in steady),
            "overhead_ratio": statistics.mean(overheads) if overheads else None,
            "peak_rss_mb": max(peaks) if peaks else None,
        })
    return {"model": model, "cores": os.cpu_count() or 1, "sites_in_parallel": parallel, "rounds": rounds,
            "scaling": scaling}


def print_federation(figures: dict[str, Any]) -> None:
    print(f"federation ({figures['model']}, {figures['cores']} cores, secure aggregation on):")
    for r in figures["rounds"]:
        overhead = f"{r['overhead_ratio']:.2f}" if r["overhead_ratio"] else "-"
        peak = f"{r['peak_rss_mb']:.0f} MB" if r["peak_rss_mb"] else "-"
        print(
            f"  round {r['round']} ({r['phase']:<8}): {r['round_s']:.1f} s, overhead x{overhead} (goal <= 1.10), "
            f"{r['bytes_from_site'] / 1024:.1f} KiB from / {r['bytes_to_site'] / 1024:.1f} KiB to each site, peak {peak}"
        )
    for s in figures["scaling"]:
        overhead = f"{s['overhead_ratio']:.2f}" if s["overhead_ratio"] else "-"
        peak = f"{s['peak_rss_mb']:.0f} MB" if s["peak_rss_mb"] else "-"
        print(f"  scaling, {s['sites']:>2} sites: {s['round_s']:.1f} s/round, overhead x{overhead}, peak site process {peak}")
    print(
        f"  (overhead = round time / the best schedule of the site training it contains on "
        f"{figures['sites_in_parallel']} sites at once; with a tiny model a round's few-second fixed cost "
        "dominates, so read the full mode's figures)"
    )


def encoder_parameters(model: str) -> int:
    """Values in the encoder's state dict (what a site's update carries), without allocating it."""
    import torch

    from ctfed.common.config import load_run_config
    from ctfed.common.model import ViTEncoder

    with torch.device("meta"):
        encoder = ViTEncoder(load_run_config([f"model={model}"]).model)
    return sum(t.numel() for t in encoder.state_dict().values())


def bench_model_scaling(work: Path, models: Sequence[str], sites: int, local_steps: int) -> list[dict[str, Any]]:
    """Phase-1 round time, bytes per round per site and peak site memory for each encoder size."""
    rows = []
    for model in models:
        failures = []
        # A ViT-B federation can run out of memory on a small machine (Ray kills a site's
        # worker when the machine nears its memory limit): then the sites run one at a time
        # (each asks for every core), which halves the memory and keeps the row.
        for client_cpus in dict.fromkeys((1, os.cpu_count() or 1)):
            try:
                run = _scaling_run(work, model, sites, local_steps, client_cpus)
                break
            except RuntimeError as err:
                logger.error("model-size benchmark at %s, %d core(s) per site, failed: %s", model, client_cpus, err)
                failures.append(f"{_sites_in_parallel(client_cpus)} site(s) at once: {err}")
        else:
            # The sizes that did run are still worth their rows.
            rows.append({"model": model, "params": encoder_parameters(model), "sites": sites,
                         "local_steps": local_steps, "error": "; ".join(failures)})
            continue
        parallel = _sites_in_parallel(client_cpus)
        steady = [_round_figures(r, parallel) for r in run["rounds"][1:]]  # round 1: the workers' first calls
        peaks = [r["peak_rss_mb"] for r in steady if r["peak_rss_mb"]]
        rows.append({
            "model": model,
            "params": encoder_parameters(model),
            "sites": sites,
            "sites_in_parallel": parallel,
            "failed_attempts": failures,
            "local_steps": local_steps,
            "round_s": statistics.mean(r["round_s"] for r in steady),
            "site_train_s": statistics.mean(r["site_train_s_sum"] for r in steady) / sites,
            "bytes_from_site": statistics.mean(r["bytes_from_site"] for r in steady),
            "bytes_to_site": statistics.mean(r["bytes_to_site"] for r in steady),
            "peak_rss_mb": max(peaks) if peaks else None,
        })
    return rows


def print_model_scaling(rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    print(f"federation vs model size ({rows[0]['sites']} sites, {rows[0]['local_steps']} local steps, secure aggregation on):")
    for row in rows:
        if "error" in row:
            print(f"  {row['model']:<6} {row['params'] / 1e6:6.2f}M params: failed ({row['error']})")
            continue
        peak = f"{row['peak_rss_mb']:.0f} MB" if row["peak_rss_mb"] else "-"
        for failure in row["failed_attempts"]:
            print(f"  {row['model']:<6} failed with {failure}")
        print(
            f"  {row['model']:<6} {row['params'] / 1e6:6.2f}M params, {row['sites_in_parallel']} site(s) at once: "
            f"{row['round_s']:.1f} s/round "
            f"(site training {row['site_train_s']:.1f} s), {row['bytes_from_site'] / 2**20:.1f} MiB from / "
            f"{row['bytes_to_site'] / 2**20:.1f} MiB to each site, peak site {peak}"
        )
