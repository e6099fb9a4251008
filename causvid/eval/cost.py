"""What a run costs, for benchmarks: FLOPs, resident memory now, and the peak over a block of code."""

from __future__ import annotations

import ctypes
import gc
import os
import threading
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, also counting the CPU's fused attention kernel, which it leaves out
    (it knows only the CUDA kernels), so attention is counted on every device."""
    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return FlopCounterMode(display=False, custom_mapping={cpu_attention: _cpu_sdpa_flops})


def rss_mb() -> float | None:
    """Current resident memory of this process (Linux), or None where it cannot be read."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _release_free_memory() -> None:
    """Hand memory freed by earlier runs back to the OS (glibc keeps it), so that resident memory
    rises again with the next run's allocations instead of reusing them unseen."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then read low
        pass


class PeakMemory:
    """Peak memory while the `with` block runs, above what was in use when it began, in MiB.

    On CUDA: torch's allocator peak. On the CPU: resident memory sampled every `interval` seconds
    by a thread, after freed memory went back to the OS (the process-wide `ru_maxrss` never
    resets, so it cannot tell one run from another).
    """

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_mb: float | None = None
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        _release_free_memory()
        self._start = rss_mb()
        self._highest = self._start
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def sample(self) -> None:
        """Read resident memory now (the thread does this every `interval` seconds)."""
        now = rss_mb()
        if now is not None and self._highest is not None:
            self._highest = max(self._highest, now)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._start
            return
        self._stop.set()
        self._thread.join()
        if self._start is not None:
            self.sample()
            self.peak_mb = self._highest - self._start
