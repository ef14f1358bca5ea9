"""LocalTrainer where hospitals train: device choice, mixed precision, activation checkpointing,
gradient accumulation and crop workers. Each option must leave the training it speeds up or
shrinks the same, within a stated tolerance, on the CPU paths CI can run."""

from __future__ import annotations

import pytest
import torch

from ctfed.client.train import LocalTrainer
from ctfed.common.config import ConfigError, LocalDPConfig, Precision, TrainConfig
from ctfed.common.device import resolve_device
from helpers import MODEL, Volumes  # tests/helpers.py (tests/ is on sys.path)


def _run(volumes: int = 6, **train: object) -> tuple[list[float], dict[str, torch.Tensor]]:
    values: dict[str, object] = dict(local_steps=2, schedule_rounds=2, device="cpu")
    values.update(train)
    cfg = TrainConfig(**values)  # type: ignore[arg-type]
    trainer = LocalTrainer(MODEL, cfg, Volumes(count=volumes), seed=1)
    result = trainer.train_round(0)
    return result.losses, trainer.encoder_state()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_device_choice_is_resolved_or_a_clear_error() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="train.device"):
        TrainConfig(device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            resolve_device("cuda:0")
        with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
            LocalTrainer(MODEL, TrainConfig(precision=Precision.fp16), Volumes(), device="cpu")


def test_bf16_autocast_gives_the_fp32_loss_within_tolerance() -> None:
    fp32_losses, fp32_state = _run()
    bf16_losses, bf16_state = _run(precision=Precision.bf16)
    # bfloat16 keeps 8 mantissa bits: about 0.4% per rounding, a few % after a forward pass.
    assert bf16_losses == pytest.approx(fp32_losses, rel=0.05)
    assert all(t.dtype == torch.float32 for t in bf16_state.values())  # weights stay fp32
    assert _max_diff(bf16_state, fp32_state) < 0.05


def test_activation_checkpointing_changes_memory_not_the_result() -> None:
    plain_losses, plain_state = _run()
    ckpt_losses, ckpt_state = _run(activation_checkpointing=True)
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-5)
    assert _max_diff(ckpt_state, plain_state) < 1e-5


def test_accumulated_micro_batches_equal_one_large_batch() -> None:
    # Frozen centre and no masking: then nothing but the batch split differs (the centre's
    # EMA and the masks are drawn per micro-batch, by design).
    same = dict(mim_weight=0.0, center_momentum=1.0, local_steps=1, warmup_fraction=0.0)
    big_losses, big_state = _run(batch_size=4, **same)
    acc_losses, acc_state = _run(batch_size=2, accumulation_steps=2, **same)
    assert acc_losses == pytest.approx(big_losses, rel=1e-5)
    assert _max_diff(acc_state, big_state) < 1e-6
    assert TrainConfig(batch_size=2, accumulation_steps=4).scaled_lr == pytest.approx(5e-4 * 8 / 256)


def test_crop_workers_make_the_same_crops_for_a_seed() -> None:
    in_process, in_state = _run()
    workers, worker_state = _run(loader_workers=2)
    # Same draws; a worker resizes crops on one thread, the trainer on several: float noise only.
    assert workers == pytest.approx(in_process, rel=1e-6)
    assert _max_diff(worker_state, in_state) < 1e-6


def test_local_dp_refuses_what_opacus_cannot_clip() -> None:
    for option in (dict(precision=Precision.bf16), dict(activation_checkpointing=True), dict(accumulation_steps=2)):
        with pytest.raises(ValueError, match="cannot run under local DP-SGD"):
            LocalTrainer(MODEL, TrainConfig(**option), Volumes(), device="cpu", dp=LocalDPConfig())  # type: ignore[arg-type]


def test_simulated_sites_can_share_a_gpu() -> None:
    from ctfed.simulations.config import load_simulation_config
    from ctfed.simulations.runtime.engine import federation_config

    assert federation_config(3, 1) == "num-supernodes=3 client-resources-num-cpus=1"
    assert federation_config(3, 1, 0.33) == "num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=0.33"
    assert federation_config(3, 2, concurrent_sites=3) == "num-supernodes=3 client-resources-num-cpus=2 init-args-num-cpus=6"
    assert load_simulation_config(["simulation.client_gpus=0.5"]).simulation.client_gpus == 0.5
    with pytest.raises(ConfigError, match="client_gpus"):
        load_simulation_config(["simulation.client_gpus=-1"])


