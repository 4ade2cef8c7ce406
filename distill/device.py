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
