"""Where work runs and what it costs: the device a config names, its numerics (TF32, determinism, autocast, the
autoencoder's precision), copies to it that do not wait, and a process's peak memory."""

from __future__ import annotations

import os
import platform
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Optional

import psutil
import torch

from pipelines.core.config import ConfigError, Device, MixedPrecision, VaeDtype

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: Device) -> torch.device:
    """``auto`` → CUDA when present, else the CPU; ``cuda`` without CUDA is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available")
    return torch.device(name)


def launched_processes() -> int:
    """Processes ``accelerate launch`` / ``torchrun`` started (1 without them)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def wants_cpu(name: Device) -> bool:
    """Whether a (possibly multi-process) run on ``name`` uses the CPU: ``cpu``, or ``auto`` without CUDA, where
    accelerate asked for a GPU setup on a machine without one would start every process as a lone "main" process."""
    return name == "cpu" or (name == "auto" and not torch.cuda.is_available())


def configure_numerics(device: torch.device, deterministic: bool = False) -> None:
    """On CUDA: TF32 for float32 matrix products and convolutions (inputs rounded to a 10-bit mantissa, float32
    accumulation: finer than the bf16 that autocast gives most of a step, and what the VAE in float32 and the
    sampler's float32 guidance need no more than). Anywhere: PyTorch's deterministic algorithms when
    ``deterministic`` (an op without one raises, naming itself; cuDNN picks deterministic convolutions, cuBLAS a
    fixed workspace), else PyTorch's defaults."""
    if device.type == "cuda":  # the flags accelerate and xformers read too (PyTorch refuses a mix with the new API)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read by cuBLAS at its first call
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic


def autocast_dtype(device: torch.device, precision: MixedPrecision | str) -> Optional[torch.dtype]:
    """The dtype a network runs in under autocast for ``precision`` on ``device``: bf16 / fp16 on CUDA, ``None``
    (float32) on a CPU, whose bf16 is emulated and many times slower, or for ``no`` / ``fp32``."""
    return None if device.type != "cuda" or precision in ("no", "fp32") else DTYPES[precision]


def autocast(device: torch.device, precision: MixedPrecision | str) -> AbstractContextManager:
    """``torch.autocast`` in :func:`autocast_dtype`'s dtype, or nothing."""
    dtype = autocast_dtype(device, precision)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def vae_dtype(name: VaeDtype, device: torch.device) -> torch.dtype:
    """The autoencoder's weights and activations: ``auto`` is bf16 on a GPU that has it (float32's range, so the
    SD-family VAEs that overflow fp16 do not), else float32; fp16 only when asked."""
    if name != "auto":
        return DTYPES[name]
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float32


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``; from the CPU to a GPU through pinned memory and without waiting (a copy from
    pageable memory makes the host wait for the GPU's queue)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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
