"""A run folder's human-readable report: ``report.md`` plus PNG plots under ``plots/``.

The report is rendered from ``results.json`` (and ``config.yaml``) alone, never from the
training process, so it can be re-rendered at any time -- mid-run, after a crash, or after
this module improves -- with ``ctfed report RUN_DIR``. Its output depends only on those
files (no clock, no host names), so two renders of the same run are byte-identical and
reports of different runs can be diffed.

The records are parsed with the coordinator's own ``RoundRecord``/``SiteRoundRecord``, so
the report reads exactly the schema ``RunRecorder`` writes.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from ctfed.common.config import ConfigError, to_run_config
from ctfed.common.fileio import write_text_atomic
from ctfed.common.model import SSLModel, count_parameters
from ctfed.server.results import CHECKPOINT_DIR, RESULTS_NAME, RoundRecord, SiteRoundRecord
from ctfed.simulations.data.split import split_markdown

REPORT_NAME = "report.md"
PLOTS_DIR = "plots"
CONFIG_NAME = "config.yaml"  # as ``ctfed simulate`` writes it; deployed runs may lack it
LOSS_STEPS_PLOT = "loss_per_step.png"
LOSS_ROUNDS_PLOT = "loss_per_round.png"
BYTES_PLOT = "bytes_per_round.png"
MONITOR_PLOT = "monitor.png"

_DPI = 110
_MAX_ROUND_LABELS = 20  # beyond this many rounds, label only every k-th boundary


class ReportError(ValueError):
    """A run folder whose results cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class RunResults:
    """``results.json`` parsed into the coordinator's record types."""

    status: str
    config: dict[str, Any]
    wall_seconds: float
    rounds: list[RoundRecord]
    # Rounds after which the run was resumed (results.json "resumes"; empty if never stopped).
    resumed_after: tuple[int, ...] = ()
    # Sites cut from a pooled cache: the split's summary (results.json "data_split").
    data_split: dict[str, Any] | None = None

    @property
    def sites(self) -> list[str]:
        """Every site seen in any round, sorted, so colours and rows are stable across renders."""
        return sorted({s.site for r in self.rounds for s in r.sites})

    @property
    def monitored_rounds(self) -> list[RoundRecord]:
        """Rounds in which at least one site reported the representation monitor."""
        return [r for r in self.rounds if any(s.monitor for s in r.sites)]


def load_results(run_dir: Path) -> RunResults:
    """Read and check ``run_dir/results.json``; ReportError says why it cannot be used."""
    path = run_dir / RESULTS_NAME
    if not path.is_file():
        raise ReportError(f"{path} not found; is {run_dir} a ctfed run folder?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path} cannot be read as JSON: {err}") from None
    try:
        return _parse_results(raw)
    except (TypeError, KeyError, ValueError) as err:
        raise ReportError(f"{path} is not a ctfed results file: {err}") from None


def _expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    # bool is an int subclass; a bool where a number belongs is a corrupted file.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise TypeError(f"{what} should be {_type_names(kind)}, got {value!r}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_names(kind: type | tuple[type, ...]) -> str:
    return " or ".join("null" if k is type(None) else k.__name__ for k in _as_tuple(kind))


_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None))


def _parse_site(raw: Any, where: str) -> SiteRoundRecord:
    site = SiteRoundRecord(**_expect(raw, dict, where))
    _expect(site.site, str, f"{where}.site")
    _expect(site.status, str, f"{where}.status")
    _expect(site.num_examples, int, f"{where}.num_examples")
    _expect(site.bytes_received, int, f"{where}.bytes_received")
    for name in ("loss_first", "loss", "train_seconds", "data_seconds"):
        _expect(getattr(site, name), _OPTIONAL_NUMBER, f"{where}.{name}")
    for step, loss in enumerate(_expect(site.losses, list, f"{where}.losses")):
        _expect(loss, _NUMBER, f"{where}.losses[{step}]")
    _expect(site.monitor_seconds, _OPTIONAL_NUMBER, f"{where}.monitor_seconds")
    if _expect(site.monitor, (dict, type(None)), f"{where}.monitor") is not None:
        for name in _MONITOR_FIELDS:
            _expect(site.monitor.get(name), _NUMBER, f"{where}.monitor.{name}")
    return site


