"""Sharded data parallelism for ``run.sharding=fsdp2``: FSDP2 (``torch.distributed.fsdp.fully_shard``) and its
checkpoints through ``torch.distributed.checkpoint`` (DCP). The design is ``docs/sharded-training.md``.

* **What is sharded:** the trained modules, block by block (each block one unit: it is gathered just before its
  forward and backward and freed after), then the module itself as the root unit for what lies outside the
  blocks. Weights, gradients, AdamW moments and the EMA (:class:`diffusion.EMA` keeps DTensor shadows with the
  weights' placements, in float32) are split over the processes; gradients are reduce-scattered in float32
  whatever the compute dtype.
* **Where:** accelerate still makes the process group (NCCL on GPUs, gloo on CPUs), the device and the trackers;
  this module builds the device mesh on the run's device (gloo needs a CPU mesh, even on a GPU machine) and, for
  a single process, a one-member group of its own (FSDP2 and DCP need one).
* **Checkpoints:** all processes write their shards of weights, EMA and optimiser into the checkpoint's
  ``sharded/`` folder (DCP), then process 0 writes the full weights gathered from all (``unet.safetensors``,
  ``ema_unet.safetensors``, ...) and ``trainer_state.json`` beside it, in the layout of an unsharded checkpoint,
  so ``load_diffusion`` and ``generate.py`` read it unchanged. The folder is assembled under a temporary name and
  renamed into place as :mod:`pipelines.core.checkpoint` does it. DCP reshards on load: a checkpoint written by N
  processes resumes on M.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from pipelines.core.checkpoint import commit_checkpoint, write_checkpoint_files

SHARDED_FOLDER = "sharded"  # the DCP checkpoint inside a checkpoint directory
COMPUTE_DTYPES = {"no": None, "bf16": torch.bfloat16}  # run.mixed_precision -> FSDP2's param_dtype (None: fp32)


@dataclass
class Sharding:
    """Where and how modules are sharded: the device mesh over all processes and the mixed-precision policy."""

    mesh: DeviceMesh
    policy: MixedPrecisionPolicy
    owns_group: bool  # a one-process run: the process group was made here, and :meth:`close` ends it

    def shard(self, module: nn.Module, blocks: Iterable[nn.Module]) -> nn.Module:
        """Make each of ``blocks`` (submodules of ``module``) a unit of its own, then ``module`` the unit of the
        rest (in place; parameters become DTensors, so optimisers are made afterwards). FSDP2 shards contiguous
        tensors only: channels-last weights are made contiguous first (channels-last activations still select the
        channels-last convolution kernels)."""
        with torch.no_grad():
            for param in module.parameters():
                param.data = param.data.contiguous()
        for block in blocks:
            fully_shard(block, mesh=self.mesh, mp_policy=self.policy)
        fully_shard(module, mesh=self.mesh, mp_policy=self.policy)
        return module

    def close(self) -> None:
        """End the one-process group made by :func:`start_sharding` (a group accelerate made is its own)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def start_sharding(device: torch.device, mixed_precision: str) -> Sharding:
    """The mesh of all processes on ``device``'s type, and FSDP2's policy for ``mixed_precision``: weights
    gathered and computed in bf16 under ``bf16`` (fp32 under ``no``), gradients reduced in fp32 always.

    Raises:
        ValueError: a precision FSDP2 is not run with here (fp16 would need a sharded gradient scaler).
    """
    if mixed_precision not in COMPUTE_DTYPES:
        raise ValueError(f"run.sharding=fsdp2 runs with run.mixed_precision no or bf16, got {mixed_precision}")
    owns = not dist.is_initialized()
    if owns:  # one process: accelerate made no group, FSDP2 and DCP want one
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=COMPUTE_DTYPES[mixed_precision], reduce_dtype=torch.float32)
    return Sharding(mesh, policy, owns)


def is_sharded(modules: Iterable[nn.Module]) -> bool:
    """Whether any of ``modules`` holds an FSDP2 unit."""
    return any(isinstance(m, FSDPModule) for module in modules for m in module.modules())


def set_gradient_sync(modules: Iterable[nn.Module], enabled: bool) -> None:
    """Reduce-scatter gradients at the end of the next backward (``True``), or let them accumulate unsharded in
    each process (``False``: the micro-batches before the last of an optimiser step)."""
    for module in modules:
        for unit in module.modules():
            if isinstance(unit, FSDPModule):
                unit.set_requires_gradient_sync(enabled, recurse=False)


