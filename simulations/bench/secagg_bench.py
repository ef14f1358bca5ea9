"""SecAgg+ round cost against plain aggregation, for ``ctfed bench``.

Both paths run the coordinator's real code (``server/rounds.py`` vetting + Flower's FedAvg,
``server/secagg.py``) against the sites' real handlers through an in-process Grid, with
the same site deltas. "Training" is a stub that replies a fixed delta, so what is timed is
exactly what aggregation adds: serialisation, vetting and averaging on the plain path;
quantisation, key agreement, Shamir shares, ChaCha20 masks and unmasking on the secure
one, with its defences against a malicious coordinator (signed advertisements checked
against a roster, model/instruction hashes, the consistency round), reported apart too. Sites run one after another here; real sites run in parallel, so the figure to
compare is the parallel equivalent: coordinator time + the slowest site in each stage.
"""

from __future__ import annotations

import argparse
import functools
import gc
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, RecordDict

from ctfed.common.config import RunConfig
from ctfed.common.exchange import ARRAYS_KEY, CONFIG_KEY, SERVER_ROUND_KEY, apply_delta, record_to_state, state_to_record
from ctfed.server.collect import build_strategy, vet_replies
from ctfed.server.rounds import park_global_state, unpark_global_state
from ctfed.server.secagg import secure_round
from ctfed.simulations.runtime.inprocess import InProcessGrid

_TENSOR_VALUES = 2_000_000  # the synthetic encoder is a list of layers of this size


def _synthetic_state(num_params: int) -> dict[str, torch.Tensor]:
    sizes = [_TENSOR_VALUES] * (num_params // _TENSOR_VALUES)
    if num_params % _TENSOR_VALUES:
        sizes.append(num_params % _TENSOR_VALUES)
    gen = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(n, generator=gen) * 0.02 for i, n in enumerate(sizes)}


def _train_messages(node_ids: list[int], state: dict[str, torch.Tensor]) -> list[Message]:
    arrays = state_to_record(state)
    return [
        Message(RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({SERVER_ROUND_KEY: 1})}), dst_node_id=n, message_type="train")
        for n in node_ids
    ]


def _stub_train(deltas: dict[int, dict[str, torch.Tensor]]):
    from ctfed.common.exchange import SiteReply

    def train(msg: Message, context: Any) -> Message:
        node = msg.metadata.dst_node_id
        reply = SiteReply(f"site-{node}", num_examples=4 + node % 3, loss=1.0, loss_first=1.0, losses=(1.0,),
                          train_seconds=0.0, data_seconds=0.0)
        content = RecordDict({ARRAYS_KEY: state_to_record(deltas[node]), **reply.to_records()})
        return Message(content=content, reply_to=msg)

    return train