_MONITOR_FIELDS = ("knn_accuracy", "embedding_std", "uniform_std", "scans", "k")


def _parse_round(raw: Any, where: str) -> RoundRecord:
    values = dict(_expect(raw, dict, where))
    sites = _expect(values.pop("sites"), list, f"{where}.sites")
    record = RoundRecord(sites=[_parse_site(s, f"{where}.sites[{i}]") for i, s in enumerate(sites)], **values)
    _expect(record.round, int, f"{where}.round")
    _expect(record.aggregated, bool, f"{where}.aggregated")
    _expect(record.bytes_sent_per_site, int, f"{where}.bytes_sent_per_site")
    _expect(record.seconds, _NUMBER, f"{where}.seconds")
    _expect(record.checkpoint, str, f"{where}.checkpoint")
    return record


def _parse_results(raw: Any) -> RunResults:
    raw = _expect(raw, dict, "the top level")
    rounds = _expect(raw["rounds"], list, "rounds")
    return RunResults(
        status=_expect(raw["status"], str, "status"),
        config=_expect(raw["config"], dict, "config"),
        wall_seconds=float(_expect(raw["wall_seconds"], _NUMBER, "wall_seconds")),
        rounds=[_parse_round(r, f"rounds[{i}]") for i, r in enumerate(rounds)],
        resumed_after=tuple(
            _expect(_expect(entry, dict, "resumes[]")["after_round"], int, "resumes[].after_round")
            for entry in _expect(raw.get("resumes", []), list, "resumes")
        ),
        data_split=_expect(raw["data_split"], dict, "data_split") if raw.get("data_split") is not None else None,
    )


def weighted_loss(record: RoundRecord) -> float | None:
    """Last-step loss of the aggregated sites, weighted by examples as FedAvg weights them."""
    used = [s for s in record.sites if s.status == "aggregated" and s.loss is not None and s.num_examples > 0]
    total = sum(s.num_examples for s in used)
    return sum(s.loss * s.num_examples for s in used) / total if total else None  # type: ignore[operator]


# ---------------------------------------------------------------------------- formatting


