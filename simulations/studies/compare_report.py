"""Verdicts, ``compare.md`` and plots of the ``compare`` study, from ``compare.json`` alone.

Like ``report.md`` (simulations/report/report.py), everything here is a function of the JSON file,
so the report can be re-rendered after the fact and a crashed study still reports the arms it
finished. Verdicts use paired bootstrap differences of AUROC on the same held-out scans.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ctfed.common.fileio import write_text_atomic
from ctfed.simulations.studies.compare import COMPARE_JSON, POOLED, SHARED, Arm
from ctfed.simulations.studies.downstream import MIN_EVIDENCE_TEST_SCANS, TARGET_HALF_WIDTH, judged_difference, paired_auroc_difference
from ctfed.simulations.report.report import PLOTS_DIR, _empty, _fmt_seconds, _save, _table

COMPARE_MD = "compare.md"
AUROC_PLOT = "compare_auroc.png"
LOSS_PLOT = "compare_pretraining_loss.png"
TEACHER_PLOT = "compare_teacher_policy_loss.png"
# Where a verdict that is too small to conclude sends the reader.
STUDY_POINTER = "docs/studies.md says which study can answer it, and what it has given so far"
# Feature spread below this share of the uniform spread: the encoder maps a site's scans to
# nearly one point, and fine-tuned scores reflect the head rather than the pretraining.
COLLAPSE_FRACTION = 0.1

ARM_COLOURS = {Arm.federated: "tab:blue", Arm.centralized: "tab:green", Arm.local_only: "tab:orange", Arm.scratch: "tab:grey"}
# Distinct markers: in round 1 a federated site and the same site alone take identical steps.
ARM_MARKERS = {Arm.federated: "o", Arm.centralized: "s", Arm.local_only: "x", Arm.scratch: "."}


class CompareReportError(ValueError):
    """A compare.json that cannot be reported; the message names the problem."""


def load_compare(run_dir: Path) -> dict[str, Any]:
    path = run_dir / COMPARE_JSON
    if not path.is_file():
        raise CompareReportError(f"{path} not found; run `ctfed simulate preset=compare` first")
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- verdicts


def _held_out(data: dict[str, Any], arm: Arm, mode: str, where: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, scores) of the primary task at a site, or all evaluated sites for POOLED."""
    results = data["arms"].get(arm.value, {}).get("downstream", {}).get(mode, {})
    sites = [s for s, info in data["sites"].items() if info["evaluable"]] if where == POOLED else [where]
    if any(site not in results for site in sites):
        return None
    labels = np.concatenate([np.asarray(results[s]["labels"])[:, 0] for s in sites])
    scores = np.concatenate([np.asarray(results[s]["probs"])[:, 0] for s in sites])
    return labels, scores


def _auroc(data: dict[str, Any], arm: Arm, mode: str, where: str) -> dict[str, float]:
    return data["arms"][arm.value]["downstream"][mode][where]["metrics"][data["task"]]["auroc"]


def _verdict(
    data: dict[str, Any], key: str, question: str, a: tuple[Arm, str], b: tuple[Arm, str], where: str, target: float, gap: bool
) -> dict[str, Any] | None:
    """Judge AUROC(a) - AUROC(b) > target (a gain); with ``gap``, AUROC(b) - AUROC(a) <= target (how far a trails b)."""
    held_a, held_b = _held_out(data, *a, where), _held_out(data, *b, where)
    if held_a is None or held_b is None:
        return None
    labels = held_a[0]
    if not np.array_equal(labels, held_b[0]):
        raise CompareReportError(f"{key}: arms {a[0].value} and {b[0].value} were tested on different scans")
    first, second = (b, a) if gap else (a, b)
    judged = judged_difference(
        labels, held_a[1], held_b[1], target, gap, int(data["compare_config"]["n_boot"]), int(data["seeds"]["bootstrap"])
    )
    return {
        "key": key,
        "question": question,
        "where": where,
        "a": {"arm": a[0].value, "mode": a[1], "auroc": _auroc(data, *a, where)},
        "b": {"arm": b[0].value, "mode": b[1], "auroc": _auroc(data, *b, where)},
        **judged,
        "difference": {"of": _difference_name(first, second), **judged["difference"]},
    }