def authentication_cost(state: dict[str, torch.Tensor], sites: int) -> dict[str, float]:
    """What the malicious-coordinator defences add at one site per round (issue #12): the
    model hash over the arrays it received, two Ed25519 signatures (advertisement, survivor
    set) and up to 2 * sites verifications; the instructions hash is negligible beside them.
    Signatures cover hashes and keys, never the update vector."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ctfed.common import secagg as sa

    record = state_to_record(state)
    started = time.perf_counter()
    model_hash = sa.arrays_sha256([record])
    hash_s = time.perf_counter() - started
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    advert = sa.advertisement_message(1, 1, 1, "site-1", b"k" * 97, b"k" * 97, model_hash, model_hash)
    survivors = sa.consistency_message(1, 1, 1, list(range(sites)))
    started = time.perf_counter()
    signatures = [key.sign(advert), key.sign(survivors)]
    for _ in range(sites):
        public.verify(signatures[0], advert)
        public.verify(signatures[1], survivors)
    sign_verify_s = time.perf_counter() - started
    return {"model_hash_s": hash_s, "sign_verify_s": sign_verify_s, "per_site_s": hash_s + sign_verify_s}


def _parallel_equivalent(wall: float, grid: InProcessGrid) -> float:
    return wall - grid.serial_seconds() + grid.parallel_seconds()


def bench_secagg_size(num_params: int, sites: int = 5) -> dict[str, Any]:
    from ctfed.client.secagg import stage_handlers

    cfg = RunConfig()
    cfg.federation.min_sites = 2
    cfg.federation.max_update_norm = 1e9  # synthetic deltas; the norm check is timed, not tested
    node_ids = list(range(1, sites + 1))
    global_state = _synthetic_state(num_params)
    deltas = {n: {k: torch.randn(v.shape) * 1e-3 for k, v in global_state.items()} for n in node_ids}
    train = _stub_train(deltas)

    # Plain: the vetted FedAvg path of server/rounds.py.
    grid = InProcessGrid({"train": train}, node_ids)
    strategy = build_strategy(cfg)
    started = time.perf_counter()
    replies = list(grid.send_and_receive(_train_messages(node_ids, global_state)))
    accepted, _ = vet_replies(replies, global_state, cfg.federation.max_update_norm)
    aggregated, _ = strategy.aggregate_train(1, accepted)
    plain_state = apply_delta(global_state, record_to_state(aggregated, expected=global_state))
    plain_wall = time.perf_counter() - started
    plain = _parallel_equivalent(plain_wall, grid)
    del replies, accepted, aggregated, grid
    gc.collect()

    # Secure: the SecAgg+ stages of server/secagg.py and client/secagg.py.
    grid = InProcessGrid(stage_handlers(train), node_ids)
    started = time.perf_counter()
    result = secure_round(grid, _train_messages(node_ids, global_state), global_state, cfg, server_round=1)
    secure_wall = time.perf_counter() - started
    secure = _parallel_equivalent(secure_wall, grid)
    if result.mean_delta is None:
        raise RuntimeError(f"secure round failed in the benchmark: {result.reason}")
    secure_state = apply_delta(global_state, result.mean_delta)
    max_diff = max(float((secure_state[k] - plain_state[k]).abs().max()) for k in global_state)
    per_stage = {}
    for (_, kind), seconds in grid.seconds_by_node_type.items():
        per_stage[kind] = max(per_stage.get(kind, 0.0), seconds)
    del result, grid, deltas
    gc.collect()
    auth = authentication_cost(global_state, sites)
    return {
        "params": num_params,
        "sites": sites,
        "plain_round_s": plain,
        "secure_round_s": secure,
        "ratio_secure_over_plain": secure / plain,
        "plain_serial_s": plain_wall,
        "secure_serial_s": secure_wall,
        "slowest_site_per_stage_s": per_stage,
        "max_abs_diff_secure_vs_plain": max_diff,
        "modulus_bits": cfg.secagg.modulus_bits,
        # Signatures, roster checks and the consistency round (slowest site in that stage).
        "authentication_per_site_s": auth["per_site_s"],
        "authentication": auth,
        "consistency_stage_s": per_stage.get("train.secagg_consistency", 0.0),
    }


def keystream_throughput(megabytes: int = 256) -> float:
    """This machine's ChaCha20 keystream rate (bytes/s) as the masks are made: the
    cryptography library's ChaCha20 into 1M-value chunks (``common/secagg.py``). A site's
    masking stage expands (1 + neighbours - 1) such masks over its vector: its physical floor."""
    from ctfed.common import secagg as sa

    values = megabytes * 2**20 // 8
    dtype = sa.uint_dtype(64)
    best = float("inf")
    for _ in range(2):  # the better of two: the first touches fresh pages
        started = time.perf_counter()
        for _start, _chunk in sa._keystream_chunks(b"k" * 32, values, dtype, sa.PURPOSE_SELF, 1):
            pass
        best = min(best, time.perf_counter() - started)
    return values * dtype.itemsize / best


def distributed_noise_rate(values: int = 4_000_000) -> dict[str, float]:
    """Distributed DP's extra work at a site's masking stage: Skellam draws (two PTRS Poissons a
    value on the OS CSPRNG, ``common/dp.SecureRandom.skellam``) at the default grid's Poisson
    mean for a ViT-B update, per second, beside the Gaussian draws of local/central DP."""
    from ctfed.common import secagg as sa
    from ctfed.common.config import DistributedDPConfig
    from ctfed.common.dp import SecureRandom

    dp = DistributedDPConfig()
    mean = sa.skellam_mean(dp.noise_multiplier, dp.granularity, 89_000_000)
    rng = SecureRandom()
    started = time.perf_counter()
    rng.skellam(values, mean)
    skellam_s = time.perf_counter() - started
    started = time.perf_counter()
    rng.standard_normal(values)
    gaussian_s = time.perf_counter() - started
    return {"skellam_values_per_s": values / skellam_s, "gaussian_values_per_s": values / gaussian_s,
            "skellam_over_gaussian": skellam_s / gaussian_s}


def print_distributed_noise(figures: dict[str, float], params: int) -> None:
    rate = figures["skellam_values_per_s"]
    print(
        f"  distributed DP noise: {rate / 1e6:.2f}M Skellam values/s on one core ({figures['skellam_over_gaussian']:.2f}x "
        f"the time of as many Gaussian draws) -> {params / rate:.1f} s per round at {params:,} values"
    )


def masking_against_keystream(entry: dict[str, Any], bytes_per_s: float) -> dict[str, float]:
    """The slowest site's masking stage (quantise, encode, expand and add its masks) against
    the time ChaCha20 alone needs for the keystream it expands."""
    from ctfed.common import secagg as sa

    cfg = RunConfig()
    length = entry["params"] + 1
    masks = sa.effective_num_shares(cfg.secagg.num_shares, entry["sites"])  # self mask + neighbours - 1 pairwise
    floor_s = masks * length * (entry["modulus_bits"] // 8) / bytes_per_s
    stage_s = entry["slowest_site_per_stage_s"].get("train.secagg_masked_input", 0.0)
    return {"keystream_gb_per_s": bytes_per_s / 1e9, "masks_per_site": masks, "masking_floor_s": floor_s,
            "masking_stage_s": stage_s, "masking_over_floor": stage_s / floor_s if floor_s else 0.0}


def _bench_sites(num_params: int, node_ids: list[int]) -> tuple[dict, list[int]]:
    """The sites of ``bench_coordinator_memory`` (in their own process): stub training."""
    from ctfed.client.secagg import stage_handlers

    global_state = _synthetic_state(num_params)
    deltas = {n: {k: torch.randn(v.shape) * 1e-3 for k, v in global_state.items()} for n in node_ids}
    return stage_handlers(_stub_train(deltas)), node_ids


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _coordinator_main(conn: Any, result_conn: Any, num_params: int, node_ids: list[int]) -> None:
    """The coordinator's process of ``bench_coordinator_memory``: its real SecAgg+ round code."""
    from ctfed.simulations.runtime.inprocess import ensure_task_identity
    from ctfed.simulations.runtime.process_grid import PipeGrid

    ensure_task_identity()
    cfg = RunConfig()
    cfg.federation.min_sites = 2
    cfg.federation.max_update_norm = 1e9
    global_state = _synthetic_state(num_params)
    global_mb = sum(t.numel() * t.element_size() for t in global_state.values()) / 2**20
    messages = _train_messages(node_ids, global_state)
    gc.collect()
    before_mb = _rss_mb()  # interpreter, torch, Flower, the global model and the round's messages
    grid = PipeGrid(conn, node_ids)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        # As server/rounds.py's run_pretraining: the global encoder parked on disk for the round,
        # the train messages handed to the round (which frees them once pushed).
        parked = park_global_state(Path(run_dir), global_state)
        global_state = parked
        result = secure_round(grid, messages, global_state, cfg, server_round=1)
        if result.mean_delta is not None:
            global_state = apply_delta(global_state, result.mean_delta)
        global_state = unpark_global_state(Path(run_dir), global_state, parked)
        del parked
    seconds = time.perf_counter() - started
    slowest = grid.stop()
    result_conn.send({
        "slowest_site_per_stage_s": slowest,
        "modulus_bits": cfg.secagg.modulus_bits,
        "aggregated": result.mean_delta is not None,
        "reason": result.reason,
        "round_s": seconds,
        "rss_before_round_mb": before_mb,
        # Linux reports ru_maxrss in KiB: this process's peak over its life, the round included.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "global_state_mb": global_mb,
        "masked_vector_mb": (num_params + 1) * cfg.secagg.modulus_bits / 8 / 2**20,
    })