def _fmt_loss(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _fmt_loss_change(site: SiteRoundRecord) -> str:
    if site.loss is None:
        return "–"
    return f"{_fmt_loss(site.loss_first)} → {_fmt_loss(site.loss)}"


_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def _byte_unit(largest: float) -> tuple[float, str]:
    """The binary unit that keeps ``largest`` below 1024, as (divisor, name)."""
    power = 0
    while largest >= 1024 and power < len(_BYTE_UNITS) - 1:
        largest /= 1024
        power += 1
    return 1024.0**power, _BYTE_UNITS[power]


def _fmt_bytes(count: int) -> str:
    divisor, unit = _byte_unit(count)
    return f"{count} B" if unit == "B" else f"{count / divisor:.1f} {unit}"


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _fmt_train_time(site: SiteRoundRecord) -> str:
    """Train time, with the share spent loading data when the site reported it."""
    train = _fmt_seconds(site.train_seconds)
    if site.data_seconds is None or site.train_seconds is None:
        return train
    return f"{train} (data {_fmt_seconds(site.data_seconds)})"


def _inline(text: str) -> str:
    """One line of text that cannot break a markdown table or list item."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_inline(cell) for cell in row) + " |" for row in rows]
    return lines


# ---------------------------------------------------------------------------- model and config


def _read_config(run_dir: Path, results: RunResults) -> dict[str, Any]:
    """``config.yaml`` when the run folder has one (what the user reads), else results.json's copy."""
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        return results.config
    loaded = OmegaConf.to_container(OmegaConf.load(path), enum_to_str=True)
    if not isinstance(loaded, dict):
        raise ReportError(f"{path} does not hold a run configuration")
    return loaded  # type: ignore[return-value]


def _model_summary(config: dict[str, Any]) -> str:
    """Model name and parameter counts, from the config alone.

    The model is built on the meta device: shapes only, no memory or init cost, so even a
    ViT-B with a 65,536-prototype head is counted instantly.
    """
    name = str(config.get("model", {}).get("name", "unknown"))
    try:
        model_cfg = to_run_config(config).model
    except ConfigError as err:
        return f"{name} (parameter count not derivable: {_inline(str(err))})"
    # MONAI's position embedding calls torch.meshgrid without ``indexing``: a deprecation
    # warning the user can do nothing about, printed into ``ctfed simulate``'s summary.
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
        model = SSLModel(model_cfg)
    trainable = count_parameters(model.encoder)
    total = count_parameters(model.encoder, trainable_only=False)
    head = count_parameters(model.head)
    return (
        f"{name}: encoder {trainable:,} trainable parameters ({total:,} in all; the federated part), "
        f"DINO head {head:,} (stays at each site)"
    )


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


def _spread(site: SiteRoundRecord) -> float:
    """Feature spread as a share of the spread of features uniform on the sphere."""
    assert site.monitor is not None
    return site.monitor["embedding_std"] / site.monitor["uniform_std"] if site.monitor["uniform_std"] else math.nan


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


# ---------------------------------------------------------------------------- markdown


def _engine_summary(config: dict[str, Any]) -> str:
    """Where the sites ran (``simulation.ray_address``); deployed runs have no simulation section."""
    simulation = config.get("simulation")
    if not isinstance(simulation, dict):
        return "– (not a simulation)"
    address = simulation.get("ray_address") or ""
    return f"Ray cluster at {_inline(str(address))}" if address else "a private Ray started by the run"


def _summary_lines(run_dir: Path, results: RunResults, config: dict[str, Any]) -> list[str]:
    federation = config.get("federation", {})
    train = config.get("train", {})
    planned = federation.get("rounds", "?")
    sites = results.sites
    sent = sum(r.bytes_sent_per_site * len(r.sites) for r in results.rounds)
    received = sum(s.bytes_received for r in results.rounds for s in r.sites)
    last = next(((r.round, loss) for r in reversed(results.rounds) if (loss := weighted_loss(r)) is not None), None)
    rows = [
        ["Status", results.status],
        ["Rounds recorded", f"{len(results.rounds)} of {planned}"],
        ["Sites", f"{len(sites)}: {', '.join(sites)}" if sites else "none yet"],
        ["Model", _model_summary(config)],
        [
            "Federation",
            f"{federation.get('strategy', '?')}, {train.get('local_steps', '?')} local steps per round, "
            f"at least {federation.get('min_sites', '?')} sites",
        ],
        ["Wall time", _fmt_seconds(results.wall_seconds)],
        ["Simulation engine", _engine_summary(config)],
        [
            "Resumed",
            ", ".join(f"after round {r}" for r in results.resumed_after) if results.resumed_after else "never stopped",
        ],
        ["Data exchanged", f"{_fmt_bytes(sent)} to sites, {_fmt_bytes(received)} from sites"],
        [
            "Final loss",
            f"{last[1]:.4f} (round {last[0]}, weighted mean of last-step losses)" if last else "–",
        ],
    ]
    lines = [f"# Run report: {run_dir.name}", ""]
    if results.status == "running":
        lines += [
            f"> The run is still in progress: {len(results.rounds)} of {planned} rounds recorded. "
            f"`ctfed report RUN_DIR` re-renders this report with the rounds recorded since.",
            "",
        ]
    return lines + _table(["", ""], rows) + [""]


def _round_lines(record: RoundRecord) -> list[str]:
    checkpoint = f"[`{record.checkpoint}`]({CHECKPOINT_DIR}/{record.checkpoint})" if record.checkpoint else "none"
    outcome = (
        "aggregated"
        if record.aggregated
        else "**not aggregated** (too few usable updates; the global encoder did not change)"
    )
    rows = [
        [
            site.site,
            site.status,
            str(site.num_examples),
            _fmt_loss_change(site),
            _fmt_train_time(site),
            _fmt_bytes(record.bytes_sent_per_site),
            _fmt_bytes(site.bytes_received),
        ]
        for site in sorted(record.sites, key=lambda s: s.site)
    ]
    header = ["Site", "Status", "Examples", "Loss first → last", "Train time", "Sent to site", "Received from site"]
    return [
        f"### Round {record.round}",
        "",
        f"{outcome}; {_fmt_seconds(record.seconds)}; checkpoint {checkpoint}; "
        f"weighted mean last-step loss {_fmt_loss(weighted_loss(record))}",
        "",
        *_table(header, rows),
        "",
    ]


def _monitor_lines(results: RunResults) -> list[str]:
    """Round x site: kNN accuracy and feature spread of the global encoder each site received."""
    monitored = results.monitored_rounds
    if not monitored:
        return []
    sites = [site for site in results.sites if any(s.site == site and s.monitor for r in monitored for s in r.sites)]
    rows = []
    for record in monitored:
        cells = {s.site: s for s in record.sites if s.monitor}
        rows.append(
            [str(record.round)]
            + [
                f"{cells[site].monitor['knn_accuracy']:.3f} · {_spread(cells[site]):.3f}" if site in cells else "–"  # type: ignore[index]
                for site in sites
            ]
        )
    latest = {s.site: s.monitor for r in monitored for s in r.sites if s.monitor}
    used = ", ".join(f"{site} {latest[site]['scans']} scans (k={latest[site]['k']})" for site in sites)
    return [
        "## Representation monitor",
        "",
        "Each site scores the global encoder it received, before local training (round 1: the initial "
        "encoder): kNN accuracy of its held-out labelled scans (phase 2's split) against its training "
        "scans · feature spread, `embedding_std` / `uniform_std` (near 0: collapsed features; 1: spread "
        f"uniformly over the sphere). Scans used (latest round): {used}.",
        "",
        *_table(["Round", *sites], rows),
        "",
    ]


def _problem_lines(results: RunResults) -> list[str]:
    problems = [
        f"- Round {r.round}, {_inline(s.site)}, {s.status}: {_inline(s.reason) or 'no reason given'}"
        for r in results.rounds
        for s in sorted(r.sites, key=lambda s: s.site)
        if s.status != "aggregated"
    ]
    return ["## Rejected and failed updates", "", *(problems or ["None: every site update was aggregated."]), ""]


def render_markdown(run_dir: Path, results: RunResults, config: dict[str, Any], plots: list[tuple[str, Path]]) -> str:
    """The report text; plot links are relative so the run folder can be moved or shared."""
    lines = _summary_lines(run_dir, results, config)
    if results.data_split is not None:
        lines += split_markdown(results.data_split)
    lines += ["## Plots", ""]
    lines += [f"![{caption}]({path.relative_to(run_dir).as_posix()})\n" for caption, path in plots]
    lines += _monitor_lines(results)
    lines += ["## Rounds", ""]
    if not results.rounds:
        lines += ["No round has finished yet.", ""]
    for record in results.rounds:
        lines += _round_lines(record)
    lines += _problem_lines(results)
    return "\n".join(lines)


def render_report(run_dir: Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` into ``run_dir``; returns the report's path.

    Raises ReportError when results.json is missing or malformed.
    """
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    config = _read_config(run_dir, results)
    plots = render_plots(results, run_dir / PLOTS_DIR)
    report = run_dir / REPORT_NAME
    write_text_atomic(report, render_markdown(run_dir, results, config, plots))
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
