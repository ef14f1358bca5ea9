"""Our SecAgg+ against Flower's stock SecAgg+ and plain aggregation, for ``ctfed bench``.

One ``flwr.simulation.run_simulation`` (Ray backend, the in-memory Grid) hosts all three
paths, so they pay the same transport and the same Ray workers:

* plain: one ``train.plain`` message per site, our vetting (``server/collect.py``) and
  Flower's FedAvg, as ``server/rounds.py`` does without secure aggregation;
* ours: ``server/secagg.py``'s four stages against ``client/secagg.py``'s handlers
  (without the site audit log, which stock Flower has no counterpart of);
* stock: ``flwr.server.workflow.SecAggPlusWorkflow`` inside ``DefaultWorkflow`` with a
  legacy FedAvg, and ``flwr.client.mod.secaggplus_mod`` on the ClientApp's default train
  action.

Every site replies a fixed random update of the requested size (seeded by its partition,
identical on every path, no training), so the times isolate aggregation. A round is timed
at the coordinator from the first message sent to the mean update in hand; the median of
``rounds`` rounds per path is kept, after one untimed plain round that starts the Ray
workers. Both secure paths use the same neighbourhood size and reconstruction threshold;
quantisation keeps each implementation's own grid (ours: 2^40 steps mod 2^64, stock: its
default 2^22 steps mod 2^32), and stock's ``max_weight`` is the largest site weight, the
tightest setting that does not warn about overflow. Correctness: both secure means equal
the plain mean within each one's quantisation bound.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from ctfed.common.config import RunConfig
from ctfed.common.exchange import ARRAYS_KEY, CONFIG_KEY, SERVER_ROUND_KEY, SiteReply, record_to_state, state_to_record
from ctfed.common.certs import ensure_federation_signing_keys
from ctfed.common.secagg import aggregation_error_bound, effective_num_shares, round_threshold
from ctfed.simulations.bench.secagg_bench import _synthetic_state as synthetic_state

logger = logging.getLogger(__name__)

PLAIN_ACTION = "plain"  # message type train.plain; the default train action is stock SecAgg+'s
_UPDATE_SCALE = 1e-3  # typical size of one local round's weight change
_NODE_WAIT_S = 60.0

# A Ray worker keeps each site's update between rounds, as a trained delta would be at hand.
_updates: dict[tuple[int, tuple[tuple[int, ...], ...]], list[np.ndarray]] = {}


def site_weight(partition: int) -> int:
    """Examples a benchmark site reports: unequal, so the weighted mean is exercised."""
    return 4 + partition % 3


def site_update(partition: int, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The fixed random update of one site, for global arrays of ``shapes``."""
    key = (partition, tuple(shapes))
    if key not in _updates:
        gen = torch.Generator().manual_seed(1000 + partition)
        _updates[key] = [(torch.randn(shape, generator=gen) * _UPDATE_SCALE).numpy() for shape in shapes]
    return _updates[key]


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


def plain_train(msg: Message, context: Context) -> Message:
    """The site side of plain (and, wrapped in client/secagg.py, our secure) rounds."""
    incoming = msg.content[ARRAYS_KEY]
    names = list(incoming.keys())
    update = site_update(_partition(context), [tuple(incoming[n].shape) for n in names])
    reply = SiteReply(f"site-{_partition(context)}", num_examples=site_weight(_partition(context)), loss=1.0,
                      loss_first=1.0, losses=(1.0,), train_seconds=0.0, data_seconds=0.0)
    content = RecordDict(
        {ARRAYS_KEY: state_to_record({n: torch.from_numpy(a) for n, a in zip(names, update)}), **reply.to_records()}
    )
    return Message(content=content, reply_to=msg)


