"""Peak memory of this process: CUDA's max allocated bytes on a GPU, the peak resident set (VmHWM) on CPU.

The CPU number includes everything the process holds (the teacher, cached data, the Python heap); on
Linux it can be reset (/proc/self/clear_refs), so a `with PeakMemory(...)` block measures only itself.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def peak_mb(device) -> tuple[float, str]:
    """(MiB, what was measured) since the process started or the last reset."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return _rss_peak_mb(), "process_peak_rss"


class PeakMemory:
    """Peak memory (MiB) inside a `with` block: CUDA max allocated, else the process's peak RSS."""

    def __init__(self, device):
        self.device, self.mb, self.kind = str(device), 0.0, ""

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.resettable = _reset_rss_peak()
        return self

    def __exit__(self, *exc) -> None:
        self.mb, self.kind = peak_mb(self.device)
        if not self.device.startswith("cuda") and not self.resettable:
            self.kind = "process_peak_rss_since_start"


def _reset_rss_peak() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) of this process."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