def full_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Whole CPU copies of (possibly sharded) tensors on process 0, ``{}`` on the others; every process must call
    it (each DTensor is all-gathered, one at a time, so no process holds more than one whole tensor extra)."""
    main, whole = dist.get_rank() == 0, {}
    for key, value in tensors.items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if main:
            whole[key] = full.detach().cpu()
    return whole


def full_weights(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s whole state dict (the keys of the unsharded module) on process 0, ``{}`` elsewhere; every
    process must call it."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _dcp_state(modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
               emas: Mapping[str, Any]) -> dict[str, Any]:
    """The training state as DCP saves and loads it: each module's weights, each EMA's shadows, each optimiser's
    state keyed by parameter name (``unet.conv_in.weight``...), sharded tensors as DTensors (resharded on load),
    the rest replicated. Loading fills these very tensors."""
    owner = nn.ModuleDict(dict(modules))  # names every parameter an optimiser holds
    state: dict[str, Any] = {name: get_model_state_dict(module) for name, module in modules.items()}
    state |= {f"ema_{name}": ema.state_dict() for name, ema in emas.items()}
    state |= {f"optimizer_{name}": get_optimizer_state_dict(owner, opt) for name, opt in optimizers.items()}
    return state


def save_sharded_checkpoint(root: Path, step: int, modules: Mapping[str, nn.Module],
                            optimizers: Mapping[str, torch.optim.Optimizer], emas: Mapping[str, Any],
                            info: Mapping[str, Any], keep: int,
                            json_files: Optional[Mapping[str, Any]] = None) -> Optional[Path]:
    """Write ``root/step_XXXXXXX`` (every process calls this): the DCP checkpoint in ``sharded/``, the gathered
    full weights and EMA as safetensors and ``trainer_state.json`` (process 0), assembled in a temporary folder
    and renamed into place; returns the checkpoint on process 0, ``None`` on the others."""
    main, final = dist.get_rank() == 0, Path(root) / f"step_{step:07d}"
    tmp = final.parent / f".{final.name}.sharded"  # one name all processes know; a killed run's is pruned
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    with warnings.catch_warnings():  # torch's own DCP writer asks a tensor for its deprecated TypedStorage
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        dcp.save(_dcp_state(modules, optimizers, emas), checkpoint_id=tmp / SHARDED_FOLDER)
    exports = {name: full_weights(module) for name, module in modules.items()}
    exports |= {f"ema_{name}": full_tensors(ema.state_dict()) for name, ema in emas.items()}
    if main:
        write_checkpoint_files(tmp, step, exports, {}, info, json_files)
        commit_checkpoint(final.parent, tmp, final, keep)
    dist.barrier()  # nobody reads, or writes the next one, before this checkpoint is in place
    return final if main else None


def load_sharded_checkpoint(directory: Path, modules: Mapping[str, nn.Module],
                            optimizers: Mapping[str, torch.optim.Optimizer], emas: Mapping[str, Any]) -> None:
    """Load what :func:`save_sharded_checkpoint` wrote into the live (sharded) modules, optimisers and EMAs, at
    any process count (every process calls this)."""
    state = _dcp_state(modules, optimizers, emas)
    dcp.load(state, checkpoint_id=Path(directory) / SHARDED_FOLDER)
    owner = nn.ModuleDict(dict(modules))
    for name, module in modules.items():
        set_model_state_dict(module, state[name])
    for name, optimizer in optimizers.items():
        set_optimizer_state_dict(owner, optimizer, state[f"optimizer_{name}"])


def read_sharded(directory: Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint's DCP folder, whole, by its flat key (``unet.conv_in.weight``,
    ``optimizer_main.state.unet.conv_in.weight.exp_avg``...): one process reads it without a process group, to
    inspect or compare a sharded checkpoint."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(Path(directory) / SHARDED_FOLDER))
    entries = reader.read_metadata().state_dict_metadata
    state = {key: torch.empty(entry.size, dtype=entry.properties.dtype) for key, entry in entries.items()
             if isinstance(entry, TensorStorageMetadata)}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state
