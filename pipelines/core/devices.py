"""Where work runs and what it costs: the device a config names, and a process's peak memory."""

from __future__ import annotations

import threading

import psutil
import torch

from pipelines.core.config import ConfigError, Device


def resolve_device(name: Device) -> torch.device:
    """``auto`` → CUDA when present, else the CPU; ``cuda`` without CUDA is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available")
    return torch.device(name)


class PeakMemory:
    """Peak resident memory (MB) of this process while a block runs, sampled every 20 ms; with CUDA also the
    peak of allocated GPU memory (``peak_cuda_mb``)."""

    def __init__(self, interval: float = 0.02):
        self.peak, self.peak_cuda_mb, self.interval = 0.0, 0.0, interval
        self._stop, self._process = threading.Event(), psutil.Process()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss / 2**20)
        if torch.cuda.is_available():
            self.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20