def _difference_name(first: tuple[Arm, str], second: tuple[Arm, str]) -> str:
    """``a - b``, naming the fine-tuning modes only where they differ."""
    if first[1] == second[1]:
        return f"{first[0].value} - {second[0].value}"
    return f"{first[0].value} ({first[1]}) - {second[0].value} ({second[1]})"


def judge(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's three questions, on the primary fine-tuning mode's AUROC."""
    cfg = data["compare_config"]
    mode = data["primary_mode"]
    smallest = data["smallest_site"]
    candidates = [
        _verdict(data, "pretrained_vs_scratch", f"Does federated SSL pretraining + {mode} fine-tuning beat scratch (pooled)?",
                 (Arm.federated, mode), (Arm.scratch, mode), POOLED, cfg["target_gain_over_scratch"], gap=False),
        _verdict(data, "centralized_vs_scratch", f"Does centralized SSL pretraining + {mode} fine-tuning beat scratch (pooled)?",
                 (Arm.centralized, mode), (Arm.scratch, mode), POOLED, cfg["target_gain_over_scratch"], gap=False),
    ]
    if "full" in data["modes"] and mode != "full":
        candidates.append(
            _verdict(data, "pretrained_vs_scratch_full", f"Does federated SSL + {mode} beat training from scratch (full fine-tune, pooled)?",
                     (Arm.federated, mode), (Arm.scratch, "full"), POOLED, cfg["target_gain_over_scratch"], gap=False)
        )
    candidates += [
        _verdict(data, "federated_vs_local_only", f"Does federated beat local-only at the smallest site ({smallest})?",
                 (Arm.federated, mode), (Arm.local_only, mode), smallest, cfg["target_gain_over_local_only"], gap=False),
        _verdict(data, "gap_to_centralized", "How far does federated trail centralized (pooled)?",
                 (Arm.federated, mode), (Arm.centralized, mode), POOLED, cfg["max_gap_to_centralized"], gap=True),
    ]
    return [v for v in candidates if v is not None]


def _ci(est: dict[str, float], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(est['value'])} [{fmt.format(est['low'])}, {fmt.format(est['high'])}]"


def verdict_text(v: dict[str, Any]) -> str:
    """One paragraph: the numbers with CIs, the target, and what they do (not) show."""
    a, b, diff = v["a"], v["b"], v["difference"]
    numbers = (
        f"{a['arm']} ({a['mode']}) AUROC {_ci(a['auroc'])} vs {b['arm']} ({b['mode']}) {_ci(b['auroc'])}; "
        f"{diff['of']} = {_ci(diff, signed=True)} (paired bootstrap, {v['n_test']} held-out scans, "
        f"{v['n_positive']} positive). Target: {diff['of']} {v['kind']} {v['target']:+.3f}."
    )
    if not v["evidence"]:
        # A verdict needs a test set that can answer: "missed by" on a CI that spans most of
        # [-1, 1] would read as a finding.
        return (
            f"{numbers} **Too small to conclude**: {v['n_test']} held-out scans give a CI half-width of "
            f"±{_half_width(v):.2f} (evidence needs >= {MIN_EVIDENCE_TEST_SCANS} scans and ±{TARGET_HALF_WIDTH:.2f}); "
            f"this smoke-test size shows the pipeline, not the answer ({STUDY_POINTER})."
        )
    if v["met"] and v["ci_clears_target"]:
        outcome = "**Met**; the whole 95% CI is on the target's side."
    elif v["met"]:
        outcome = "**Met on the point estimate only**; the 95% CI also covers values that miss the target."
    else:
        covers = diff["high"] > v["target"] if v["kind"] == "more than" else diff["low"] <= v["target"]
        outcome = f"**Missed by {v['missed_by']:.3f} AUROC**; the 95% CI {'still covers' if covers else 'excludes'} the target."
    if diff["low"] == diff["high"]:
        outcome += " The CI has zero width: both arms rank the held-out scans the same way in every resample."
    return f"{numbers} {outcome}"


def _half_width(v: dict[str, Any]) -> float:
    return (v["difference"]["high"] - v["difference"]["low"]) / 2.0


def _needed_test_scans(v: dict[str, Any]) -> int:
    """Held-out scans for a CI half-width of TARGET_HALF_WIDTH, scaling as 1/sqrt(n) from this run."""
    half_width = _half_width(v)
    if not math.isfinite(half_width) or half_width <= 0:
        return v["n_test"]
    return max(v["n_test"], math.ceil(v["n_test"] * (half_width / TARGET_HALF_WIDTH) ** 2))


def collapsed_pairs(data: dict[str, Any]) -> list[str]:
    """``arm/site`` pairs whose CLS features have (nearly) collapsed."""
    return [
        f"{arm.value}/{site}"
        for arm in _arms_present(data)
        for site, monitor in data["arms"][arm.value]["representation"].items()
        if monitor["embedding_std"] < COLLAPSE_FRACTION * monitor["uniform_std"]
    ]


# ----------------------------------------------------------------------------- plots


def _arms_present(data: dict[str, Any]) -> list[Arm]:
    return [arm for arm in Arm if arm.value in data["arms"]]


def _plot_auroc(data: dict[str, Any], path: Path) -> None:
    """AUROC with 95% CI per arm at every site and pooled; one panel per fine-tuning mode."""
    modes = data["modes"]
    places = [s for s, info in data["sites"].items() if info["evaluable"]] + [POOLED]
    fig = Figure(figsize=(2.0 + 1.6 * len(places), 3.2 * len(modes)))
    axes = fig.subplots(len(modes), 1, squeeze=False)[:, 0]
    arms = _arms_present(data)
    width = 0.8 / max(len(arms), 1)
    task = data["task"]
    for ax, mode in zip(axes, modes):
        ax.set_title(f"AUROC ({task}) with 95% bootstrap CI, fine-tuning: {mode}")
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=0.8)
        if not arms:
            _empty(ax, "no arm finished yet")
            continue
        for index, arm in enumerate(arms):
            results = data["arms"][arm.value]["downstream"].get(mode, {})
            xs, values, low, high = [], [], [], []
            for x, place in enumerate(places):
                if place in results:
                    auroc = results[place]["metrics"][task]["auroc"]
                    xs.append(x + (index - (len(arms) - 1) / 2) * width)
                    values.append(auroc["value"])
                    low.append(auroc["value"] - auroc["low"])
                    high.append(auroc["high"] - auroc["value"])
            ax.errorbar(xs, values, yerr=[low, high], fmt="o", capsize=3, color=ARM_COLOURS[arm], label=arm.value)
        ax.set_xticks(range(len(places)), places)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("AUROC")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save(fig, path)


def _plot_losses(data: dict[str, Any], path: Path) -> None:
    """Pretraining loss per optimiser step: each trained model of each arm (scratch has none)."""
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    ax.set_title("Pretraining loss per step (DINO + iBOT)")
    ax.set_xlabel("optimiser step of the model")
    ax.set_ylabel("loss")
    drawn = False
    for arm in _arms_present(data):
        losses: dict[str, list[float]] = data["arms"][arm.value]["pretrain_losses"]
        for index, (model, values) in enumerate(sorted(losses.items())):
            label = arm.value if model == SHARED else f"{arm.value} {model}"
            style = "-" if model == SHARED else ["--", ":", "-."][index % 3]
            ax.plot(range(1, len(values) + 1), values, style, color=ARM_COLOURS[arm], marker=ARM_MARKERS[arm], label=label)
            drawn = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if drawn:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        _empty(ax, "no pretraining losses recorded yet")
    fig.tight_layout()
    _save(fig, path)


def _plot_teacher_losses(policies: dict[str, Any], path: Path) -> None:
    """SSL loss per round (mean of a site's local steps) under each teacher policy."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.set_title("SSL loss per round by teacher policy (train.teacher_on_new_global)")
    ax.set_xlabel("round")
    ax.set_ylabel("mean local-step loss")
    for (policy, entry), colour in zip(policies.items(), ("tab:blue", "tab:red")):
        losses = entry["ssl_loss_per_round"]
        rounds = range(1, len(losses["mean"]) + 1)
        ax.plot(rounds, losses["mean"], "-o", color=colour, label=f"{policy} (mean over sites)")
        for site, values in sorted(losses["sites"].items()):
            ax.plot(range(1, len(values) + 1), values, ":", color=colour, alpha=0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def teacher_policy_difference(data: dict[str, Any]) -> dict[str, float] | None:
    """Pooled AUROC(other policy) - AUROC(base policy), paired on the same test scans (primary mode)."""
    section = data.get("teacher_policies")
    if not section:
        return None
    base = section["base"]
    other = next(p for p in section["policies"] if p != base)
    mode = data["primary_mode"]
    evaluable = [s for s, info in data["sites"].items() if info["evaluable"]]
    held = []
    for policy in (other, base):
        results = section["policies"][policy]["downstream"][mode]
        if any(site not in results for site in evaluable):
            return None
        held.append((
            np.concatenate([np.asarray(results[s]["labels"])[:, 0] for s in evaluable]),
            np.concatenate([np.asarray(results[s]["probs"])[:, 0] for s in evaluable]),
        ))
    if not np.array_equal(held[0][0], held[1][0]):
        raise CompareReportError("teacher policies were tested on different scans")
    diff = paired_auroc_difference(held[0][0], held[0][1], held[1][1], int(data["compare_config"]["n_boot"]), int(data["seeds"]["bootstrap"]))
    return {"of": f"{other} - {base}", **diff}


def _teacher_lines(data: dict[str, Any], plot: Path | None, run_dir: Path) -> list[str]:
    section = data.get("teacher_policies")
    if not section:
        return []
    task, mode = data["task"], data["primary_mode"]
    lines = [
        "## Teacher policy",
        "",
        "The same federation (sites, seeds, budget) with each `train.teacher_on_new_global`: `reset` copies the new "
        "global student into a site's EMA teacher every round, `keep` lets the site's teacher carry its EMA across "
        f"rounds. Base run: `{section['base']}`. Loss: mean of the local steps of a round, averaged over sites; "
        "kNN and std (share of the uniform spread) averaged over sites; AUROC pooled, fine-tuning "
        f"`{mode}`.",
        "",
    ]
    rows = []
    for policy, entry in section["policies"].items():
        monitors = entry["representation"].values()
        knn = np.mean([m["knn_accuracy"] for m in monitors]) if monitors else math.nan
        spread = np.mean([m["embedding_std"] / m["uniform_std"] for m in monitors]) if monitors else math.nan
        pooled = entry["downstream"][mode].get(POOLED)
        rows.append([
            f"`{policy}`",
            " → ".join(f"{x:.3f}" for x in entry["ssl_loss_per_round"]["mean"]),
            f"{knn:.3f}",
            f"{spread:.3f}",
            _ci(pooled["metrics"][task]["auroc"]) if pooled else "–",
            f"`{entry['run_dir']}`",
        ])
    lines += _table(["policy", "SSL loss per round", "kNN accuracy", "std / uniform", "pooled AUROC", "run"], rows) + [""]
    diff = teacher_policy_difference(data)
    if diff is not None:
        lines += [f"Paired pooled AUROC difference {diff['of']}: {_ci(diff, signed=True)}.", ""]
    if plot is not None:
        lines += [f"![SSL loss per round by teacher policy]({plot.relative_to(run_dir).as_posix()})", ""]
    return lines


# ----------------------------------------------------------------------------- markdown


def _cell(results: dict[str, Any], place: str, task: str, metric: str = "auroc") -> str:
    return _ci(results[place]["metrics"][task][metric]) if place in results else "–"


def _lines(data: dict[str, Any], run_dir: Path, plots: list[tuple[str, Path]]) -> list[str]:
    task, mode, budget = data["task"], data["primary_mode"], data["budget"]
    sites = data["sites"]
    evaluable = [s for s, info in sites.items() if info["evaluable"]]
    places = evaluable + [POOLED]
    lines = [f"# Compare: federated vs centralized vs local-only vs scratch ({run_dir.name})", ""]
    if data["status"] != "completed":
        lines += [f"> Status **{data['status']}**: only the arms below finished.", ""]
    lines += [
        f"Task `{task}` (synthetic haemorrhage labels), model `{data['model']}`. Every pretrained model took "
        f"{budget['pretrain_steps_per_model']} optimiser steps ({budget['rounds']} rounds x {budget['local_steps']} "
        f"local steps, batch {budget['batch_size']}) from the same initial encoder; every arm fine-tunes "
        f"{budget['finetune_steps']} steps (batch {budget['finetune_batch_size']}) with the same split, head "
        f"initialisation and batch order. Seeds: " + ", ".join(f"{k} {v}" for k, v in data["seeds"].items()) + ".",
        "",
        "## Sites",
        "",
    ]
    rows = [
        [name, str(info["scans"]), str(info.get("train", "–")), str(info.get("test", "–")), str(info.get("test_positives", "–")),
         "yes" + (" (smallest)" if name == data["smallest_site"] else "") if info["evaluable"] else f"no: {info['reason']}"]
        for name, info in sites.items()
    ]
    lines += _table(["site", "scans", "fine-tune scans", "test scans", "test positives", "evaluated"], rows) + [""]

    lines += ["## Arms and budgets", ""]
    rows = []
    for arm in _arms_present(data):
        entry = data["arms"][arm.value]
        b, wall = entry["budget"], entry["wall_seconds"]
        files = ", ".join(f"`{e['file']}`" for e in entry["encoders"].values())
        rows.append([arm.value, entry["description"], str(b["pretrain_steps_per_model"]), str(b["models"]),
                     str(b["volumes_seen"]), _fmt_seconds(wall["pretrain"]), _fmt_seconds(wall["downstream"]), files])
    lines += _table(["arm", "what", "steps per model", "models", "volumes seen", "pretrain time", "downstream time", "encoder"], rows)
    lines += ["", "The federated arm's volumes seen add up over all sites (each site trains the same number of steps).", ""]

    for each_mode in data["modes"]:
        lines += [f"## AUROC, fine-tuning `{each_mode}`" + (" (primary)" if each_mode == mode else ""), ""]
        rows = [[arm.value] + [_cell(data["arms"][arm.value]["downstream"].get(each_mode, {}), p, task) for p in places]
                for arm in _arms_present(data)]
        lines += _table(["arm", *places], rows) + [""]

    lines += [f"## All metrics, pooled, `{mode}`", ""]
    metric_names = ("auroc", "average_precision", "balanced_accuracy", "f1")
    rows = [[arm.value] + [_cell(data["arms"][arm.value]["downstream"].get(mode, {}), POOLED, task, m) for m in metric_names]
            for arm in _arms_present(data)]
    lines += _table(["arm", "AUROC", "AP", "balanced accuracy", "F1"], rows)
    lines += ["", "Per-site values of every metric and the held-out predictions are in `compare.json`.", ""]

    lines += ["## Representation monitor (no fine-tuning)", ""]
    rows = []
    for arm in _arms_present(data):
        rep = data["arms"][arm.value]["representation"]
        rows.append([arm.value] + [
            f"kNN {rep[s]['knn_accuracy']:.2f}, std {rep[s]['embedding_std']:.3f} / {rep[s]['uniform_std']:.3f}" if s in rep else "–"
            for s in evaluable
        ])
    lines += _table(["arm", *evaluable], rows)
    lines += ["", "kNN: accuracy of a cosine k-nearest-neighbour vote of CLS features on the test scans. std: spread of the "
              "normalised features (0 = collapse) against the spread of uniformly spread features.", ""]
    collapsed = collapsed_pairs(data)
    if collapsed:
        pairs = sum(len(data["arms"][arm.value]["representation"]) for arm in _arms_present(data))
        lines += [f"**Collapsed features** in {len(collapsed)} of {pairs} arm/site pairs ({', '.join(collapsed)}): "
                  f"feature spread below {COLLAPSE_FRACTION:g} x uniform, so the encoder maps the site's scans to nearly "
                  "one point and fine-tuned scores there say more about the head than about pretraining.", ""]

    lines += ["## Verdicts", ""]
    verdicts = data.get("verdicts") or []
    if not verdicts:
        lines += ["Not judged yet (the study has not finished).", ""]
    for v in verdicts:
        lines += [f"- **{v['question']}** {verdict_text(v)}"]
    if verdicts and all(v["evidence"] for v in verdicts):
        lines += ["", f"Every verdict rests on at least {MIN_EVIDENCE_TEST_SCANS} held-out scans with a CI half-width of at most "
                  f"{TARGET_HALF_WIDTH:.2f} AUROC: evidence for these sites and this budget.", ""]
    elif verdicts:
        needed = max(_needed_test_scans(v) for v in verdicts)
        widest = max(v["difference"]["high"] - v["difference"]["low"] for v in verdicts)
        lines += [
            "",
            f"**What these numbers are worth.** This run is too small to be evidence: {verdicts[0]['n_test']} held-out "
            f"scans pooled, AUROC-difference CIs up to {widest:.2f} wide, a `{data['model']}` encoder and "
            f"{budget['pretrain_steps_per_model']} pretraining steps. It shows that the study runs end to end and scores "
            "every arm the same way; it says nothing for or against federated pretraining.",
            "",
            "**A full-size run** would use `model=vit_b` (3x96³, the FM-CT backbone), the FM-CT schedule "
            "(tens of thousands of pretraining steps, e.g. `federation.rounds=100 train.local_steps=250`), "
            "thousands of unlabelled scans per site and the paper's fine-tuning budget (`compare.finetune.probe_steps` "
            "and `stage_steps` worth 10 + 20 epochs), on GPUs. To narrow the CIs to ±"
            f"{TARGET_HALF_WIDTH:.2f} AUROC it needs about {needed} held-out labelled scans per comparison "
            "(scaled as 1/√n from this run's widest CI; at least "
            f"{MIN_EVIDENCE_TEST_SCANS}).",
            "",
        ]

    teacher_plot = run_dir / PLOTS_DIR / TEACHER_PLOT
    lines += _teacher_lines(data, teacher_plot if teacher_plot.is_file() else None, run_dir)

    lines += ["## Plots", ""]
    lines += [f"![{caption}]({p.relative_to(run_dir).as_posix()})\n" for caption, p in plots]
    return lines


def render_compare_report(run_dir: Path) -> Path:
    """Write ``compare.md`` and the compare plots from ``compare.json``; returns the report path."""
    data = load_compare(run_dir)
    plots_dir = run_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    _plot_auroc(data, plots_dir / AUROC_PLOT)
    _plot_losses(data, plots_dir / LOSS_PLOT)
    plots = [("AUROC per arm and site", plots_dir / AUROC_PLOT), ("Pretraining loss per arm", plots_dir / LOSS_PLOT)]
    if data.get("teacher_policies"):
        _plot_teacher_losses(data["teacher_policies"]["policies"], plots_dir / TEACHER_PLOT)
    report = run_dir / COMPARE_MD
    write_text_atomic(report, "\n".join(_lines(data, run_dir, plots)))
    return report


def console_summary(data: dict[str, Any]) -> str:
    """Pooled AUROC per arm (primary mode) and the verdicts' headline, for the terminal."""
    task, mode = data["task"], data["primary_mode"]
    lines = [f"arm          pooled AUROC ({mode}) [95% CI]"]
    for arm in _arms_present(data):
        results = data["arms"][arm.value]["downstream"].get(mode, {})
        lines.append(f"{arm.value:<12} {_cell(results, POOLED, task)}")
    for v in data.get("verdicts", []):
        if not v["evidence"]:
            status = f"too small to conclude ({v['n_test']} test scans, ±{_half_width(v):.2f})"
        else:
            status = "met" if v["met"] else f"missed by {v['missed_by']:.3f}"
        lines.append(f"{v['key']:<28} {v['difference']['of']} = {_ci(v['difference'], signed=True)}: {status}")
    collapsed = collapsed_pairs(data)
    if collapsed:
        lines.append(f"warning: collapsed encoder features in {len(collapsed)} arm/site pairs (see compare.md)")
    return "\n".join(lines)
