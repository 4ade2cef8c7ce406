"""What device a number was measured on, in words a reader can look up."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def device_name(device) -> str:
    """"NVIDIA H100 80GB HBM3" on CUDA; the CPU model and the cores this process may use on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores"


def use_cpu() -> bool:
    """True when this job runs on the CPU: ACCELERATE_USE_CPU is set, or no accelerator is present."""
    from accelerate.utils import parse_flag_from_env

    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not (torch.cuda.is_available() or has_xpu
                                                             or torch.backends.mps.is_available())


def process_state():
    """accelerate's PartialState (devices, process rank), created the same way everywhere: the first call decides.
    On the CPU it is told so, which makes `torchrun --nproc_per_node N` a gloo process group; a bare PartialState()
    would run N unrelated single-process jobs."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu())
