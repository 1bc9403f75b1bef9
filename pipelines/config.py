"""Typed run configuration: dataclass schemas in code, YAML and ``dotted.key=value`` only override them.

STYLE rule 6: unknown keys and wrong types are errors that name the key. :func:`load_config` merges
``schema <- YAML file <- command-line overrides`` with OmegaConf's structured mode and turns any OmegaConf
error (or a ``ValueError`` raised by a schema's ``__post_init__``) into a one-line :class:`ConfigError`, which
the scripts turn into exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem the user must fix (unknown key, wrong type, bad value)."""


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


def load_config(schema: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Build a ``schema`` instance from defaults, an optional YAML file and ``key=value`` overrides.

    Raises:
        ConfigError: the file is missing or unparsable, a key is unknown, a value has the wrong type,
            or the schema's own validation rejects a value. The message names the key.
    """
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
    from pipelines.checkpoint import atomic_write_text

    path = Path(directory) / name
    atomic_write_text(path, config_to_yaml(config))
    return path


def describe_schema(schema: type, prefix: str = "") -> list[str]:
    """Lines ``key = default  (type)`` for every leaf of a dataclass schema, for ``--help``."""
    lines = []
    for field in dataclasses.fields(schema):
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(field.type) or (
            isinstance(field.type, str) and field.default_factory is not dataclasses.MISSING
            and dataclasses.is_dataclass(field.default_factory())
        ):
            sub = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.type
            lines += describe_schema(type(sub), prefix=f"{key}.")
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = "???"
        lines.append(f"  {key} = {json.dumps(default) if not isinstance(default, str) else default}")
    return lines
