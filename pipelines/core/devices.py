"""Where work runs and what it costs: the device a config names, and a process's peak memory."""

from __future__ import annotations

import platform
import threading
import time

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
    """Peak resident memory (MB) of this process while a block runs (``peak``), its growth over the resident
    memory at the start (``growth_mb``), sampled every ``interval`` seconds; with CUDA also the peak of
    allocated GPU memory (``peak_cuda_mb``)."""

    def __init__(self, interval: float = 0.02):
        self.peak, self.peak_cuda_mb, self.interval, self.start_mb = 0.0, 0.0, interval, 0.0
        self._stop, self._process = threading.Event(), psutil.Process()

    @property
    def growth_mb(self) -> float:
        """Peak resident memory above what the process held when the block started."""
        return self.peak - self.start_mb

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.start_mb = self.peak = self._process.memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss / 2**20)
        if torch.cuda.is_available():
            self.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_gflops(size: int = 2048, repeats: int = 5, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> float:
    """The measured rate of a ``size²`` matrix product in ``dtype`` on ``device``: the best of ``repeats`` runs
    after one warm-up, GFLOP/s (synchronised on CUDA)."""
    device = torch.device(device)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def matmul_peak_gflops(size: int = 2048, repeats: int = 5, device: str = "cpu") -> dict:
    """This machine's measured fp32 matmul rate (:func:`matmul_gflops`), with the CPU model and thread count: the
    yardstick printed beside every time, since machines here differ about 2× in speed."""
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(),
            "fp32_matmul_peak_gflops": round(matmul_gflops(size, repeats, device), 1)}
