"""Wall time and peak memory of one phase (unlearning or retraining), measured the same way.

Peak memory:
- CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated at the
  start: the tensors the phase itself needed.
- CPU: torch's CPU allocator is invisible to ``tracemalloc``, and ``ru_maxrss`` is a lifetime
  maximum of the process (a later, smaller phase would read as 0). So a background thread samples
  the resident set size from ``/proc/self/statm`` every few milliseconds and the peak *increase*
  over the RSS at the start is reported. Before the start RSS is read, garbage is collected and
  glibc's ``malloc_trim(0)`` hands freed heap pages back to the kernel: otherwise memory that an
  earlier phase freed stays resident, the next phase reuses it without the RSS growing, and its
  peak reads as almost 0. Where ``/proc`` does not exist, the increase of ``ru_maxrss`` is the
  fallback (exact for a phase that sets a new lifetime maximum, else 0).
Both are estimates of the extra memory a phase needs, comparable between phases of one process.

CPU time (``time.process_time``, all threads of the process) is recorded next to wall time: on a
shared machine another process's load stretches wall time but not CPU time, so the CPU-time
ratio is the steadier comparison of two phases measured at different moments.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def _release_free_heap() -> None:
    """Collect garbage and return freed heap pages to the kernel (glibc only; a no-op elsewhere)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class Measurement:
    """Wall seconds, CPU seconds of the process (all threads) and the peak extra memory."""

    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_bytes: int = 0
    how: str = ""

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


class ResourceMeter:
    """``with ResourceMeter(device) as m: ...`` then ``m.result`` holds seconds and peak bytes."""

    def __init__(self, device: torch.device, *, interval_s: float = 0.002) -> None:
        self.device = device
        self.interval_s = interval_s
        self.result = Measurement()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_rss = 0
        self._peak_rss = 0
        self._start_cuda = 0
        self._start_maxrss = 0
        self._start_time = 0.0
        self._start_cpu = 0.0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = _rss_bytes()
            if rss is not None and rss > self._peak_rss:
                self._peak_rss = rss

    def __enter__(self) -> "ResourceMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_cuda = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            rss = _rss_bytes()
            if rss is None:
                self._start_maxrss = _maxrss_bytes()
            else:
                self._start_rss = self._peak_rss = rss
                self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
                self._thread.start()
        self._start_cpu = time.process_time()
        self._start_time = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.result.seconds = time.perf_counter() - self._start_time
        self.result.cpu_seconds = time.process_time() - self._start_cpu
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) - self._start_cuda
            self.result.peak_bytes, self.result.how = max(int(peak), 0), "cuda_max_memory_allocated"
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            rss = _rss_bytes()
            if rss is not None:
                self._peak_rss = max(self._peak_rss, rss)
            self.result.peak_bytes, self.result.how = max(self._peak_rss - self._start_rss, 0), "rss_sampling"
        else:
            self.result.peak_bytes = max(_maxrss_bytes() - self._start_maxrss, 0)
            self.result.how = "ru_maxrss"