def bench_coordinator_memory(num_params: int, sites: int = 5) -> dict[str, Any]:
    """The coordinator's peak RSS over one SecAgg+ round, sites in another process (both
    spawned fresh, so neither inherits this process's memory)."""
    ctx = multiprocessing.get_context("spawn")
    node_ids = list(range(1, sites + 1))
    coordinator_end, sites_end = ctx.Pipe()
    result_recv, result_send = ctx.Pipe(duplex=False)
    sites_process = ctx.Process(target=_serve, args=(sites_end, num_params, node_ids), daemon=True)
    coordinator = ctx.Process(target=_coordinator_main, args=(coordinator_end, result_send, num_params, node_ids), daemon=True)
    sites_process.start()
    coordinator.start()
    try:
        result = result_recv.recv()
    except EOFError as err:
        raise RuntimeError(f"the coordinator process died (exit code {coordinator.exitcode})") from err
    finally:
        coordinator.join(timeout=60)
        sites_process.join(timeout=60)
        for process in (coordinator, sites_process):
            if process.is_alive():
                process.kill()
    if not result["aggregated"]:
        raise RuntimeError(f"secure round failed in the benchmark: {result['reason']}")
    return {"params": num_params, "sites": sites, **result}


def _serve(conn: Any, num_params: int, node_ids: list[int]) -> None:
    from ctfed.simulations.runtime.process_grid import serve_sites

    serve_sites(conn, functools.partial(_bench_sites, num_params, node_ids))


