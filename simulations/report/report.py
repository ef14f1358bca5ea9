"""A run folder's human-readable report: ``report.md`` plus PNG plots under ``plots/``.

The text is the coordinator's (server/report.py: ``RunRecorder`` rewrites report.md after
every round); this module adds the plots and a simulation's data split, so ``ctfed report
RUN_DIR`` and the end of ``ctfed simulate`` render the full report from ``results.json``
(and ``config.yaml``) alone -- mid-run, after a crash, or after this module improves. Its
output depends only on those files, so two renders of the same run are byte-identical.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ctfed.common.fileio import write_text_atomic
from ctfed.server.report import (  # noqa: F401  (ReportError, _fmt_seconds, _table: used by the studies' reports)
    REPORT_NAME,
    ReportError,
    RunResults,
    _byte_unit,
    _fmt_bytes,
    _fmt_loss,
    _fmt_seconds,
    _spread,
    _table,
    load_results,
    read_config,
    render_markdown,
    weighted_loss,
)
from ctfed.server.results import RoundRecord, SiteRoundRecord
from ctfed.simulations.data.split import split_markdown

PLOTS_DIR = "plots"
LOSS_STEPS_PLOT = "loss_per_step.png"
LOSS_ROUNDS_PLOT = "loss_per_round.png"
BYTES_PLOT = "bytes_per_round.png"
MONITOR_PLOT = "monitor.png"

_DPI = 110
_MAX_ROUND_LABELS = 20  # beyond this many rounds, label only every k-th boundary


# ---------------------------------------------------------------------------- plots


def _site_colours(sites: list[str]) -> dict[str, Any]:
    cmap = colormaps["tab10" if len(sites) <= 10 else "tab20"]
    return {site: cmap(i % cmap.N) for i, site in enumerate(sites)}


def _finite(value: float | None) -> float:
    """NaN for a missing or non-finite value, so matplotlib leaves a gap instead of failing."""
    return value if value is not None and math.isfinite(value) else math.nan


def _empty(ax: Axes, message: str) -> None:
    """Say why a plot has no data, instead of showing meaningless 0..1 axes."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="grey")


