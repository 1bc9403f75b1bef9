"""The frames a user brings to ``generate`` (``condition.*``): read with the project's video IO, at the model's
frame rate where the task keeps time (continuing), resized and cropped to the model's frames (or, enlarging, to
``1 / condition.scale`` of them). Every input is read and checked before anything is written, so a bad one stops
the command with one line naming the file or the key (exit 2) and nothing half-written in ``out_dir``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from torch import Tensor

from pipelines.core.config import UserError
from pipelines.media.config import ClipSpec
from pipelines.media.datasets import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, frame_stride, resize_crop, scan_media
from pipelines.media.video_io import MediaReadError, read_frames, read_image, video_info
from pipelines.stages.configs import ConditionConfig


@dataclass
class GivenFrames:
    """One input's frames: ``video [3, g, H, W]`` in [−1, 1] (the model's size, or ``1 / scale`` of it to enlarge)."""

    source: Path
    video: Tensor

    @property
    def count(self) -> int:
        return self.video.shape[1]


def _files(path: str, key: str, extensions: tuple[str, ...]) -> list[Path]:
    """The file ``path``, or the sorted media files of the folder ``path`` (one line naming ``key`` when none)."""
    where = Path(path)
    if where.is_file():
        return [where]
    if not where.is_dir():
        raise UserError(f"{key}={path}: no such file or folder")
    files = scan_media(where, extensions)
    if not files:
        raise UserError(f"{key}={path}: no {'image' if extensions == IMAGE_EXTENSIONS else 'video'} files "
                        f"({', '.join(extensions)})")
    return files


def _default_count(condition: ConditionConfig, available: int, num_frames: int) -> int:
    """How many frames of a video are given when ``condition.count`` is not set: all that leave room for at least
    one new frame (continuing), or all that fit ``num_frames`` (filling in: as keyframes; enlarging)."""
    if condition.task == "continue":
        return min(available, num_frames - 1)
    if condition.task == "interpolate":
        return min(available, (num_frames - 1) // condition.every + 1)
    return min(available, num_frames)


def _video_indices(path: Path, condition: ConditionConfig, spec: ClipSpec, num_frames: int) -> np.ndarray:
    """Which frames of the video ``path`` are given: at the model's frame rate (continuing) or every frame
    (filling in, enlarging), the last or first ``count`` of them."""
    info = video_info(path)
    stride = frame_stride(spec, info.fps) if condition.task == "continue" else 1
    every = np.arange(0, info.num_frames, stride)
    count = condition.count or _default_count(condition, len(every), num_frames)
    rate = f" at the model's frame rate (every {stride} frames)" if stride > 1 else ""
    if count > len(every) or count < 1:
        raise UserError(f"condition.count={count}: {path} has {len(every)} frames{rate}")
    if condition.task == "interpolate" and count < 2:
        raise UserError(f"condition.task=interpolate: {path} gives {count} frame; filling in needs 2 or more")
    return every[-count:] if condition.task == "continue" and condition.frames == "last" else every[:count]


def low_resolution(size: tuple[int, int], scale: int) -> tuple[int, int]:
    """The given frames' size when enlarging ``scale`` times to the model's ``size`` (one line when it cannot be
    reached)."""
    if size[0] % scale or size[1] % scale:
        raise UserError(f"condition.scale={scale}: the model's {size[0]}×{size[1]} frames are not {scale} times a "
                        f"whole number of pixels")
    return size[0] // scale, size[1] // scale


def _resized(frames: np.ndarray, path: Path, size: tuple[int, int], upscale: bool) -> Tensor:
    """``uint8 [n, H', W', 3]`` → ``[3, n, h, w]`` covering ``size``; enlarging refuses an input smaller than the
    low-resolution size (there is nothing to enlarge it from)."""
    if upscale and (frames.shape[1] < size[0] or frames.shape[2] < size[1]):
        raise UserError(f"condition.scale: {path} is {frames.shape[1]}×{frames.shape[2]}, smaller than the "
                        f"{size[0]}×{size[1]} the model's frames divided by condition.scale give; lower "
                        f"condition.scale")
    return resize_crop(frames, size).movedim(0, 1)


def read_given(condition: ConditionConfig, frame_size: tuple[int, int], spec: Optional[ClipSpec],
               num_frames: int) -> list[GivenFrames]:
    """Every input of ``condition``, read and resized (``frame_size``: the model's frames ``(H, W)``; ``spec``:
    its training clips' frame rate, None for every frame)."""
    spec = spec or ClipSpec()
    if condition.image is not None:
        files, key = _files(condition.image, "condition.image", IMAGE_EXTENSIONS), "condition.image"
    else:
        files, key = _files(condition.video, "condition.video", VIDEO_EXTENSIONS), "condition.video"
    upscale = condition.image is None and condition.task == "upscale"
    size = low_resolution(frame_size, condition.scale) if upscale else frame_size
    given = []
    for path in files:
        try:
            if condition.image is not None:
                frames = read_image(path)[None]
            else:
                frames = read_frames(path, _video_indices(path, condition, spec, num_frames))
        except MediaReadError as error:
            raise UserError(f"{key}: {path}: {error.reason}" + (f" ({error.detail})" if error.detail else "")) \
                from None
        given.append(GivenFrames(path, _resized(frames, path, size, upscale)))
    return given