def stock_fit(msg: Message, context: Context) -> Message:
    """The legacy ``fit`` reply that ``secaggplus_mod`` masks: the same update as plain_train's."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    shapes = [tuple(a.shape) for a in parameters_to_ndarrays(fitins.parameters)]
    update = site_update(_partition(context), shapes)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), site_weight(_partition(context)), {})
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def _bench_keys_dir() -> Path:
    """The simulated sites' signing keys and roster: a fixed folder, because the ClientApps
    run in Ray worker processes that share nothing with the caller but the file system."""
    return Path(tempfile.gettempdir()) / f"ctfed-stock-bench-keys-{os.getuid()}"


def _bench_site_id(context: Context) -> str:
    return f"site-{_partition(context)}"


def _with_signing_keys(handler: Any) -> Any:
    """Our SecAgg+ authenticates sites: point each simulated node at its key and the roster."""
    from ctfed.client.secagg import ROSTER_KEY, SIGNING_KEY_KEY
    from ctfed.client.site import SITE_ID_KEY
    from ctfed.common.certs import ROSTER_FILE

    def with_keys(msg: Message, context: Context) -> Message:
        site_id, keys = _bench_site_id(context), _bench_keys_dir()
        context.node_config.update(
            {SITE_ID_KEY: site_id, SIGNING_KEY_KEY: str(keys / f"{site_id}.key"), ROSTER_KEY: str(keys / ROSTER_FILE)}
        )
        return handler(msg, context)

    return with_keys


def build_client_app() -> Any:
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp

    from ctfed.client.secagg import stage_handlers
    from ctfed.common import secagg as sa

    app = ClientApp()
    app.train(PLAIN_ACTION)(plain_train)
    for stage, handler in zip(sa.STAGES, stage_handlers(plain_train).values()):
        app.train(stage)(_with_signing_keys(handler))
    app.train(mods=[secaggplus_mod])(stock_fit)
    return app


@dataclass
class _Outcome:
    """What the ServerApp thread hands back to the caller."""

    plain_s: list[float] = field(default_factory=list)
    ours_s: list[float] = field(default_factory=list)
    stock_s: list[float] = field(default_factory=list)
    plain_mean: list[np.ndarray] = field(default_factory=list)
    ours_mean: list[np.ndarray] = field(default_factory=list)
    stock_mean: list[np.ndarray] = field(default_factory=list)
    error: str = ""


def _wait_for_nodes(grid: Any, sites: int) -> list[int]:
    deadline = time.monotonic() + _NODE_WAIT_S
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= sites or time.monotonic() > deadline:
            return nodes
        time.sleep(0.1)


def _timed_strategy(global_state: dict[str, torch.Tensor], sites: int, outcome: _Outcome) -> Any:
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    class TimedFedAvg(FedAvg):
        """Stock FedAvg that notes when a round's fit starts and when its mean exists."""

        started = 0.0

        def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN202
            self.started = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN202
            aggregated = super().aggregate_fit(server_round, results, failures)
            outcome.stock_s.append(time.perf_counter() - self.started)
            if aggregated[0] is not None:
                outcome.stock_mean = parameters_to_ndarrays(aggregated[0])
            return aggregated

    return TimedFedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=sites, min_evaluate_clients=0,
        min_available_clients=sites,
        initial_parameters=ndarrays_to_parameters([t.numpy() for t in global_state.values()]),
    )


def stock_workflow(cfg: RunConfig, sites: int) -> Any:
    """Flower's SecAgg+ with our neighbourhood size, threshold and clipping range."""
    from flwr.server.workflow import SecAggPlusWorkflow

    shares = effective_num_shares(cfg.secagg.num_shares, sites)
    return SecAggPlusWorkflow(
        num_shares=shares,
        reconstruction_threshold=round_threshold(cfg.secagg.reconstruction_threshold, shares),
        max_weight=float(max(site_weight(p) for p in range(sites))),
        clipping_range=cfg.secagg.clipping_range,
    )


def build_server_app(
    num_params: int, sites: int, rounds: int, cfg: RunConfig, workflow: Any, outcome: _Outcome
) -> Any:
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow
    from flwr.serverapp import Grid, ServerApp

    from ctfed.server.collect import build_strategy, vet_replies
    from ctfed.server.secagg import secure_round

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            _run(grid, context)
        except Exception as err:  # noqa: BLE001 - reported to the caller, which raises
            logger.exception("stock comparison failed")
            outcome.error = f"{type(err).__name__}: {err}"

    def train_messages(nodes: list[int], global_state: dict[str, torch.Tensor], server_round: int) -> list[Message]:
        arrays = state_to_record(global_state)
        config = ConfigRecord({SERVER_ROUND_KEY: server_round})
        return [
            Message(RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}), dst_node_id=n,
                    message_type=f"train.{PLAIN_ACTION}", group_id=str(server_round))
            for n in nodes
        ]

    def _run(grid: Grid, context: Context) -> None:
        nodes = _wait_for_nodes(grid, sites)
        if len(nodes) != sites:
            raise RuntimeError(f"{len(nodes)} of {sites} simulated sites registered")
        global_state = synthetic_state(num_params)
        strategy = build_strategy(cfg)

        def plain_round(server_round: int) -> list[np.ndarray]:
            replies = list(grid.send_and_receive(train_messages(nodes, global_state, server_round)))
            accepted, _ = vet_replies(replies, global_state, cfg.federation.max_update_norm)
            if len(accepted) != sites:
                raise RuntimeError(f"plain round {server_round}: {len(accepted)} of {sites} updates usable")
            aggregated, _ = strategy.aggregate_train(server_round, accepted)
            mean = record_to_state(aggregated, expected=global_state)
            return [t.numpy() for t in mean.values()]

        plain_round(0)  # starts the Ray workers; not timed
        for server_round in range(1, rounds + 1):
            started = time.perf_counter()
            outcome.plain_mean = plain_round(server_round)
            outcome.plain_s.append(time.perf_counter() - started)
        for server_round in range(1, rounds + 1):
            started = time.perf_counter()
            result = secure_round(grid, train_messages(nodes, global_state, server_round), global_state, cfg, server_round)
            outcome.ours_s.append(time.perf_counter() - started)
            if result.mean_delta is None:
                raise RuntimeError(f"our secure round {server_round} failed: {result.reason}")
            outcome.ours_mean = [t.numpy() for t in result.mean_delta.values()]
        legacy = LegacyContext(
            context, config=ServerConfig(num_rounds=rounds), strategy=_timed_strategy(global_state, sites, outcome)
        )
        DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
        if len(outcome.stock_s) != rounds:
            raise RuntimeError(f"stock SecAgg+ completed {len(outcome.stock_s)} of {rounds} rounds (see Flower's log)")

    return app


