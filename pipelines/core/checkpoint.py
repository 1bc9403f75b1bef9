"""Atomic files and full training-state checkpoints in safetensors.

A run killed at any instant leaves either the previous checkpoint or the new one, never half of one: every
file is written to a temporary name and renamed, and a checkpoint directory is assembled under a temporary
name and renamed into place before ``latest`` is pointed at it. Nothing is pickled: weights,
optimizer moments and RNG states are tensors in safetensors; the rest is JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipelines.core.files import (
    atomic_write_json,
    atomic_write_text,
    atomic_write_with,
    fsync_directory,
    remove_stale_temporaries,
)

LATEST = "latest"


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """Save a flat dict of tensors as safetensors, atomically and durably (contiguous CPU copies)."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_with(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tensors, scalars) into flat tensors and a JSON skeleton.

    Tensors are replaced in the skeleton by ``{"__tensor__": key}``; everything else must be JSON-able.
    Used for optimizer and scheduler states, which are otherwise only picklable.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[key] = node
            return {"__tensor__": key}
        if isinstance(node, Mapping):
            return {"__dict__": [[k, walk(v, f"{key}.{k}")] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(node)]
        return node

    return tensors, walk(state, prefix or "s")


def unflatten_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def save_state_file(state: Any, directory: Path, name: str) -> None:
    """Save any nested state as ``name.safetensors`` + ``name.json``."""
    tensors, skeleton = flatten_state(state, name)
    save_tensors(tensors, directory / f"{name}.safetensors")
    atomic_write_json(directory / f"{name}.json", skeleton)


def load_state_file(directory: Path, name: str) -> Any:
    """Load what :func:`save_state_file` wrote."""
    tensors = load_file(directory / f"{name}.safetensors")
    return unflatten_state(json.loads((directory / f"{name}.json").read_text()), tensors)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, as tensors and JSON-able values."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].astype(np.int64).tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.asarray(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    modules: Mapping[str, Mapping[str, torch.Tensor]],
    states: Mapping[str, Any],
    info: Mapping[str, Any],
    keep: int = 2,
    json_files: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``root/step_XXXXXXX`` atomically and point ``root/latest`` at it.

    Args:
        modules: name → flat state dict (model weights, EMA weights): ``name.safetensors``.
        states: name → nested state (optimizer, scheduler, RNG, data position): safetensors + JSON skeleton.
        info: JSON metadata (step, config, loss history position...), written as ``trainer_state.json``.
        keep: how many checkpoints to keep (older ones are removed after the new one is in place).
        json_files: file name → JSON object, written beside the weights (e.g. a model's ``config.json``, so a
            checkpoint directory is itself a loadable model).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        write_checkpoint_files(tmp, step, modules, states, info, json_files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_checkpoint(root, tmp, final, keep)


def write_checkpoint_files(directory: Path, step: int, modules: Mapping[str, Mapping[str, torch.Tensor]],
                           states: Mapping[str, Any], info: Mapping[str, Any],
                           json_files: Mapping[str, Any] | None = None) -> None:
    """Write a checkpoint's files into ``directory`` (a temporary one): ``name.safetensors`` per module, a
    safetensors + JSON pair per nested state, the ``json_files``, then ``trainer_state.json`` (its presence
    marks a complete checkpoint), and make them durable."""
    for name, tensors in modules.items():
        save_tensors(tensors, directory / f"{name}.safetensors")
    for name, state in states.items():
        save_state_file(state, directory, name)
    for name, obj in (json_files or {}).items():
        atomic_write_json(directory / name, obj)
    atomic_write_json(directory / "trainer_state.json", {"step": step, **info})
    fsync_directory(directory)


def commit_checkpoint(root: Path, tmp: Path, final: Path, keep: int) -> Path:
    """Rename the complete temporary checkpoint ``tmp`` to ``final``, point ``root/latest`` at it and prune
    (:func:`_prune`); a kill at any instant leaves ``latest`` on the previous checkpoint or on this one."""
    try:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_directory(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, final.name + "\n")
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints and what killed runs left: temporary checkpoint
    directories and half-written ``latest`` pointers."""
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    remove_stale_temporaries(root, LATEST)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``root/latest`` points at, or the newest complete one, or ``None``."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "trainer_state.json").is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if (p / "trainer_state.json").is_file())
    return complete[-1] if complete else None


def read_trainer_state(directory: str | os.PathLike) -> dict:
    """A checkpoint's ``trainer_state.json`` (step, config, and what its trainer recorded)."""
    return json.loads((Path(directory) / "trainer_state.json").read_text())


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, dict], dict[str, Any], dict]:
    """Read a checkpoint: (modules name → state dict, states name → nested state, trainer_state info)."""
    directory = Path(directory)
    info = read_trainer_state(directory)
    modules, states = {}, {}
    for file in directory.glob("*.safetensors"):
        if (directory / f"{file.stem}.json").is_file():
            states[file.stem] = load_state_file(directory, file.stem)
        else:
            modules[file.stem] = load_file(file)
    return modules, states, info
