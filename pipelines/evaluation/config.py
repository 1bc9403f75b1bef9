"""The evaluation command's config (``scripts/evaluate.py``), importable without torch so ``--help`` answers at once.

The comment after each field is its ``--help`` text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class MetricsConfig:
    """What is measured and how: FVD / KVD on StyleGAN-V's I3D, pairwise PSNR / SSIM / LPIPS, analysers."""

    i3d: Optional[str] = None  # StyleGAN-V's i3d_torchscript.pt (never downloaded; without it FVD / KVD are skipped)
    num_videos: int = 2048  # at most this many clips per side, the first usable files in sorted order (StyleGAN-V)
    frames_per_clip: int = 16  # frames per clip (StyleGAN-V's fvd2048_16f: 16)
    frame_stride: int = 1  # take every k-th frame (StyleGAN-V's subsample_factor; 8 gives fvd2048_128f_subsample8f)
    real_clip_start: Literal["random", "first"] = "random"  # real clips: a seeded random window (StyleGAN-V) or
    # the first frames; generated clips always start at frame 0 (as StyleGAN-V's generated-videos folder)
    resolution: Optional[int] = None  # resize frames to resolution² before the I3D (null: native size, as
    # StyleGAN-V; the I3D resizes to 224² itself)
    batch_size: int = 16  # clips per I3D call
    kvd_subsets: int = 100  # random subsets the KVD is averaged over (KID's protocol)
    kvd_subset_size: int = 1000  # clips per KVD subset (capped by the clips available)
    pairwise: bool = True  # PSNR / SSIM (and LPIPS when its weights are on disk) of files whose names pair up
    analysers: list[str] = field(default_factory=list)  # analysers of the whole generated videos, by name (world:
    # the demo world's: colour / shape / direction, chunk joins, against the prompt a generation_*.json records)

    def __post_init__(self) -> None:
        for name in ("num_videos", "frames_per_clip", "frame_stride", "batch_size", "kvd_subsets"):
            if getattr(self, name) < 1:
                raise ValueError(f"metrics.{name} must be at least 1, got {getattr(self, name)}")
        if self.kvd_subset_size < 2:
            raise ValueError(f"metrics.kvd_subset_size must be at least 2, got {self.kvd_subset_size}")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"metrics.resolution must be at least 1 or null, got {self.resolution}")
        if self.real_clip_start not in ("random", "first"):
            raise ValueError(f"metrics.real_clip_start must be 'random' or 'first', got {self.real_clip_start!r}")
        if len(set(self.analysers)) < len(self.analysers):
            raise ValueError(f"metrics.analysers names an analyser twice: {list(self.analysers)}")
        if self.i3d is not None and not str(self.i3d).strip():
            raise ValueError("metrics.i3d must be a path to i3d_torchscript.pt or null, got an empty string")


@dataclass
class EvaluateConfig:
    """``scripts/evaluate.py``: generated videos against real ones: FVD, KVD, PSNR, SSIM, LPIPS, analysers."""

    generated: str  # a folder of videos, or a scripts/generate.py output folder
    real: str  # a folder of real videos (pairwise metrics pair its files with the generated ones by name)
    out_dir: str = "outputs/evaluate"  # metrics.json, metrics.md and evaluate.yaml go here
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present, else the CPU
    seed: int = 0  # real clips' random windows and the KVD subsets

    def __post_init__(self) -> None:
        for name in ("generated", "real", "out_dir"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"{name} must be a folder, got an empty string")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be one of 'auto', 'cpu', 'cuda', got {self.device!r}")
