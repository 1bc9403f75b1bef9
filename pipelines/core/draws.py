"""Per-sample random draws keyed by a sample's place in the run, so a training run is the same at any process
count and micro-batch split: the diffusion trainer's noise levels, noise, windows and dropout, the autoencoder's
posterior samples."""

from __future__ import annotations

import torch
from torch import Tensor

from pipelines.core.devices import to_device
from pipelines.core.loop import step_seed


class SampleDraws:
    """The random draws of a micro-batch, one generator per sample keyed by ``(seed, slot)``.

    ``slot = step · N + position`` for a global batch of ``N`` samples (``batch["slot"]`` from
    :func:`pipelines.core.loop.index_batches`), so draws are the same whichever process and micro-batch a sample
    lands in. Noise levels are stratified over the *global* batch (paper §2 samples ``t ~ U[0, 1]``; stratifying
    lowers the variance): ``t = (π(position) + u) / N`` with one permutation ``π`` per step, the same on every
    process.

    The generators live on the CPU (cheap to seed, the same streams on every machine): each kind of draw is made
    there for all samples and reaches the device in one copy that does not wait (pinned memory on a GPU), instead
    of a device generator per sample and a kernel per sample and draw.
    """

    def __init__(self, seed: int, slots: Tensor, global_batch: int, device: torch.device):
        self.slots, self.global_batch, self.device, self.seed = slots.tolist(), global_batch, device, seed  # on the CPU
        self.generators = [torch.Generator().manual_seed(step_seed(seed, -2, s)) for s in self.slots]

    def _each(self, draw) -> Tensor:
        """``draw(generator)`` for every sample, stacked on the CPU: ``[b, ...]``."""
        return torch.stack([draw(g) for g in self.generators])

    def uniform(self) -> Tensor:
        """One U[0, 1) draw per sample: ``[b]``."""
        return to_device(self._each(lambda g: torch.rand((), generator=g, device="cpu")), self.device)

    def integers(self, high: int, count: int = 1, on_host: bool = False) -> Tensor:
        """``count`` integers in ``[0, high)`` per sample: ``[b, count]`` (on the CPU with ``on_host``)."""
        values = self._each(lambda g: torch.randint(0, high, (count,), generator=g, device="cpu"))
        return values if on_host else to_device(values, self.device)

    def normal(self, shape: tuple[int, ...]) -> Tensor:
        """Standard normal noise ``[b, *shape]``."""
        return to_device(self._each(lambda g: torch.randn(shape, generator=g, device="cpu")), self.device)

    def times(self) -> Tensor:
        """Stratified diffusion times ``[b]`` in [0, 1]."""
        step = self.slots[0] // self.global_batch
        order = torch.Generator().manual_seed(step_seed(self.seed, -3, step))
        strata = torch.randperm(self.global_batch, generator=order, device="cpu")
        position = torch.tensor([s % self.global_batch for s in self.slots])
        u = self._each(lambda g: torch.rand((), generator=g, device="cpu"))
        return to_device((strata[position] + u) / self.global_batch, self.device)