def _plot_loss_per_step(ax: Axes, results: RunResults, colours: dict[str, Any]) -> None:
    """Local losses on a global step axis; each round a separate segment, since a round starts
    from the new global encoder and its first loss is not a continuation of the last."""
    steps_per_round = max((len(s.losses) for r in results.rounds for s in r.sites), default=0)
    ax.set_title("Training loss per local step")
    ax.set_xlabel("global step (round boundaries dashed)")
    ax.set_ylabel("loss")
    if steps_per_round == 0:
        _empty(ax, "no local losses recorded")
        return
    labelled: set[str] = set()
    for record in results.rounds:
        start = (record.round - 1) * steps_per_round
        for site in sorted(record.sites, key=lambda s: s.site):
            if not site.losses:
                continue
            xs = [start + i + 1 for i in range(len(site.losses))]
            ax.plot(
                xs,
                [_finite(v) for v in site.losses],
                marker="o",
                markersize=3,
                color=colours[site.site],
                label=None if site.site in labelled else site.site,
            )
            labelled.add(site.site)
    stride = math.ceil(len(results.rounds) / _MAX_ROUND_LABELS)
    for index, record in enumerate(results.rounds):
        boundary = (record.round - 1) * steps_per_round + 0.5
        ax.axvline(boundary, color="grey", linestyle="--", linewidth=0.8)
        if index % stride == 0:
            ax.text(boundary, 1.0, f" r{record.round}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(title="site", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _plot_loss_per_round(ax: Axes, results: RunResults, colours: dict[str, Any]) -> None:
    rounds = [r.round for r in results.rounds]
    ax.set_title("Last-step loss per round")
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    if not any(s.loss is not None for r in results.rounds for s in r.sites):
        _empty(ax, "no losses recorded")
        return
    for site in results.sites:
        losses = [_finite(next((s.loss for s in r.sites if s.site == site), None)) for r in results.rounds]
        if all(math.isnan(v) for v in losses):
            continue  # a site that never trained has no line; the failures section names it
        ax.plot(rounds, losses, marker="o", markersize=4, color=colours[site], label=site)
    mean = [_finite(weighted_loss(r)) for r in results.rounds]
    ax.plot(rounds, mean, marker="s", color="black", linewidth=2.2, linestyle="--", label="weighted mean")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _plot_bytes(axes: tuple[Axes, Axes], results: RunResults, colours: dict[str, Any]) -> None:
    """Grouped bars per round, one per site; sent is what the coordinator sent each sampled site."""
    sent_ax, received_ax = axes
    sent_ax.set_title("Bytes per round, server → site (global encoder)")
    received_ax.set_title("Bytes per round, site → server (site update)")
    received_ax.set_xlabel("round")
    sent = [r.bytes_sent_per_site for r in results.rounds]
    largest = max([0, *sent, *(s.bytes_received for r in results.rounds for s in r.sites)])
    divisor, unit = _byte_unit(largest)
    sites = results.sites
    width = 0.8 / max(len(sites), 1)
    panels: tuple[tuple[Axes, Callable[[RoundRecord, SiteRoundRecord], int]], ...] = (
        (sent_ax, lambda r, s: r.bytes_sent_per_site),
        (received_ax, lambda r, s: s.bytes_received),
    )
    for ax, amount in panels:
        ax.set_ylabel(unit)
        if not results.rounds:
            _empty(ax, "no rounds recorded yet")
            continue
        for index, site in enumerate(sites):
            bars = [(r.round, amount(r, s)) for r in results.rounds for s in r.sites if s.site == site]
            offset = (index - (len(sites) - 1) / 2) * width
            ax.bar(
                [x + offset for x, _ in bars],
                [b / divisor for _, b in bars],
                width=width,
                color=colours[site],
                label=site,
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if results.rounds:
        sent_ax.legend(title="site", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))



def _plot_monitor(axes: tuple[Axes, Axes], results: RunResults, colours: dict[str, Any]) -> None:
    """Each site's monitor of the encoder it received, per round: one line per site."""
    knn_ax, spread_ax = axes
    knn_ax.set_title("kNN accuracy of held-out labelled scans (global encoder, before local training)")
    knn_ax.set_ylabel("kNN accuracy")
    knn_ax.set_ylim(-0.05, 1.05)
    spread_ax.set_title("Feature spread: embedding_std / uniform_std (0: collapsed, 1: uniform on the sphere)")
    spread_ax.set_ylabel("std / uniform")
    spread_ax.set_xlabel("round")
    monitored = results.monitored_rounds
    for site in results.sites:
        points = [(r.round, s) for r in monitored for s in r.sites if s.site == site and s.monitor]
        if not points:
            continue
        rounds = [x for x, _ in points]
        knn_ax.plot(rounds, [s.monitor["knn_accuracy"] for _, s in points], marker="o", markersize=4, color=colours[site], label=site)  # type: ignore[index]
        spread_ax.plot(rounds, [_spread(s) for _, s in points], marker="o", markersize=4, color=colours[site], label=site)
    spread_ax.set_ylim(bottom=0)
    spread_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    knn_ax.legend(title="site", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _save(fig: Figure, path: Path) -> None:
    # The Agg canvas directly (no pyplot): no global backend state, no GUI, safe in threads.
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI)


def render_plots(results: RunResults, plots_dir: Path) -> list[tuple[str, Path]]:
    """Write the PNGs (the monitor's only when a site reported it); returns (caption, path) pairs in report order."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    colours = _site_colours(results.sites)

    steps = Figure(figsize=(9, 4.5), layout="constrained")
    _plot_loss_per_step(steps.subplots(), results, colours)
    rounds = Figure(figsize=(9, 4.5), layout="constrained")
    _plot_loss_per_round(rounds.subplots(), results, colours)
    traffic = Figure(figsize=(9, 6), layout="constrained")
    sent_ax, received_ax = traffic.subplots(2, 1, sharex=True)
    _plot_bytes((sent_ax, received_ax), results, colours)

    figures = [
        ("Loss per local step", steps, LOSS_STEPS_PLOT),
        ("Last-step loss per round", rounds, LOSS_ROUNDS_PLOT),
        ("Bytes per round", traffic, BYTES_PLOT),
    ]
    if results.monitored_rounds:
        monitor = Figure(figsize=(9, 6), layout="constrained")
        knn_ax, spread_ax = monitor.subplots(2, 1, sharex=True)
        _plot_monitor((knn_ax, spread_ax), results, colours)
        figures.append(("Representation monitor per round", monitor, MONITOR_PLOT))

    written = []
    for caption, fig, name in figures:
        _save(fig, plots_dir / name)
        written.append((caption, plots_dir / name))
    return written


# ---------------------------------------------------------------------------- report


def render_report(run_dir: Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` into ``run_dir``; returns the report's path.

    Raises ReportError when results.json is missing or malformed.
    """
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    config = read_config(run_dir, results)
    plots = render_plots(results, run_dir / PLOTS_DIR)
    split = split_markdown(results.data_split) if results.data_split is not None else []
    report = run_dir / REPORT_NAME
    write_text_atomic(report, render_markdown(run_dir, results, config, plots, split))
    return report


def console_table(results: RunResults) -> str:
    """A plain-text round-by-site table for the terminal at the end of ``ctfed simulate``."""
    lines = ["round  site        status      loss(first->last)  received from site"]
    for record in results.rounds:
        for site in sorted(record.sites, key=lambda s: s.site):
            loss = f"{_fmt_loss(site.loss_first)} -> {_fmt_loss(site.loss)}" if site.loss is not None else "-"
            lines.append(
                f"{record.round:>5}  {site.site:<10}  {site.status:<10}  {loss:<17}  {_fmt_bytes(site.bytes_received)}"
            )
    return "\n".join(lines)
