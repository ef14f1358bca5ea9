"""Where a site's tensors live and at what precision they are computed.

``resolve_device`` turns a config value (``auto``, ``cpu``, ``cuda``, ``cuda:N``) into a
``torch.device`` or a clear error; ``autocast`` is the mixed-precision context for one forward
pass (bf16 on CPU and GPU; fp16 on GPU only, where a gradient scaler guards its small range).
Tensors meet the CPU only at the wire and the cache: the trainer moves batches to the device,
and the states it returns are CPU copies.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
from collections.abc import Iterator

import torch

from ctfed.common.config import Precision, valid_device_spec

logger = logging.getLogger(__name__)

# Encoders at least this large get activation checkpointing on a CPU site by default
# (train.activation_checkpointing: null): ViT-B's activations of one default batch are ~3 GB.
AUTO_CHECKPOINTING_MIN_PARAMS = 50_000_000
# glibc serves allocations from this size on with their own mmap, returned to the OS when freed.
_MMAP_THRESHOLD_BYTES = 128 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def use_activation_checkpointing(
    setting: bool | None, device: torch.device, encoder_params: int, local_dp: bool
) -> bool:
    """``train.activation_checkpointing``: true/false as given; null (auto) on for a CPU site
    with a large encoder, where memory and not compute is what a hospital's machine runs out of."""
    if setting is not None:
        return setting
    return device.type == "cpu" and not local_dp and encoder_params >= AUTO_CHECKPOINTING_MIN_PARAMS


def limit_heap_fragmentation() -> bool:
    """Make glibc return freed tensor memory to the OS at once (a fixed 128 KiB mmap threshold).

    A training step frees and reallocates gigabytes of activations of many sizes; glibc's
    default raises its mmap threshold to 32 MiB after the first frees, so most of them come
    from the heap, which fragments and is never handed back: a ViT-B CPU round peaked 1.1 GB
    higher that way (docs/benchmarks.md). Process-wide, once; returns whether it applied (only
    Linux with glibc; elsewhere nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        applied = bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    if not applied:
        logger.warning("glibc refused mallopt(M_MMAP_THRESHOLD); freed training memory may stay in the heap")
    return applied


def resolve_device(spec: str) -> torch.device:
    """``auto``: the first CUDA device if one is visible, else the CPU; ``cuda:N`` must exist."""
    if not valid_device_spec(spec):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got '{spec}'")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device '{spec}' asked for, but torch {torch.__version__} sees no CUDA device "
                "(a CPU build, or no GPU visible to this process); use device=auto or cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device '{spec}' asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def check_precision(precision: Precision, device: torch.device) -> None:
    if precision is Precision.fp16 and device.type != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA device (it runs with a gradient scaler), got {device}; use bf16")


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    """Mixed precision for the forward passes inside (nothing for fp32)."""
    if precision is Precision.fp32:
        yield
        return
    dtype = torch.bfloat16 if precision is Precision.bf16 else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