def _max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) for x, y in zip(a, b))


def stock_error_bound(sites: int, workflow: Any) -> float:
    """Per value, |stock SecAgg+ mean - plain weighted mean|: each site's value times
    weight / max_weight is rounded to a grid of step 2c/Q (error < one step), and the sum is
    divided by the total weight / max_weight."""
    weights = [site_weight(p) for p in range(sites)]
    step = 2 * workflow.clipping_range / workflow.quantization_range
    return sites * step * workflow.max_weight / sum(weights)


def bench_stock_secagg(num_params: int, sites: int = 5, rounds: int = 3) -> dict[str, Any]:
    """Time per round of plain, our and stock Flower SecAgg+ aggregation in one simulation."""
    from flwr.simulation import run_simulation

    cfg = RunConfig()
    cfg.federation.min_sites = 2
    cfg.federation.max_update_norm = 1e9  # synthetic updates; the norm check is timed, not tested
    outcome = _Outcome()
    ensure_federation_signing_keys(_bench_keys_dir(), [f"site-{index}" for index in range(sites)])
    workflow = stock_workflow(cfg, sites)
    server_app = build_server_app(num_params, sites, rounds, cfg, workflow, outcome)
    # Flower logs every stage of every round, and warns that run_simulation is deprecated and
    # that the legacy FedAvg has no metrics function; the benchmark prints its own summary.
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)
    started = time.perf_counter()
    try:
        run_simulation(
            server_app=server_app, client_app=build_client_app(), num_supernodes=sites,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"include_dashboard": False, "log_to_driver": False},
            },
        )
    finally:
        flwr_logger.setLevel(level)
    wall = time.perf_counter() - started
    if outcome.error or not (outcome.plain_s and outcome.ours_s and outcome.stock_s):
        raise RuntimeError(f"stock SecAgg+ comparison failed: {outcome.error or 'a path produced no round'}")

    plain, ours, stock = (statistics.median(x) for x in (outcome.plain_s, outcome.ours_s, outcome.stock_s))
    return {
        "params": num_params,
        "sites": sites,
        "rounds": rounds,
        "num_shares": cfg.secagg.num_shares,
        "reconstruction_threshold": round_threshold(cfg.secagg.reconstruction_threshold, effective_num_shares(cfg.secagg.num_shares, sites)),
        "plain_round_s": plain,
        "ours_round_s": ours,
        "stock_round_s": stock,
        "ratio_ours_over_plain": ours / plain,
        "ratio_stock_over_plain": stock / plain,
        "ratio_ours_over_stock": ours / stock,
        "rounds_s": {"plain": outcome.plain_s, "ours": outcome.ours_s, "stock": outcome.stock_s},
        "max_abs_diff_ours_vs_plain": _max_abs_diff(outcome.ours_mean, outcome.plain_mean),
        "max_abs_diff_stock_vs_plain": _max_abs_diff(outcome.stock_mean, outcome.plain_mean),
        # float32 rounding of values around 1e-3 is ~1e-10, far above our 1.8e-12 grid step
        "ours_error_bound": aggregation_error_bound(cfg.secagg) + 1e-9,
        "stock_error_bound": stock_error_bound(sites, workflow) + 1e-9,
        "stock_quantization_range": workflow.quantization_range,
        "stock_modulus_range": workflow.modulus_range,
        "simulation_wall_s": wall,
    }
