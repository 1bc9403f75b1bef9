"""A training step that never waits on the host: whether an optimiser step is taken is decided on the device, and
what a step logs stays there until the next loss-log row reads everything at once.

A GPU runs ahead of the Python that feeds it only while Python never asks for a value: every ``float(loss)`` or
``if not finite:`` makes the host wait for all the work queued before it. So a step here keeps its verdict (every
loss and gradient finite on every process) as a bool tensor, skips a bad step inside the optimiser's own kernel,
and adds its logged values into device sums; :meth:`StepLog.read` is the one host read, once per row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor


def on_every_process(flag: Tensor, accelerator) -> Tensor:
    """Whether ``flag`` (a bool on the device) holds on every process: one all-reduce, no host read."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(flag.float(), reduction="sum") == accelerator.num_processes


def gradient_norm(accelerator, optimizer, parameters: list[Tensor], max_norm: float) -> Tensor:
    """The norm of the parameters' gradients (unscaled first under fp16), clipping them to ``max_norm`` when it is
    positive (of sharded gradients, torch's clipping takes the norm of the whole gradient across processes); a plain
    tensor on the device, not finite when any gradient is not. Unclipped, it is this process's (whose gradients
    sharded training holds only a part of): :func:`on_every_process` makes the verdict global."""
    if max_norm > 0:
        return _plain(accelerator.clip_grad_norm_(parameters, max_norm))
    accelerator.unscale_gradients(optimizer)
    grads = [_local(p.grad) for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), device=accelerator.device)
    return torch.nn.utils.get_total_norm(grads)


def _local(tensor: Tensor) -> Tensor:
    """This process's shard of a sharded (DTensor) gradient; any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _plain(tensor: Tensor) -> Tensor:
    """A norm as a plain tensor (torch's clipping returns a replicated DTensor for sharded gradients)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def poison_unless(optimizer, finite: Tensor) -> None:
    """Make the optimiser's gradients NaN unless ``finite``: under fp16 the GradScaler skips (and counts as an
    overflow) any step whose gradients are not finite, so a non-finite loss with finite gradients is skipped too."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, torch.where(finite, 1.0, float("nan")).to(grads[0].dtype))


def step_unless(optimizer, skip: Tensor, scaler=None) -> None:
    """``optimizer.step()`` unless ``skip`` (a bool on the device), decided on the device.

    Under fp16 the GradScaler decides (its gradients were made non-finite for a skipped step: :func:`poison_unless`).
    A fused PyTorch optimiser takes ``found_inf``, the protocol GradScaler uses: its kernel then changes no weight,
    moment or step count. Any other optimiser reads ``skip`` on the host."""
    inner = getattr(optimizer, "optimizer", optimizer)  # inside accelerate's wrapper
    if scaler is not None:
        optimizer.step()
    elif getattr(inner, "_step_supports_amp_scaling", False):
        inner.grad_scale, inner.found_inf = None, skip.float()
        try:
            optimizer.step()
        finally:
            del inner.grad_scale, inner.found_inf
    elif not bool(skip):
        optimizer.step()


def _scalar(value: Tensor | float, device: torch.device) -> Tensor:
    """A logged value as a float64 scalar on the device (a fill kernel for a Python number, not a copy)."""
    if isinstance(value, Tensor):
        return value.detach().to(torch.float64).reshape(())
    return torch.full((), float(value), dtype=torch.float64, device=device)


class StepLog:
    """Sums of the logged values of the taken steps, the skipped steps and the longest run of skipped steps since the
    last row, all on the device; ``bad_in_a_row`` carries over rows (and checkpoints)."""

    def __init__(self, device: torch.device, bad_in_a_row: int = 0):
        self.device = device
        self.bad_in_a_row = torch.full((), bad_in_a_row, dtype=torch.float64, device=device)
        self._clear()

    def _clear(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}
        self.skipped = torch.zeros((), dtype=torch.float64, device=self.device)
        self.worst = self.bad_in_a_row.clone()

    def add_values(self, items: Mapping[str, Iterable[Tensor | float]], taken: Tensor) -> None:
        """One phase's values per micro-batch; counted only if the step was ``taken``."""
        for key, values in items.items():
            values = torch.stack([_scalar(v, self.device) for v in values])
            total = torch.where(taken, values.sum(), 0.0)  # a NaN of a skipped step stays out
            self.sums[key] = self.sums.get(key, 0) + total
            self.counts[key] = self.counts.get(key, 0) + taken.to(torch.float64) * len(values)

    def add_step(self, taken: Tensor) -> None:
        """Count a step, skipped unless ``taken``."""
        bad = (~taken).to(torch.float64)
        self.skipped += bad
        self.bad_in_a_row = (self.bad_in_a_row + 1) * bad
        self.worst = torch.maximum(self.worst, self.bad_in_a_row)

    def read(self, accelerator) -> tuple[dict[str, float], int, int, int]:
        """The one host read of a row: ``(means, skipped, bad_in_a_row, worst)``: each logged value's mean over the
        taken steps' micro-batches of all processes (each sees ``1 / num_processes`` of the global batch, so the curve
        is the global batch's whatever the split; every process logs the same keys, in the same order), the steps
        skipped since the last row, the skipped steps in a row now and the longest such run since the last row."""
        keys = list(self.sums)
        if keys:
            sums, counts = torch.stack([self.sums[k] for k in keys]), torch.stack([self.counts[k] for k in keys])
            if accelerator.num_processes > 1:
                sums, counts = accelerator.reduce(torch.stack([sums, counts]), reduction="sum")
        else:
            sums = counts = torch.zeros(0, dtype=torch.float64, device=self.device)
        values = torch.cat([sums, counts, torch.stack([self.skipped, self.bad_in_a_row, self.worst])]).tolist()
        n = len(keys)
        means = {k: s / c for k, s, c in zip(keys, values[:n], values[n : 2 * n]) if c > 0}
        skipped, bad, worst = (int(v) for v in values[2 * n :])
        self._clear()
        return means, skipped, bad, worst
