"""The one training loop both trainers run, and what it stands on: accelerate set-up, a resumable data order,
per-step seeding, optimisers with warm-up, checkpoints that hold the full training state, and logging.

A trainer supplies its modules and one or more :class:`Phase` (an optimiser and the loss of a micro-batch);
:func:`train_loop` does the rest: gradient accumulation (each micro-batch's loss divided by their number; DDP
through ``accelerator.accumulate``, FSDP2 by switching its reduce-scatter off, both synchronise only the last
micro-batch), clipping, skipping non-finite steps, EMA, the learning-rate schedule, CSV / PNG / tracker logs,
checkpoint and sample cadence, resume and timing. Sharded modules (``run.sharding=fsdp2``) are the trainer's to
build (:mod:`pipelines.core.sharded`); the loop and :class:`TrainingState` see them through ``sharded``.

Resumption is exact: the data order is a pure function of ``(seed, epoch)`` and every step reseeds torch from
``(seed, rank, step)``, so a run killed at any step and resumed from its last checkpoint continues with the same
batches, noise and dropout it would have drawn. Checkpoints go through :mod:`pipelines.core.checkpoint` (atomic,
safetensors, no pickles).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipelines.core.checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state, save_checkpoint
from pipelines.core.config import ConfigError, OptimConfig, RunConfig, UserError, config_to_dict, save_resolved_config
from pipelines.core.devices import configure_numerics, launched_processes, wants_cpu
from pipelines.core.on_device import StepLog, gradient_norm, on_every_process, poison_unless, step_unless
from pipelines.core.sharded import is_sharded, load_sharded_checkpoint, save_sharded_checkpoint, set_gradient_sync
from pipelines.core.telemetry import Meter
from pipelines.core.visual import LossLog


def make_accelerator(run: RunConfig, find_unused_parameters: bool = False):
    """An ``accelerate.Accelerator`` for the run (device placement, mixed precision, accumulation, processes,
    trackers). Processes come from ``accelerate launch`` and its config file; sharding (``run.sharding``) is the
    trainer's, on the process group accelerate makes here.

    Without CUDA, ``run.device=auto`` under a multi-process launch means the CPU (gloo): asked for a GPU setup on
    a machine without one, accelerate would otherwise start every process as a lone "main" process, all training
    alone and writing the same files. A launch whose processes still do not form one group stops here. TF32 and
    ``run.deterministic`` are set for the run (:func:`pipelines.core.devices.configure_numerics`).

    DDP keeps the gradients as views of its all-reduce buckets (``gradient_as_bucket_view``): no copy into and
    out of the buckets each step, and one gradient-sized buffer less.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but CUDA is not available")
    launched = launched_processes()  # set by accelerate launch / torchrun in every process
    cpu = wants_cpu(run.device)
    trackers = {"none": None, "all": "all"}.get(run.report_to, [run.report_to])
    accelerator = Accelerator(mixed_precision=run.mixed_precision, gradient_accumulation_steps=run.grad_accum,
                              cpu=cpu, log_with=trackers, project_dir=run.out_dir,
                              kwargs_handlers=[DistributedDataParallelKwargs(
                                  find_unused_parameters=find_unused_parameters, gradient_as_bucket_view=True)])
    if launched > 1 and accelerator.num_processes != launched:
        raise ConfigError(f"run.device={run.device}: {launched} processes were launched but accelerate set up "
                          f"{accelerator.num_processes} ({accelerator.distributed_type}); on a machine without "
                          f"GPUs use run.device=cpu")
    configure_numerics(accelerator.device, run.deterministic)
    return accelerator


def start_run(accelerator, config: Any, run: RunConfig, name: str, must_match: tuple[str, ...] = ()) -> Path:
    """Create the run folder, write the resolved config (main process) and start the trackers; first refuse (one
    line, nothing written) to continue a checkpoint whose sections ``must_match`` differ from ``config``'s."""
    out = Path(run.out_dir)
    refuse_another_model(out / "checkpoints", run.resume, config_to_dict(config), must_match,
                         accelerator.num_processes)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved_config(config, out)
    if run.report_to != "none":
        accelerator.init_trackers(name, config=_flat_scalars(config_to_dict(config)))
    return out


