"""A run folder's ``report.md``, rendered from ``results.json``: the coordinator's product.

The coordinator (``RunRecorder``, server/results.py) rewrites it after every round, beside
results.json, so a deployed run folder reads like a simulated one while the run goes.
``ctfed report RUN_DIR`` (simulations/report/) renders the same text with plots added; the
plots stay there, off the coordinator's round loop (matplotlib costs a second a round).

The output depends only on results.json (and config.yaml) -- no clock, no host names -- so
two renders of the same run are byte-identical and reports of different runs can be diffed.
The records are parsed with the coordinator's own ``RoundRecord``/``SiteRoundRecord``, so
the report reads exactly the schema ``RunRecorder`` writes.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf

from ctfed.common.config import ConfigError, to_run_config
from ctfed.common.fileio import write_text_atomic
from ctfed.common.model import SSLModel, count_parameters
from ctfed.server.results import CHECKPOINT_DIR, RESULTS_NAME, RoundRecord, SiteRoundRecord

REPORT_NAME = "report.md"
CONFIG_NAME = "config.yaml"  # the run's resolved config, beside results.json (written with it)


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
        return parse_results(raw)
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


def parse_results(raw: Any) -> RunResults:
    """results.json's content as RunResults; TypeError, KeyError or ValueError name what is wrong."""
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


def read_config(run_dir: Path, results: RunResults) -> dict[str, Any]:
    """``config.yaml`` when the run folder has one (what the user reads), else results.json's copy."""
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        return results.config
    loaded = OmegaConf.to_container(OmegaConf.load(path), enum_to_str=True)
    if not isinstance(loaded, dict):
        raise ReportError(f"{path} does not hold a run configuration")
    return loaded  # type: ignore[return-value]


def _model_summary(config: dict[str, Any]) -> str:
    """Model name and parameter counts, from the config alone (the same config: the same
    line, worked out once: the coordinator renders the report after every round)."""
    return _model_summary_of(json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=8)
def _model_summary_of(config_json: str) -> str:
    """``_model_summary`` of a config given as JSON (hashable, so it can be cached).

    The model is built on the meta device: shapes only, no memory or init cost, so even a
    ViT-B with a 65,536-prototype head is counted instantly. Validating the whole config
    (``to_run_config``) is what costs, a few tenths of a second.
    """
    config = json.loads(config_json)
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



def _spread(site: SiteRoundRecord) -> float:
    """Feature spread as a share of the spread of features uniform on the sphere."""
    assert site.monitor is not None
    return site.monitor["embedding_std"] / site.monitor["uniform_std"] if site.monitor["uniform_std"] else math.nan



# ---------------------------------------------------------------------------- markdown


def _engine_summary(config: dict[str, Any]) -> str:
    """Where the simulated sites ran (``simulation.ray_address``); "" for a deployed run."""
    simulation = config.get("simulation")
    if not isinstance(simulation, dict):
        return ""
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
        *([["Simulation engine", engine]] if (engine := _engine_summary(config)) else []),
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


def render_markdown(
    run_dir: Path,
    results: RunResults,
    config: dict[str, Any],
    plots: Sequence[tuple[str, Path]] = (),
    sections: Sequence[str] = (),
) -> str:
    """The report text. ``sections`` (lines) go after the summary (a simulation's data split);
    plot links are relative so the run folder can be moved or shared."""
    lines = _summary_lines(run_dir, results, config)
    lines += sections
    lines += ["## Plots", ""]
    lines += [f"![{caption}]({path.relative_to(run_dir).as_posix()})\n" for caption, path in plots]
    if not plots:
        lines += ["None drawn while the run goes: `ctfed report RUN_DIR` adds them from results.json.", ""]
    lines += _monitor_lines(results)
    lines += ["## Rounds", ""]
    if not results.rounds:
        lines += ["No round has finished yet.", ""]
    for record in results.rounds:
        lines += _round_lines(record)
    lines += _problem_lines(results)
    return "\n".join(lines)


def write_report(run_dir: Path, results: dict[str, Any]) -> Path:
    """Write ``run_dir/report.md`` (no plots) from ``results`` (results.json's content, as
    ``RunRecorder`` writes it), atomically; returns its path. ReportError when it is malformed."""
    try:
        parsed = parse_results(results)
    except (TypeError, KeyError, ValueError) as err:
        raise ReportError(f"the results of {run_dir} are not a ctfed results record: {err}") from None
    report = run_dir / REPORT_NAME
    write_text_atomic(report, render_markdown(run_dir, parsed, parsed.config))
    return report
