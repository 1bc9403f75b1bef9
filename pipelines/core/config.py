"""Typed run configuration: dataclass schemas in code, YAML and ``dotted.key=value`` only override them.

Unknown keys and wrong types are errors that name the key. :func:`load_config` merges
``schema <- YAML file <- command-line overrides`` with OmegaConf's structured mode and turns any OmegaConf
error (or a ``ValueError`` raised by a schema's ``__post_init__``) into a one-line :class:`ConfigError`, which
the scripts turn into exit code 2.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import io
import json
import os
import re
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipelines.core.files import atomic_write_text

T = TypeVar("T")


class UserError(Exception):
    """Bad input the user must fix (a missing file, an unusable folder, a value that cannot work): the scripts
    print its one line and exit with code 2. Real bugs raise anything else and keep their traceback."""


class ConfigError(UserError, ValueError):
    """A configuration problem the user must fix (unknown key, wrong type, bad value); names the key."""


Device = Literal["auto", "cpu", "cuda"]
MixedPrecision = Literal["no", "fp16", "bf16"]
VaeDtype = Literal["auto", "fp32", "bf16", "fp16"]  # auto: bf16 on a GPU that has it, else fp32


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then a constant or cosine learning rate."""

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # Adam's (β1, β2)
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps
    decay: Literal["constant", "cosine"] = "constant"  # after warm-up
    min_lr_ratio: float = 0.1  # cosine: the final lr as a fraction of lr
    max_grad_norm: float = 1.0  # clip the global gradient norm (0: no clipping)

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        _at_least("warmup_steps", self.warmup_steps, 0)
        _at_least("max_grad_norm", self.max_grad_norm, 0)


@dataclass
class RunConfig:
    """The training loop both trainers share: length, batch, precision, checkpoints, logging, processes."""

    out_dir: str = "outputs/run"
    steps: int = 1000  # optimiser steps
    batch_size: int = 8  # per process and micro-batch; global batch = batch_size × processes × grad_accum
    grad_accum: int = 1  # micro-batches per optimiser step
    mixed_precision: MixedPrecision = "no"  # autocast (bf16 is for GPUs: CPUs here lack bf16 units); sample sheets
    # during training are drawn under it too on a GPU
    seed: int = 0
    checkpoint_every: int = 500  # steps between full training-state checkpoints (and the last step)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 10  # steps between loss-log rows
    sample_every: int = 0  # steps between sample sheets (0: only at the end)
    num_workers: int = 0  # data-loader worker processes
    resume: bool = True  # continue from out_dir/checkpoints when it has one
    device: Device = "auto"  # auto: CUDA when present (accelerate places each process), else the CPU
    ema_decay: float = 0.999  # 0 disables the EMA
    report_to: Literal["none", "tensorboard", "wandb", "all"] = "none"  # accelerate trackers, beside loss.csv/png
    max_bad_steps: int = 10  # consecutive steps with a non-finite loss or gradient (each one skipped) that stop the
    # run, at the next loss-log row
    sharding: Literal["none", "fsdp2"] = "none"  # none: data parallel (DDP), every process holds the whole model;
    # fsdp2: weights, gradients, AdamW moments and EMA sharded over the processes block by block (FSDP2, gradients
    # reduced in fp32), sharded checkpoints (torch.distributed.checkpoint) plus full safetensors weights; the
    # diffusion trainer only, with mixed_precision no or bf16 (docs/sharded-training.md)
    compile: bool = False  # torch.compile the U-Net (the first steps compile it; the same weights and checkpoints)
    deterministic: bool = False  # PyTorch's deterministic algorithms: a CUDA run repeats bit for bit (slower; an op
    # without a deterministic kernel stops the run naming itself); CPU runs repeat without it

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "keep_checkpoints",
                     "max_bad_steps"):
            _at_least(name, getattr(self, name), 1)
        _at_least("sample_every", self.sample_every, 0)
        if self.checkpoint_every % self.log_every:  # a loss row never spans a resume
            raise ValueError(f"checkpoint_every must be a multiple of log_every, got {self.checkpoint_every} and "
                             f"{self.log_every}")
        _at_least("num_workers", self.num_workers, 0)
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.sharding == "fsdp2" and self.mixed_precision == "fp16":
            raise ValueError("sharding=fsdp2 runs with mixed_precision no or bf16 (fp16 would need a sharded loss "
                             "scaler), got fp16")


