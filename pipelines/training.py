"""What both training loops share: accelerate set-up, a resumable data order, per-step seeding, optimisers
with warm-up, and checkpoints that hold the full training state.

Resumption is exact: the data order is a pure function of ``(seed, epoch)`` and every step reseeds torch from
``(seed, rank, step)``, so a run killed at any step and resumed from its last checkpoint continues with the same
batches, noise and dropout it would have drawn. Checkpoints go through :mod:`pipelines.checkpoint` (atomic,
safetensors, no pickles).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import nn

from pipelines.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then a constant or cosine learning rate."""

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0


@dataclass
class RunConfig:
    """The training loop: length, batch, precision, checkpoints, logging."""

    out_dir: str = "outputs/run"
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    num_workers: int = 0
    resume: bool = True
    cpu: bool = False  # force the CPU even where CUDA is present
    ema_decay: float = 0.999  # 0 disables the EMA


def make_accelerator(run: RunConfig):
    """An ``accelerate.Accelerator`` for the run (device placement, mixed precision, accumulation, processes)."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=run.mixed_precision, gradient_accumulation_steps=run.grad_accum, cpu=run.cpu)


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for one step of one process, independent of what ran before."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_step(seed: int, rank: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Reseed torch's global RNG (dropout, CUDA) for this step; returns a generator on ``device`` for the step's
    own draws (noise levels, noise, conditioning dropout)."""
    value = step_seed(seed, rank, step)
    torch.manual_seed(value)
    return torch.Generator(device).manual_seed(value)


class TensorBundle(nn.Module):
    """Fixed tensors (e.g. the null text embedding) saved and restored with a checkpoint like a module."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        super().__init__()
        self.tensors = nn.ParameterDict({k: nn.Parameter(v, requires_grad=False) for k, v in tensors.items()})


class IndexStream:
    """Batches of dataset indices, epoch after epoch, each epoch a permutation seeded by ``(seed, epoch)``.

    Stateless: the ``k``-th batch of process ``rank`` is a pure function of ``k``, so a resumed run continues
    the exact order from its step count, whatever a data loader had prefetched. Process ``rank`` of ``world``
    takes global batches ``rank, rank + world, ...``. Indices are *global*: ``epoch · size + i``, so a dataset
    wrapped in :class:`EpochView` can draw per-epoch randomness from the index alone.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if size < 1:
            raise ValueError("the dataset is empty")
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.per_rank = max(size // (batch_size * world), 1)  # batches per epoch for each process

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(step_seed(self.seed, -1, epoch))
        order = torch.randperm(self.size, generator=generator)
        needed = self.per_rank * self.world * self.batch_size
        return order.repeat(math.ceil(needed / self.size))[:needed]  # tiny datasets repeat to fill a batch

    def batch(self, k: int) -> list[int]:
        """The ``k``-th batch (0-based) of this process."""
        epoch, j = divmod(k, self.per_rank)
        start = (j * self.world + self.rank) * self.batch_size
        return (self._permutation(epoch)[start : start + self.batch_size] + epoch * self.size).tolist()

    def batches(self, start: int = 0) -> Iterator[list[int]]:
        """Batches ``start, start + 1, ...`` forever."""
        k = start
        while True:
            yield self.batch(k)
            k += 1


class EpochView(torch.utils.data.Dataset):
    """A dataset indexed by global index ``epoch · n + i``: sets the epoch, then returns item ``i``.

    Datasets whose randomness is seeded by ``(seed, epoch, index)`` (``pipelines.data``) thereby give each
    epoch new clips while every item stays a pure function of its global index, in any worker process.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        epoch, i = divmod(index, len(self.dataset))
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[i]


def make_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable ``params``."""
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad], lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay
    )


def lr_factor(step: int, total: int, optim: OptimConfig) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up, then constant or cosine decay."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.decay == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total - optim.warmup_steps))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, total: int, optim: OptimConfig) -> float:
    """Apply :func:`lr_factor` to every parameter group; returns the learning rate."""
    lr = optim.lr * lr_factor(step, total, optim)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclass
class TrainingState:
    """Everything that changes while training and is saved in each checkpoint."""

    modules: dict[str, nn.Module]  # name -> module (weights saved as ``name.safetensors``)
    optimizers: dict[str, torch.optim.Optimizer]
    emas: dict[str, Any] = field(default_factory=dict)  # name -> diffusion.ema.EMA
    step: int = 0
    seconds: float = 0.0  # training time accumulated over all resumed runs

    def save(
        self, accelerator, root: Path, config: dict, keep: int, json_files: Optional[dict] = None
    ) -> Optional[Path]:
        """Write a checkpoint (main process only, after all processes reach this point)."""
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return None
        modules = {name: accelerator.get_state_dict(m) for name, m in self.modules.items()}
        modules.update({f"ema_{name}": ema.state_dict() for name, ema in self.emas.items()})
        states = {f"optimizer_{name}": opt.state_dict() for name, opt in self.optimizers.items()}
        info = {
            "config": config,
            "seconds": self.seconds,
            "ema_updates": {name: ema.num_updates for name, ema in self.emas.items()},
        }
        return save_checkpoint(root, self.step, modules, states, info, keep=keep, json_files=json_files)

    def restore(self, directory: Path) -> dict:
        """Load a checkpoint written by :meth:`save` into the live objects; returns its ``trainer_state``."""
        modules, states, info = load_checkpoint(directory)
        for name, module in self.modules.items():
            _unwrap(module).load_state_dict(modules[name])
        for name, ema in self.emas.items():
            ema.load_state_dict(modules[f"ema_{name}"], info["ema_updates"][name])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(states[f"optimizer_{name}"])
        self.step, self.seconds = int(info["step"]), float(info.get("seconds", 0.0))
        return info

    def maybe_resume(self, root: Path, enabled: bool, log=print) -> bool:
        """Resume from ``root``'s latest checkpoint when there is one and ``enabled``."""
        found = latest_checkpoint(root) if enabled else None
        if found is None:
            return False
        self.restore(found)
        log(f"resumed from {found} (step {self.step})")
        return True


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP/compile wrapper."""
    while hasattr(module, "module"):
        module = module.module
    return getattr(module, "_orig_mod", module)


class Timer:
    """Wall-clock seconds of training, excluding checkpoints and sampling, added to the state."""

    def __init__(self, state: TrainingState):
        self.state, self.start = state, time.perf_counter()

    def pause(self) -> None:
        self.state.seconds += time.perf_counter() - self.start

    def resume(self) -> None:
        self.start = time.perf_counter()
