"""What a training step costs and where it waits: host synchronisations, FLOPs, throughput and model FLOP
utilisation (MFU, Chowdhery et al. 2022, PaLM §B: achieved model FLOP/s over the device's peak).

* :class:`HostSyncs` counts the operations that make the host wait for the device (reading a value, an
  output whose size depends on the data), so a test can hold a training step to none.
* :class:`FlopCount` counts one step's FLOPs by ``torch.utils.flop_counter``'s formulas (PyTorch's CPU attention
  kernels added; xformers' kernels are PyTorch's or register their own formula).
* :func:`peak_flops` is the dense peak of the GPUs whose data sheets we know, for the MFU.
* :func:`throughput` turns a window of logged steps into samples/s, achieved TFLOP/s per device and MFU;
  :class:`Meter` keeps the window for the training loop.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

ROOT = Path(__file__).resolve().parents[2]
TELEMETRY_KEYS = ("samples_per_s", "tflops_per_s", "mfu")  # the loss log's timing columns (not reproducible)

# Operations that wait for the device before they return: a value read back (item, float, bool, ==), or an
# output whose size depends on the data (nonzero, boolean masks, unique); on the CPU they run all the same, so
# counting them there finds what a GPU would wait on.
SYNC_OPS = frozenset({"_local_scalar_dense", "equal", "nonzero", "masked_select", "_unique2", "unique_dim",
                      "unique_consecutive", "repeat_interleave"})
INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})  # sync with a boolean index


class HostSyncs(TorchDispatchMode):
    """Counts, while active, the operations in :data:`SYNC_OPS` (and indexing by a boolean mask), each with the
    line of this repository that ran it: ``events`` lists ``(op, "file:line")`` in order. A data loader's reads
    are left out (they are of host memory).

    ``Tensor.tolist()``, ``.cpu()`` and ``.numpy()`` read memory without dispatching an operation; on CUDA their
    copies to the host wait too, which ``torch.cuda.set_sync_debug_mode`` reports (``benchmarks/gpu_check.py``).
    """

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        repeats = name == "repeat_interleave" and (kwargs or {}).get("output_size") is None and \
            isinstance(args[0], torch.Tensor) and (len(args) < 2 or isinstance(args[1], torch.Tensor))
        boolean_index = name in INDEX_OPS and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if (name in SYNC_OPS and name != "repeat_interleave") or repeats or boolean_index:
            where = _caller()
            if where is not None:
                self.events.append((name, where))
        return func(*args, **(kwargs or {}))

    def counts(self) -> Counter:
        """How many times each ``"op at file:line"`` synchronised."""
        return Counter(f"{op} at {where}" for op, where in self.events)


def _caller() -> Optional[str]:
    """The innermost frame in this repository's packages, as ``path:line``; None inside a data loader, whose reads
    are of host memory (its workers prepare batches on the CPU)."""
    stack = traceback.extract_stack()
    if any(f"torch{os.sep}utils{os.sep}data{os.sep}" in frame.filename for frame in stack):
        return None
    for frame in reversed(stack):
        path = Path(frame.filename)
        if ROOT in path.parents and path.parts[len(ROOT.parts)] in ("autoencoder", "diffusion", "pipelines") \
                and path.name != "telemetry.py":
            return f"{path.relative_to(ROOT)}:{frame.lineno}"
    return "outside the repository"


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_SDPA_FLOPS = {  # PyTorch's CPU flash-attention kernels are missing from FlopCounterMode's own table
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


class FlopCount(TorchDispatchMode):
    """The FLOPs of the operations run while active (``total``), by ``torch.utils.flop_counter``'s formulas (and
    those registered since, e.g. by xformers) and :data:`CPU_SDPA_FLOPS`. Unlike ``FlopCounterMode`` it runs every
    operation as it is: that one decomposes operations it has no formula for (group norm's backward, ...), which
    changes the step it watches by rounding, and a resumed run would not repeat its uninterrupted twin bit for bit."""

    def __init__(self):
        super().__init__()
        self.registry = {**flop_counter.flop_registry, **{op: shape_wrapper(f) for op, f in CPU_SDPA_FLOPS.items()}}
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func.overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(run: Callable[[], object]) -> int:
    """The FLOPs of one ``run()``."""
    with FlopCount() as counter:
        run()
    return counter.total


# Dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, FLOP/s, by the autocast dtype of a run; "tf32"
# is what fp32 matrix products run at with TF32 allowed. Longer names first: "H100 PCIe" before "H100".
PEAK_FLOPS = {
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12},  # SXM
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12},
}


def peak_flops(device: torch.device, mixed_precision: str) -> Optional[float]:
    """The device's dense peak FLOP/s for a run in ``mixed_precision`` (``no``: TF32), or None when unknown
    (CPUs, GPUs missing from :data:`PEAK_FLOPS`)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    dtype = {"no": "tf32"}.get(mixed_precision, mixed_precision)
    return next((peaks.get(dtype) for key, peaks in PEAK_FLOPS.items() if key in name), None)


def throughput(steps: int, seconds: float, samples_per_step: int, flops_per_step: Optional[float],
               peak: Optional[float]) -> dict[str, float]:
    """The loss log's timing columns for ``steps`` optimiser steps in ``seconds``: global ``samples_per_s``, and,
    from ``flops_per_step`` (one process's), the achieved ``tflops_per_s`` of each device and its ``mfu``."""
    if steps <= 0 or seconds <= 0:
        return {}
    row = {"samples_per_s": steps * samples_per_step / seconds}
    if flops_per_step:
        achieved = steps * flops_per_step / seconds
        row["tflops_per_s"] = achieved / 1e12
        if peak:
            row["mfu"] = achieved / peak
    return row


class Meter:
    """The training loop's timing columns: this process's FLOPs of one step, counted on its first step (as run:
    recomputed activations count; run eagerly, so a compiled U-Net compiles on the second step), then, per
    loss-log row, :func:`throughput` over the steps since the last row."""

    def __init__(self, accelerator, run, step: int, seconds: float):
        self.samples_per_step = run.batch_size * accelerator.num_processes * run.grad_accum
        self.peak = peak_flops(accelerator.device, run.mixed_precision)
        self.flops: Optional[int] = None
        self.last = (step, seconds)

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Count the FLOPs of the block the first time it runs, eagerly: a compiled module first called under a
        dispatch mode would be left uncompiled for good, so compilation waits for the next call."""
        if self.flops is not None:
            yield
            return
        with torch.compiler.set_stance("force_eager"), FlopCount() as counter:
            yield
        self.flops = counter.total

    def row(self, step: int, seconds: float) -> dict[str, float]:
        """The timing columns of a row at ``step`` after ``seconds`` of training (after the row's host read, so the
        device's work is done)."""
        (last_step, last_seconds), self.last = self.last, (step, seconds)
        return throughput(step - last_step, seconds - last_seconds, self.samples_per_step, self.flops, self.peak)
