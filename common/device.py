"""Where a site's tensors live and at what precision they are computed.

``resolve_device`` turns a config value (``auto``, ``cpu``, ``cuda``, ``cuda:N``) into a
``torch.device`` or a clear error; ``autocast`` is the mixed-precision context for one forward
pass (bf16 on CPU and GPU; fp16 on GPU only, where a gradient scaler guards its small range).
Tensors meet the CPU only at the wire and the cache: the trainer moves batches to the device,
and the states it returns are CPU copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ctfed.common.config import Precision, valid_device_spec


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