def _flat_scalars(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Trackers take flat scalar hyper-parameters: ``{"run.lr": 1e-3, ...}`` (lists as strings)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= _flat_scalars(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


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

    ``accum`` micro-batches make one optimiser step: an epoch holds a whole number of *steps*, so where the epochs
    end (and which samples a step sees) depends only on the global batch ``batch_size · world · accum``, not on
    how it is split into processes and micro-batches.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, accum: int = 1):
        if size < 1:
            raise ValueError("the dataset is empty")
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        steps = max(size // (batch_size * world * accum), 1)  # optimiser steps per epoch
        self.per_rank = steps * accum  # micro-batches per epoch for each process

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

    Datasets whose randomness is seeded by ``(seed, epoch, index)`` (``pipelines.media.datasets``) thereby give each
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


def collate(batch: list[dict]) -> dict:
    """Stack the tensors of a list of items along a new batch axis; other values become lists."""
    return {
        key: torch.stack([item[key] for item in batch])
        if isinstance(batch[0][key], torch.Tensor)
        else [item[key] for item in batch]
        for key in batch[0]
    }


def index_batches(dataset, run: RunConfig, accelerator, start_step: int) -> Iterator[dict]:
    """This process's batches from optimiser step ``start_step`` on (``grad_accum`` per step), on its device.

    Each batch carries ``slot [b]``: every sample's index in the sequence of all samples of the run, the same
    whatever the split into processes and micro-batches (per-sample random draws are keyed by it). The order
    is :class:`IndexStream`'s (a pure function of the seed and the batch number), so a resumed run
    reads exactly the batches it would have read; data-loader workers prefetch them, into pinned memory for a GPU,
    whose copies then run beside its work (``non_blocking``).
    """
    stream = IndexStream(len(dataset), run.batch_size, run.seed, accelerator.process_index, accelerator.num_processes,
                         run.grad_accum)
    loader = torch.utils.data.DataLoader(
        EpochView(dataset), batch_sampler=stream.batches(start_step * run.grad_accum), num_workers=run.num_workers,
        collate_fn=collate, generator=torch.Generator().manual_seed(run.seed),  # not the global RNG
        pin_memory=accelerator.device.type == "cuda")
    device, size, k = accelerator.device, run.batch_size, start_step * run.grad_accum
    for batch in loader:
        batch = {key: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for key, v in batch.items()}
        first = (k * accelerator.num_processes + accelerator.process_index) * size
        batch["slot"] = torch.arange(first, first + size)  # each sample's place among all samples of the run
        k += 1
        yield batch


def make_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable ``params``, with PyTorch's fused kernel where it exists (CPU and CUDA floating-point
    parameters): one kernel for all tensors instead of a Python loop over them."""
    trainable = [p for p in params if p.requires_grad]
    fused = bool(trainable) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in trainable)
    return torch.optim.AdamW(trainable, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                             fused=fused)


def lr_factor(step: int, total: int, optim: OptimConfig) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up, then constant or cosine decay."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.decay == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total - optim.warmup_steps))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, total: int, optim: OptimConfig,
           base: Optional[float] = None) -> float:
    """Apply :func:`lr_factor` to ``base`` (default ``optim.lr``) in every parameter group; returns the rate."""
    lr = (optim.lr if base is None else base) * lr_factor(step, total, optim)
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
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient
    bad_in_a_row: int = 0  # consecutive skipped steps up to now
    sharded: bool = False  # run.sharding=fsdp2: the modules are FSDP2's, checkpoints go through DCP

    def save(self, accelerator, root: Path, config: dict, keep: int, json_files: Optional[dict] = None,
             info: Optional[dict] = None) -> Optional[Path]:
        """Write a checkpoint (every process calls this; the main process writes, sharded checkpoints are written
        by all); ``info`` joins the checkpoint's ``trainer_state.json`` before the checkpoint is renamed into
        place, with the process count and the global batch it was trained at."""
        accelerator.wait_for_everyone()
        meta = {
            "config": config,
            "seconds": self.seconds,
            "skipped_steps": self.skipped_steps,
            "bad_in_a_row": self.bad_in_a_row,
            "ema_updates": {name: ema.num_updates for name, ema in self.emas.items()},
            "processes": accelerator.num_processes,
            "global_batch": _global_batch(config, accelerator.num_processes),
            **(info or {}),
        }
        if self.sharded:
            return save_sharded_checkpoint(root, self.step, self.modules, self.optimizers, self.emas, meta, keep,
                                           json_files)
        modules = {name: accelerator.get_state_dict(m) for name, m in self.modules.items()}
        if not accelerator.is_main_process:
            return None
        modules.update({f"ema_{name}": ema.state_dict() for name, ema in self.emas.items()})
        states = {f"optimizer_{name}": opt.state_dict() for name, opt in self.optimizers.items()}
        if accelerator.scaler is not None:  # fp16: the loss scale and its growth tracker
            states["grad_scaler"] = accelerator.scaler.state_dict()
        return save_checkpoint(root, self.step, modules, states, meta, keep=keep, json_files=json_files)

    def restore(self, directory: Path, accelerator=None) -> dict:
        """Load a checkpoint written by :meth:`save` into the live objects; returns its ``trainer_state``."""
        if self.sharded:
            info = read_trainer_state(directory)
            load_sharded_checkpoint(directory, self.modules, self.optimizers, self.emas)
            for name, ema in self.emas.items():
                ema.num_updates = info["ema_updates"][name]
        else:
            info = self._restore_files(directory, accelerator)
        self.step, self.seconds = int(info["step"]), float(info.get("seconds", 0.0))
        self.skipped_steps = int(info.get("skipped_steps", 0))
        self.bad_in_a_row = int(info.get("bad_in_a_row", 0))
        return info

    def _restore_files(self, directory: Path, accelerator=None) -> dict:
        """Load an unsharded checkpoint (full weights, EMA and optimiser state in safetensors); its info."""
        modules, states, info = load_checkpoint(directory)
        for name, module in self.modules.items():
            _unwrap(module).load_state_dict(modules[name])
        for name, ema in self.emas.items():
            ema.load_state_dict(modules[f"ema_{name}"], info["ema_updates"][name])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(states[f"optimizer_{name}"])
        if accelerator is not None and accelerator.scaler is not None and "grad_scaler" in states:
            accelerator.scaler.load_state_dict(states["grad_scaler"])
        return info

    def maybe_resume(self, root: Path, enabled: bool, log=print, config: Optional[dict] = None,
                     must_match: tuple[str, ...] = (), accelerator=None) -> bool:
        """Resume from ``root``'s latest checkpoint when there is one and ``enabled``. The sections
        ``must_match`` of the saved config (what defines the model) must equal ``config``'s: a run never silently
        continues a different model. The process count may change, the global batch and the sharding may not
        (:func:`_check_continuation`)."""
        found = latest_checkpoint(root) if enabled else None
        if found is None:
            return False
        if config is not None:
            refuse_another_model(root, enabled, config, must_match, 1 if accelerator is None
                                 else accelerator.num_processes)
        self.restore(found, accelerator)
        log(f"resumed from {found} (step {self.step})")
        return True


def refuse_another_model(root: Path, enabled: bool, config: dict, must_match: tuple[str, ...],
                         processes: int) -> None:
    """A :class:`ConfigError` naming the keys when resuming would continue the latest checkpoint under ``root``
    with sections ``must_match`` (what defines the model) that differ from ``config``'s, or at another global batch
    or sharding (:func:`_check_continuation`): a run never silently continues a different run."""
    found = latest_checkpoint(root) if enabled else None
    if found is None:
        return
    saved = read_trainer_state(found)
    changed = _differences({k: saved.get("config", {}).get(k) for k in must_match},
                           {k: config.get(k) for k in must_match})
    if changed:
        raise ConfigError(f"{', '.join(changed[:5])}: differ from the checkpoint in {found}; use another "
                          f"run.out_dir or run.resume=false to start over")
    _check_continuation(saved, config, processes, found)


def _global_batch(config: Mapping, processes: int) -> int:
    """Samples per optimiser step: ``run.batch_size × processes × run.grad_accum``."""
    return config["run"]["batch_size"] * processes * config["run"]["grad_accum"]


def _check_continuation(saved: Mapping, config: Mapping, processes: int, found: Path) -> None:
    """A run resumes at another process count (elastic) only at the same global batch, which fixes its sample
    sequence (:class:`IndexStream`, the per-sample slots), and only with the sharding its checkpoint was written
    with (its files differ); anything else is a one-line :class:`ConfigError`."""
    run, batch = config["run"], _global_batch(config, processes)
    if "global_batch" in saved and batch != saved["global_batch"]:
        raise ConfigError(f"run.batch_size: the global batch run.batch_size × processes × run.grad_accum = "
                          f"{run['batch_size']} × {processes} × {run['grad_accum']} = {batch} differs from the "
                          f"{saved['global_batch']} of the checkpoint in {found}; resume at that global batch")
    before = saved.get("config", {}).get("run", {}).get("sharding", "none")
    if before != run.get("sharding", "none"):
        raise ConfigError(f"run.sharding: the checkpoint in {found} was written with run.sharding={before}; resume "
                          f"with it, or use another run.out_dir")


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


@dataclass
class Phase:
    """One optimiser of a training step and the loss that trains it.

    ``loss(batch, generator) -> (scalar loss, {name: tensor or float})`` runs on one micro-batch; ``modules`` are the
    prepared modules whose gradients accumulate over micro-batches (DDP's ``no_sync``); ``active(step)`` says
    whether the phase runs at a step (the discriminator starts late); ``lr`` is the phase's base learning rate;
    ``clip``: whether ``optim.max_grad_norm`` clips its gradients.
    """

    name: str
    optimizer: torch.optim.Optimizer
    modules: tuple[nn.Module, ...]
    loss: Callable[[Any, torch.Generator], tuple[Tensor, dict[str, Tensor | float]]]
    lr: float
    active: Callable[[int], bool] = lambda step: True
    clip: bool = True


def _run_phase(phase: Phase, micro: list, accelerator, generator: torch.Generator, optim: OptimConfig,
               log: StepLog) -> Tensor:
    """Accumulate the phase's gradients over the micro-batches and step its optimiser unless a loss on any process
    or a gradient is not finite; returns whether it stepped, a bool on the device that nothing reads before the
    next loss-log row (:mod:`pipelines.core.on_device`)."""
    phase.optimizer.zero_grad(set_to_none=True)  # also drops gradients another phase's loss left here
    finite, step_logs = torch.ones((), dtype=torch.bool, device=accelerator.device), defaultdict(list)
    sharded = is_sharded(phase.modules)
    for i, batch in enumerate(micro):
        with _micro_batch(accelerator, phase.modules, sharded, last=i == len(micro) - 1):
            with accelerator.autocast():
                loss, items = phase.loss(batch, generator)
            finite = finite & torch.isfinite(loss.detach())
            if sharded:  # FSDP2 reduce-scatters the mean over processes after the last micro-batch
                (loss / len(micro)).backward()
            else:  # divides by grad_accum; DDP all-reduces on the last micro-batch only
                accelerator.backward(loss)
        for key, value in items.items():
            step_logs[key].append(value)
    if accelerator.scaler is not None:  # fp16: the GradScaler decides from the gradients
        poison_unless(phase.optimizer, on_every_process(finite, accelerator))
    parameters = [p for m in phase.modules for p in m.parameters()]
    norm = gradient_norm(accelerator, phase.optimizer, parameters, optim.max_grad_norm if phase.clip else 0.0)
    taken = on_every_process(finite & torch.isfinite(norm), accelerator)
    step_unless(phase.optimizer, ~taken, accelerator.scaler)  # skipped: neither its weights nor its logs count
    phase.optimizer.zero_grad(set_to_none=True)
    log.add_values(step_logs, taken)
    return taken


@contextlib.contextmanager
def _micro_batch(accelerator, modules: tuple[nn.Module, ...], sharded: bool, last: bool) -> Iterator[None]:
    """One micro-batch's forward and backward: gradients synchronised across processes on the step's last
    micro-batch only (DDP: accelerate's ``accumulate`` and ``no_sync``; FSDP2: its reduce-scatter switched)."""
    if sharded:
        set_gradient_sync(modules, last)
        yield
        return
    with accelerator.accumulate(*modules):
        yield


def train_loop(run: RunConfig, optim: OptimConfig, accelerator, state: TrainingState, batches: Iterator,
               phases: list[Phase], *, desc: str, checkpoint: Callable[[], None],
               sample: Optional[Callable[[int], None]] = None, plot_keys: Optional[list[str]] = None) -> LossLog:
    """Train ``state`` from its step to ``run.steps``; returns the loss log (every process keeps the same rows,
    means over all processes; only the main process writes ``loss.csv`` / ``loss.png``).

    Each step draws ``grad_accum`` micro-batches, runs every active phase over them, updates the EMAs, logs the
    mean of each logged value since the last row with the throughput (:mod:`pipelines.core.telemetry`), and
    checkpoints every ``checkpoint_every`` steps and at the end. A step whose loss or gradient is not finite is
    skipped and counted; ``max_bad_steps`` in a row stop the run at the next row with the last checkpoint intact.
    A step reads nothing back from the device until its row (:mod:`pipelines.core.on_device`).
    """
    out = Path(run.out_dir)
    losses = LossLog(out / "loss.csv", resume_step=state.step, write=accelerator.is_main_process)
    timer, log, resumed_at_end = Timer(state), StepLog(accelerator.device, state.bad_in_a_row), state.step >= run.steps
    meter = Meter(accelerator, run, state.step, timer.seconds())
    bar = tqdm(total=run.steps, initial=state.step, desc=desc, disable=not accelerator.is_main_process)
    while state.step < run.steps:
        generator = seed_step(run.seed, accelerator.process_index, state.step, accelerator.device)
        micro = [next(batches) for _ in range(run.grad_accum)]
        lrs, taken = {}, torch.ones((), dtype=torch.bool, device=accelerator.device)
        with meter.counting():  # the first step's FLOPs
            for phase in phases:
                if phase.active(state.step):
                    lrs[f"lr_{phase.name}"] = set_lr(phase.optimizer, state.step, run.steps, optim, phase.lr)
                    taken = _run_phase(phase, micro, accelerator, generator, optim, log) & taken
        log.add_step(taken)  # the same on every process (reduced)
        for name, ema in state.emas.items():  # a skipped step changes no weight
            ema.update(state.modules[name], taken)
        state.step += 1
        bar.update(1)
        if state.step % run.log_every == 0 or state.step == run.steps:
            means, skipped, state.bad_in_a_row, worst = log.read(accelerator)  # the step's one host wait
            state.skipped_steps += skipped
            if worst >= run.max_bad_steps:
                raise UserError(f"{worst} steps in a row with a non-finite loss or gradient up to step {state.step}: "
                                f"stopped (lower optim.lr or use mixed_precision=no); the last checkpoint in "
                                f"{out / 'checkpoints'} is intact")
            row = means | lrs | {"skipped_steps": state.skipped_steps} | meter.row(state.step, timer.seconds())
            losses.append(state.step, **row)
            accelerator.log(row, step=state.step)
            bar.set_postfix({k: f"{v:.4f}" for k, v in list(row.items())[:2]})
        periodic = bool(run.sample_every) and state.step % run.sample_every == 0
        if state.step % run.checkpoint_every == 0 or state.step == run.steps or periodic:
            timer.pause()
            if state.step % run.checkpoint_every == 0 or state.step == run.steps:
                checkpoint()
            if sample is not None and (periodic or state.step == run.steps):
                sample(state.step)
            timer.resume()
    if resumed_at_end and sample is not None:  # killed after the last checkpoint, before its samples
        sample(state.step)
    bar.close()
    timer.pause()
    if accelerator.is_main_process and losses.rows:
        losses.plot(out / "loss.png", plot_keys, desc)
    return losses


def finish_run(accelerator) -> None:
    """Wait for every process, close the trackers, tear down the process group."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


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

    def seconds(self) -> float:
        """Training seconds so far (the timer running)."""
        return self.state.seconds + time.perf_counter() - self.start
