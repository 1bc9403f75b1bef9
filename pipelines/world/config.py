"""The synthetic world's spec, importable without torch."""

from __future__ import annotations

from dataclasses import dataclass

MIN_RUN_FRAMES = 3


@dataclass
class WorldSpec:
    """Size of the world's clips: ``size x size`` pixels, ``num_frames`` frames at ``fps``; the shape spans
    ``shape_size * size`` pixels and moves ``min_speed``..``max_speed`` pixels per frame."""

    size: int = 32  # frame side (pixels)
    num_frames: int = 16  # frames per clip
    shape_size: float = 0.3  # the shape's extent as a fraction of the frame
    min_speed: float = 1.0  # pixels per frame
    max_speed: float = 2.0  # pixels per frame
    fps: float = 8.0
    min_run_frames: int = MIN_RUN_FRAMES  # frames of travel before the first bounce (as far as the frame allows)
    centre_start_fraction: float = 0.0  # this fraction of clips starts at the centre of the frame