def test_an_instruction_cannot_fork_more_loader_workers_than_the_site_has_cores(caplog: pytest.LogCaptureFixture) -> None:
    import os

    with caplog.at_level("WARNING", logger="ctfed.client.train"):
        losses, _ = _run(loader_workers=10_000, local_steps=1)
    assert len(losses) == 1
    assert f"capped at this site's {os.cpu_count()} cores" in caplog.text


def test_a_cpu_site_checkpoints_large_encoders_by_default() -> None:
    from ctfed.common.config import load_run_config
    from ctfed.common.device import AUTO_CHECKPOINTING_MIN_PARAMS, use_activation_checkpointing

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    big, small = AUTO_CHECKPOINTING_MIN_PARAMS, AUTO_CHECKPOINTING_MIN_PARAMS - 1
    assert use_activation_checkpointing(None, cpu, big, local_dp=False)  # ViT-B on a CPU: memory first
    assert not use_activation_checkpointing(None, cpu, small, local_dp=False)  # small: recompute buys little
    assert not use_activation_checkpointing(None, gpu, big, local_dp=False)
    assert not use_activation_checkpointing(None, cpu, big, local_dp=True)  # Opacus' hooks see every forward
    assert use_activation_checkpointing(True, gpu, small, local_dp=False)  # explicit wins
    assert not use_activation_checkpointing(False, cpu, big, local_dp=False)
    assert load_run_config([]).train.activation_checkpointing is None
    assert load_run_config(["train.activation_checkpointing=true"]).train.activation_checkpointing is True
    # The trainer applies it: a tiny encoder under auto is not checkpointed, forced it is.
    assert not LocalTrainer(MODEL, TrainConfig(device="cpu"), Volumes(), seed=0).student.encoder.activation_checkpointing
    assert LocalTrainer(MODEL, TrainConfig(device="cpu", activation_checkpointing=True), Volumes(), seed=0).student.encoder.activation_checkpointing
    # The auto setting travels as an absent key (a ConfigRecord holds no None), and a site
    # rebuilds it as auto, to be resolved on its own device; an explicit value travels.
    from ctfed.common.config import ModelConfig
    from ctfed.common.exchange import RoundInstructions

    def travelled(train: TrainConfig) -> tuple[object, TrainConfig]:
        record = RoundInstructions(server_round=1, model=ModelConfig(), train=train).to_record()
        return record, RoundInstructions.from_record(record).train

    record, received = travelled(TrainConfig())
    assert "train.activation_checkpointing" not in record
    assert received.activation_checkpointing is None
    assert travelled(TrainConfig(activation_checkpointing=False))[1].activation_checkpointing is False
    # Under DP the auto setting is simply off, not a refusal.
    LocalTrainer(MODEL, TrainConfig(device="cpu"), Volumes(), seed=0, dp=LocalDPConfig())


# Run in a fresh interpreter: what glibc does with a block depends on the heap this process
# already has, and a test worker's heap is whatever the tests before it left (one run found
# 14 of the 20 blocks in their own mappings, the rest reusing free heap).
_GLIBC_SCENARIO = """
import ctypes
import torch
from ctfed.common.device import limit_heap_fragmentation

libc = ctypes.CDLL("libc.so.6")

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc.mallinfo2.restype = MallInfo2

def mmapped_bytes():  # bytes glibc holds in chunks of their own mmap (freed = unmapped)
    return int(libc.mallinfo2().hblkhd)

# A 16 MiB free raises glibc's default (dynamic) threshold to 16 MiB: 1 MiB tensors would
# then come from the heap, which fragments and keeps freed activations resident.
torch.empty(16 * 2**20, dtype=torch.uint8).fill_(1)
assert limit_heap_fragmentation()
before = mmapped_bytes()
blocks = [torch.ones(2**18) for _ in range(20)]  # 20 x 1 MiB
held = mmapped_bytes() - before
del blocks
print(held, mmapped_bytes() - before)
"""


def test_glibc_hands_freed_tensor_memory_back() -> None:
    import ctypes
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt only")
    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    done = subprocess.run([sys.executable, "-c", _GLIBC_SCENARIO], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    held, after = map(int, done.stdout.split())
    assert held >= 15 * 2**20  # each in its own mapping (a few may reuse free heap) ...
    assert after < 2**20  # ... and unmapped, back to the OS, when freed
