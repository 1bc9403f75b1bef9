"""Video analysers: plug-ins of the evaluation command that read whole generated videos and add their own block to
``metrics.json`` and ``metrics.md`` (the demo world's analyser is one).

An analyser is a class built without arguments that has the shape of :class:`Analyser`. A package registers it
under a short name in the ``latent_video_diffusion.analysers`` entry-point group of its metadata, as this one does
in ``pyproject.toml``::

    [project.entry-points."latent_video_diffusion.analysers"]
    world = "pipelines.world.analyser:WorldAnalyser"

and ``metrics.analysers`` lists the names to run. This project's own analysers (:data:`BUILT_IN`) are found even
where its metadata is not installed (a checkout used before ``pip install -e .``); an installed name wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Protocol

import numpy as np

from pipelines.core.config import ConfigError

GROUP = "latent_video_diffusion.analysers"
BUILT_IN = {"world": "pipelines.world.analyser:WorldAnalyser"}  # as pyproject.toml registers them


class Analyser(Protocol):
    """What the evaluation command asks of an analyser."""

    def add(self, path: Path, frames: np.ndarray, record: dict) -> None:
        """Read one generated video: its file, all its frames ``uint8 [f, H, W, 3]``, and what its generation
        recorded (``{"prompt": str, "boundaries": [first frame of each new chunk]}``; ``{}`` for a video no
        ``generation_*.json`` lists)."""

    def summary(self) -> dict:
        """The analyser's figures over every video added (JSON-ready: no NaN, no infinity)."""

    def markdown(self, summary: dict) -> list[str]:
        """Lines of ``metrics.md`` that show ``summary``."""


def installed() -> dict[str, metadata.EntryPoint]:
    """Every analyser that can be named: the entry points of :data:`GROUP` over :data:`BUILT_IN`."""
    found = {name: metadata.EntryPoint(name, target, GROUP) for name, target in BUILT_IN.items()}
    return found | {point.name: point for point in metadata.entry_points(group=GROUP)}


def build_analysers(names: Sequence[str]) -> dict[str, Analyser]:
    """A fresh analyser for each of ``names``, in order.

    Raises:
        ConfigError: a name no installed analyser has (the message lists those that are).
    """
    available = installed()
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ConfigError(f"metrics.analysers: no analyser named {', '.join(map(repr, unknown))}; installed: "
                          f"{', '.join(sorted(available))}")
    return {name: available[name].load()() for name in names}