def print_coordinator_memory(entry: dict[str, Any]) -> None:
    print(
        f"secagg coordinator, {entry['sites']} sites, {entry['params'] / 1e6:.1f}M values (sites in another process): "
        f"peak RSS {entry['peak_rss_mb']:.0f} MB ({entry['rss_before_round_mb']:.0f} MB before the round: interpreter, "
        f"torch, Flower, the {entry['global_state_mb']:.0f} MB global model; one masked vector is "
        f"{entry['masked_vector_mb']:.0f} MB) (goal <= 2048 MB at 89M); round {entry['round_s']:.1f} s"
    )


def print_masking(figures: dict[str, float]) -> None:
    print(
        f"  ChaCha20 keystream {figures['keystream_gb_per_s']:.2f} GB/s here; a site's masking stage "
        f"{figures['masking_stage_s']:.2f} s against {figures['masking_floor_s']:.2f} s of keystream for its "
        f"{figures['masks_per_site']} masks -> {figures['masking_over_floor']:.2f}x the physical floor"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``main`` (tests/unit/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--params", type=int, default=89_000_000, help="values per update (ViT-B's encoder: 89M)")
    parser.add_argument("--sites", type=int, default=5)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m ctfed.simulations.bench.secagg_bench --params 89000000``: the coordinator's peak
    RSS over one SecAgg+ round, this machine's ChaCha20 keystream rate and distributed DP's noise rate."""
    args = build_parser().parse_args(argv)
    keystream = keystream_throughput()
    entry = bench_coordinator_memory(args.params, args.sites)
    print_coordinator_memory(entry)
    print_masking(masking_against_keystream(entry, keystream))
    print_distributed_noise(distributed_noise_rate(), args.params)
    return 0


def with_training(entry: dict[str, Any], train_round_s: float) -> float:
    """The ratio once a local training round of ``train_round_s`` is part of both."""
    return (train_round_s + entry["secure_round_s"]) / (train_round_s + entry["plain_round_s"])


if __name__ == "__main__":
    raise SystemExit(main())
