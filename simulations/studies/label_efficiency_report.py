"""study.md and its plots from the label-efficiency study's study.json (``ctfed report`` re-renders them).

Plots: pooled test AUROC against labelled scans per site, one panel per task, one line per arm
(its mode chosen on validation) and the best model-free probe, one figure per kind of head: the
few-label curve FM-CT shows; and the validation probe along pretraining (where more budget
would lead). Tables: the targets, the mean over tasks per level, how many tasks each verdict
holds on per level, the judged level per task, and every verdict.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ctfed.common.fileio import write_text_atomic
from ctfed.simulations.studies.downstream import MIN_EVIDENCE_TEST_SCANS, TARGET_HALF_WIDTH
from ctfed.simulations.studies.label_efficiency import HEADS_DESCRIPTIONS, POOLED, STUDY_DIR, STUDY_JSON, Arm, Heads
from ctfed.simulations.report.report import _fmt_seconds, _save, _table

STUDY_MD = "study.md"
PLOTS = "plots"
AUROC_PLOT = "label_efficiency_auroc.png"  # the sites' own heads; other heads: auroc_plot()
CURVE_PLOT = "label_efficiency_pretraining.png"
COLOURS = {
    Arm.federated.value: "tab:blue", Arm.centralized.value: "tab:green", Arm.local_only.value: "tab:orange",
    Arm.scratch.value: "tab:grey", Arm.federated_dp.value: "tab:purple", "model_free": "black",
}


def load_study(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STUDY_DIR / STUDY_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `ctfed simulate preset=label_efficiency` first")
    return json.loads(path.read_text(encoding="utf-8"))


def _ci(est: dict[str, float], signed: bool = False) -> str:
    if est["value"] is None or not math.isfinite(est["value"]):
        return "–"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(est['value'])} [{fmt.format(est['low'])}, {fmt.format(est['high'])}]"


def _status(v: dict[str, Any]) -> str:
    if not v["evidence"]:
        return "too small to conclude"
    if v["met"] and v["ci_clears_target"]:
        return "met (CI clears)"
    return "met (point only)" if v["met"] else f"missed by {v['missed_by']:.3f}"


def auroc_plot(heads: str) -> str:
    """File name of the AUROC plot of one kind of head."""
    return AUROC_PLOT if heads == Heads.site.value else AUROC_PLOT.replace(".png", f"_{heads}.png")


def _mean(entry: dict[str, Any]) -> float:
    values = [e["value"] for e in entry["auroc"].values() if e["value"] is not None and math.isfinite(e["value"])]
    return sum(values) / len(values) if values else float("nan")


def _plot_auroc(data: dict[str, Any], heads: str, path: Path) -> None:
    tasks, levels = data["tasks"], data["config"]["labels_per_site"]
    columns = min(4, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    fig = Figure(figsize=(3.2 * columns, 2.6 * rows), layout="constrained")
    for k, task in enumerate(tasks):
        ax = fig.add_subplot(rows, columns, k + 1)
        for arm, by_level in data["summary"][heads].items():
            points = [(int(level), entry["auroc"][task]) for level, entry in by_level.items() if entry["where"] == POOLED]
            if not points:
                continue
            xs = [x for x, _ in points]
            ys = [e["value"] for _, e in points]
            errors = [[max(e["value"] - e["low"], 0) for _, e in points], [max(e["high"] - e["value"], 0) for _, e in points]]
            ax.errorbar(xs, ys, yerr=errors, label=arm, color=COLOURS.get(arm), marker="o", ms=3, capsize=2, lw=1)
        ax.axhline(0.5, color="lightgrey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlim(levels[0] / 1.4, levels[-1] * 1.4)  # explicit: a panel without points has no data limits
        ax.set_xticks(levels, [str(level) for level in levels])
        ax.minorticks_off()
        ax.set_ylim(0.2, 1.0)
        ax.set_title(task, fontsize=9)
        if k % columns == 0:
            ax.set_ylabel("pooled test AUROC")
        if k >= len(tasks) - columns:
            ax.set_xlabel("labelled scans per site")
        if k == 0:
            ax.legend(fontsize=6)
    fig.suptitle(f"{heads} heads: {HEADS_DESCRIPTIONS[Heads(heads)]}", fontsize=8)
    _save(fig, path)


def _plot_curve(data: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for arm, entry in data["arms"].items():
        points = [(c["steps"], c["mean_val_auroc"]) for c in entry.get("curve", []) if c["mean_val_auroc"] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=arm, color=COLOURS.get(arm))
    ax.set_xlabel("pretraining steps per model")
    ax.set_ylabel("validation probe AUROC (mean over tasks)")
    ax.legend(fontsize=7)
    _save(fig, path)


def _verdict_counts(data: dict[str, Any], heads: str) -> list[str]:
    """Per verdict and level: on how many tasks it is met, its CI clears, it is evidence."""
    levels = [str(level) for level in data["config"]["labels_per_site"]]
    found: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for v in data.get("verdicts", []):
        if v.get("heads") == heads:
            found.setdefault(v["key"], {}).setdefault(str(v["labels_per_site"]), []).append(v)

    def cell(verdicts: list[dict[str, Any]]) -> str:
        widths = sorted((v["difference"]["high"] - v["difference"]["low"]) / 2 for v in verdicts)
        return (f"{sum(v['met'] for v in verdicts)}/{len(verdicts)} met, {sum(v['ci_clears_target'] for v in verdicts)} CI clears, "
                f"{sum(v['evidence'] for v in verdicts)} evidence (±{widths[len(widths) // 2]:.2f})")

    return _table(["verdict", *levels], [[key, *(cell(by[lv]) if lv in by else "–" for lv in levels)] for key, by in sorted(found.items())])


def _wall_time_sentence(data: dict[str, Any]) -> str:
    """The study's own time plus the federation's that ran before it (the federated arm's
    pretraining); writing the DICOM and the caches come before both and are not counted."""
    after = data["wall_seconds"].get("total")
    federation = data["arms"].get("federated", {}).get("wall_seconds", {}).get("pretrain")
    if after is None or not federation:
        return f"Wall time {_fmt_seconds(after)} after the federation."
    return (f"Wall time {_fmt_seconds(after + federation)}: the federation's pretraining {_fmt_seconds(federation)}, "
            f"the rest of the study {_fmt_seconds(after)} (writing the DICOM and the caches not counted).")


def _lines(data: dict[str, Any], plots: list[tuple[str, Path]], run_dir: Path) -> list[str]:
    cfg, budget, tasks = data["config"], data["budget"], data["tasks"]
    level = str(cfg["judged_labels_per_site"])
    sites = data["sites"]
    n_test = sum(s["test"] for s in sites.values())
    sizes = ", ".join(f"{name}: {site['scans']} scans" for name, site in sites.items())
    lines = [
        "# Label efficiency: does pretraining pay off when labels are scarce?",
        "",
        f"Status: **{data['status']}**. {len(sites)} sites ({sizes}); "
        f"{n_test} held-out test scans in all, never pretrained on or used for a choice; "
        f"{sum(s['val'] for s in sites.values())} validation scans pick each arm's fine-tuning mode and draw the pretraining curve. "
        f"Pretraining budget: {budget['pretrain_steps_per_model']} optimiser steps per model ({budget['rounds']} rounds x "
        f"{budget['local_steps']} steps, batch {budget['batch_size']}); fine-tuning {budget['finetune_steps']} steps of batch "
        f"{budget['finetune_batch_size']} per head, level and mode. Seeds: "
        + ", ".join(f"{k} {v}" for k, v in data["seeds"].items())
        + f". {_wall_time_sentence(data)}",
        "",
        "Heads: " + "; ".join(f"**{heads}**: {text}" for heads, text in data.get("heads", {}).items()) + ".",
        "",
        f"## Targets at {level} labelled scans per site",
        "",
    ]
    lines += _table(["heads", "target", "met", "detail"],
                    [[t.get("heads", "-"), t["target"], "yes" if t["met"] else "**no**", t["detail"]] for t in data.get("targets", [])])
    lines += [
        "",
        f"A verdict counts as evidence only with >= {MIN_EVIDENCE_TEST_SCANS} test scans and a CI half-width <= "
        f"{TARGET_HALF_WIDTH:.2f}; the others are marked *too small to conclude*. With {len(tasks)} tasks x "
        f"{len(cfg['labels_per_site'])} levels, some CIs clear by chance alone (about 1 in 40 per one-sided test).",
        "",
    ]
    summary = data.get("summary", {})
    levels = [str(lv) for lv in cfg["labels_per_site"]]
    lines += ["## Mean test AUROC over tasks (mode chosen on validation)", ""]
    lines += _table(["heads", "arm", *(f"{lv} labels/site" for lv in levels)], [
        [heads, arm, *(f"{_mean(by_level[lv]):.3f} ({by_level[lv]['mode']})" if lv in by_level else "–" for lv in levels)]
        for heads, arms in summary.items() for arm, by_level in arms.items()
    ])
    for heads, arms in summary.items():
        lines += ["", f"## {heads} heads: verdicts per level (of {len(tasks)} tasks; median CI half-width)", ""]
        lines += _verdict_counts(data, heads)
        present = [arm for arm in arms if level in arms[arm]]
        lines += ["", f"## {heads} heads: pooled test AUROC at {level} labelled scans per site (mode chosen on validation)", ""]
        header = ["task"] + [f"{arm} ({arms[arm][level]['mode']})" for arm in present]
        lines += _table(header, [[task] + [_ci(arms[arm][level]["auroc"][task]) for arm in present] for task in tasks])
    lines += ["", "## Verdicts (every kind of head, task and level)", ""]
    lines += _table(
        ["question", "heads", "task", "labels/site", "where", "difference [95% CI]", "target", "n test (pos.)", "verdict"],
        [[v["key"], v.get("heads", "-"), v["task"], str(v["labels_per_site"]), v["where"],
          f"{v['difference']['of']} = {_ci(v['difference'], True)}",
          f"{v['kind']} {v['target']:+.2f}", f"{v['n_test']} ({v['n_positive']})", _status(v)] for v in data.get("verdicts", [])],
    )
    dp = data["arms"].get(Arm.federated_dp.value, {}).get("privacy", {})
    if dp:
        lines += ["", "## The local-DP arm", "",
                  f"Privacy settings: `{json.dumps(dp.get('privacy', {}))}`; epsilon per site after the last round: "
                  + ", ".join(f"{site} {eps:.2f}" for site, eps in dp.get("site_epsilon", {}).items()) + "."]
    lines += ["", "## Pretraining curve (validation probe)", ""]
    lines += _table(["arm", "steps: mean validation AUROC"], [
        [arm, ", ".join(f"{c['steps']}: {c['mean_val_auroc']:.3f}" for c in entry.get("curve", []) if c["mean_val_auroc"] is not None)]
        for arm, entry in data["arms"].items() if entry.get("curve")
    ])
    lines += ["", "## Wall time", ""]
    lines += _table(["stage", "time"], [
        *[[f"{arm}: {stage}", _fmt_seconds(seconds)] for arm, entry in data["arms"].items() for stage, seconds in entry.get("wall_seconds", {}).items()],
        *[["total after the federation" if stage == "total" else stage, _fmt_seconds(seconds)] for stage, seconds in data["wall_seconds"].items()],
    ])
    lines += ["", "## Plots", ""]
    lines += [f"![{caption}]({path.relative_to(run_dir).as_posix()})\n" for caption, path in plots]
    return lines


def render_study_report(run_dir: Path) -> Path:
    """Write ``label_efficiency/study.md`` and its plots from study.json; returns the report path."""
    data = load_study(run_dir)
    study_dir = run_dir / STUDY_DIR
    plots_dir = study_dir / PLOTS
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    for heads in data.get("summary", {}):
        _plot_auroc(data, heads, plots_dir / auroc_plot(heads))
        plots.append((f"Pooled test AUROC against labelled scans per site, {heads} heads", plots_dir / auroc_plot(heads)))
    _plot_curve(data, plots_dir / CURVE_PLOT)
    plots.append(("Validation probe along pretraining", plots_dir / CURVE_PLOT))
    report = study_dir / STUDY_MD
    write_text_atomic(report, "\n".join(_lines(data, plots, study_dir)) + "\n")
    return report


def console_summary(data: dict[str, Any]) -> str:
    """The targets and the judged level's pooled AUROC per arm, for the terminal."""
    level = str(data["config"]["judged_labels_per_site"])
    lines = [f"targets at {level} labelled scans per site:"]
    lines += [f"  {'met ' if t['met'] else 'NOT '} [{t.get('heads', '-')}] {t['target']}: {t['detail']}" for t in data.get("targets", [])]
    for heads, arms in data.get("summary", {}).items():
        for arm, by_level in arms.items():
            entry = by_level.get(level)
            if entry:
                lines.append(f"  {heads:<13} {arm:<14} ({entry['mode']}, {entry['where']}) mean test AUROC over tasks {_mean(entry):.3f}")
    return "\n".join(lines)