def _at_least(name: str, value: float, low: float) -> None:
    """``ValueError`` naming the key unless ``value >= low``."""
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")


def _positive(name: str, value: float) -> None:
    """``ValueError`` naming the key unless ``value > 0``."""
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _one_line(error: BaseException) -> str:
    """OmegaConf errors span several lines (``full_key: ...``); keep the message and the key."""
    message = str(error).strip().splitlines()
    first = message[0] if message else type(error).__name__
    key = getattr(error, "full_key", None)
    if key and key not in first:
        first = f"{key}: {first}"
    return first


def check_choice(name: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    """Raise ``ValueError`` naming the config key when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def load_config(schema: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                fixed: tuple[str, ...] = ()) -> T:
    """Build a ``schema`` instance from defaults, an optional YAML file and ``key=value`` overrides.

    Raises:
        ConfigError: the file is missing or unparsable, a key is unknown, a value has the wrong type,
            the schema's own validation rejects a value, or a key in ``fixed`` (set by the program itself,
            e.g. the demo's paths between stages) is given. The message names the key.
    """
    for item in overrides or []:
        key = item.split("=", 1)[0]
        if any(key == f or key.startswith(f + ".") for f in fixed):
            raise ConfigError(f"{key}: set by the program itself; it cannot be overridden")
    try:
        merged = OmegaConf.structured(schema)
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error)) from None
    except (ValueError, TypeError) as error:
        raise ConfigError(_one_line(error)) from None


def config_to_dict(config: Any) -> dict:
    """A plain, JSON-serialisable dict of a dataclass config."""
    return dataclasses.asdict(config)


def config_to_yaml(config: Any) -> str:
    """The resolved config as YAML (written next to every run's outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_resolved_config(config: Any, directory: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config beside a run's outputs (atomically) and return its path."""
    path = Path(directory) / name
    atomic_write_text(path, config_to_yaml(config))
    return path


def describe_schema(schema: type, prefix: str = "", hidden: tuple[str, ...] = ()) -> list[str]:
    """``--help`` lines for every leaf key of a dataclass schema: ``key: type = default`` (choices of ``Literal``
    and ``Enum`` fields in braces) and the field's comment from the source, under a heading per section."""
    lines = []
    hints = typing.get_type_hints(schema)
    comments = field_comments(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if key in hidden:
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            doc = (inspect.getdoc(kind) or "").split("\n\n")[0].replace("\n", " ")
            lines.append(f"\n [{key}] {doc}".rstrip())
            lines += describe_schema(kind, prefix=f"{key}.", hidden=hidden)
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "???")
        line = f"  {key}: {type_name(kind)} = {_show(default)}"
        lines.append(line + (f"  # {comments[f.name]}" if f.name in comments else ""))
    return lines


def type_name(kind: Any) -> str:
    """A readable type: ``int``, ``list[int]``, ``{a, b}`` for choices, ``... or null`` for optionals."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return "{" + ", ".join(str(a) for a in args) + "}"
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return "{" + ", ".join(str(m.value) for m in kind) + "}"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        named = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(named) + (" or null" if type(None) in args else "")
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(kind, "__name__", str(kind))


def _show(value: Any) -> str:
    """A default as a user would type it."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "null"
    return value if isinstance(value, str) and value else json.dumps(value)


@functools.cache
def field_comments(schema: type) -> dict[str, str]:
    """The ``# comment`` after each field of a dataclass in its source, with comment-only lines right below a
    field joined to it: the best documentation of a key, shown by ``--help``."""
    try:
        source = inspect.getsource(schema)
    except (OSError, TypeError):
        return {}
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    names, result, current = {f.name for f in dataclasses.fields(schema)}, {}, None
    for number, line in enumerate(source.splitlines(), start=1):
        match = re.match(r"\s+(\w+)\s*:", line)
        if match and match.group(1) in names:
            current = match.group(1)
            if number in comments:
                result[current] = comments[number]
        elif current and line.strip().startswith("#") and current in result:
            result[current] += " " + comments.get(number, "")
        else:
            current = None
    return result
