"""Tiny configurations and a shared on-disk world for the pipeline tests (not a test module)."""

from __future__ import annotations

import csv
from pathlib import Path

from pipelines.core.telemetry import TELEMETRY_KEYS
from pipelines.world.config import WorldSpec
from pipelines.world.synthetic import make_world
from tests.videos import ffmpeg_clip, garbage_file, truncated_copy

BROKEN = ("garbage.mp4", "truncated.mp4", "short.mp4")


def make_test_videos(root: Path, num_world: int = 12) -> Path:
    """A folder of real video files: world clips with captions, an ffmpeg test-source clip, and three broken
    files (random bytes, a cut-short download, a clip too short for 8 frames)."""
    make_world(root, num_world, WorldSpec(size=32, num_frames=12), seed=0, split="videos")
    folder = root / "videos"
    ffmpeg_clip(folder / "testsrc.mp4", "testsrc2", frames=12, size=(40, 48))
    garbage_file(folder / "garbage.mp4")
    truncated_copy(folder / "00000.mp4", folder / "truncated.mp4", fraction=0.3)
    ffmpeg_clip(folder / "short.mp4", "mandelbrot", frames=4, size=(32, 32))
    return folder


def autoencoder_overrides(videos: Path, out: Path, steps: int = 4) -> list[str]:
    """A ~10k-parameter VAE (factor 4) trained for a few steps on 32×32 frames."""
    return [
        f"data.roots=[{videos}]", "data.size=32", "data.frames_per_video=2", "data.eval_fraction=0.2",
        "model.base_channels=8", "model.channel_mult=[1,2,2]", "model.num_res_blocks=1", "model.norm_groups=4",
        "loss.perceptual=none", "loss.disc_start=2", f"run.steps={steps}", "run.batch_size=4",
        "run.checkpoint_every=2", "run.log_every=1", f"run.out_dir={out}", "eval_frames=8", "scale_frames=8",
        "optim.lr=1e-3",
    ]


def encode_overrides(autoencoder: Path, videos: Path, out: Path) -> list[str]:
    """8-frame clips of 32×32 video, 4 videos per shard."""
    return [f"autoencoder={autoencoder}", f"videos=[{videos}]", f"out_dir={out}", "clip.size=32",
            "clip.num_frames=8", "videos_per_shard=4", "batch_size=3"]


def diffusion_overrides(latents: Path, out: Path, steps: int = 4) -> list[str]:
    """A tiny text-conditioned U-Net trained on 6-frame windows plus 2 appended images."""
    return [
        f"data.latents={latents}", f"run.out_dir={out}", f"run.steps={steps}", "run.batch_size=3",
        "run.checkpoint_every=2", "run.log_every=1", "run.ema_decay=0.9", "model.unet.base_channels=8",
        "model.unet.channel_mult=[1,2]",
        "model.unet.attention_levels=[1]", "model.unet.head_dim=8", "model.unet.norm_groups=4",
        "model.unet.num_res_blocks=1", "text.width=16", "text.layers=1", "text.heads=2", "text.vocab_size=512",
        "data.num_frames=6", "data.images_per_video=2", "optim.warmup_steps=1", "sampling.steps=2",
        "sample_prompts=[a red circle moving left]",
    ]


def logged_losses(out: Path) -> list[dict[str, str]]:
    """A run's ``loss.csv`` rows without the timing columns (samples/s, TFLOP/s, MFU), which no two runs share."""
    with (out / "loss.csv").open() as handle:
        return [{k: v for k, v in row.items() if k not in TELEMETRY_KEYS} for row in csv.DictReader(handle)]
