"""The demo's config, importable without torch: the world it builds and every stage's config, composed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from pipelines.evaluation.config import MetricsConfig
from pipelines.stages.configs import AutoencoderTrainConfig, DiffusionTrainConfig, EncodeConfig, GenerateConfig
from pipelines.world.config import WorldSpec

HELD_OUT = ("a red square moving left", "a red triangle moving down", "a green circle moving right",
            "a green triangle moving up", "a blue circle moving up", "a blue square moving down",
            "a yellow square moving right", "a yellow triangle moving left")  # each colour and direction twice


@dataclass
class WorldConfig:
    """The synthetic world the demo trains on."""

    videos: int = 480  # the autoencoder holds out a hashed tenth of them for its PSNR / SSIM
    spec: WorldSpec = field(default_factory=lambda: WorldSpec(min_speed=2.0, max_speed=3.0, min_run_frames=6))
    seed: int = 0
    held_out: list[str] = field(default_factory=lambda: list(HELD_OUT))  # captions no training video shows
    # (every colour, shape and direction is still seen); the report grades them apart


@dataclass
class GuidanceSweepConfig:
    """Classifier-free guidance weights the report compares, each on the same prompts and seeds: the world's
    held-out captions and as many training captions, ``samples`` chunks each (the generation's own sampler
    otherwise)."""

    weights: list[float] = field(default_factory=lambda: [0.0, 1.0, 3.0])  # w; the default one is added if absent
    seen_prompts: int = 8  # training captions beside the held-out ones
    samples: int = 1  # videos per prompt and weight (each from its own noise), pooled: one prompt of 16 then moves
    # a figure by 1 / (16 · samples)

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")


@dataclass
class LongVideoConfig:
    """A few long videos by autoregressive extension (the generation's method and sampler), graded chunk by
    chunk: does identity decay, do boundaries stay seamless?"""

    num_frames: int = 256  # 0: none
    prompts: int = 4  # the first prompts of generate.prompts


@dataclass
class DemoConfig:
    """``scripts/demo.py``: the world, then every stage's own config; the demo wires the paths between stages
    (``FIXED``), which ``--help`` leaves out and overrides may not set."""

    FIXED: ClassVar[tuple[str, ...]] = (
        "autoencoder.data.roots", "autoencoder.data.size", "autoencoder.run.out_dir", "encode.autoencoder",
        "encode.videos", "encode.out_dir", "encode.clip.size", "encode.clip.num_frames", "encode.clip.start",
        "diffusion.data.latents", "diffusion.data.autoencoder", "diffusion.data.videos", "diffusion.run.out_dir",
        "generate.model", "generate.autoencoder", "generate.method", "generate.out_dir", "generate.name",
        "generate.batch_size",
    )

    out_dir: str = "outputs/demo"  # everything the demo writes: work/ (stages), videos/, report.json / .md
    processes: int = 0  # data-parallel processes training the diffusion model, the batch split between them
    # (the same model: every sample's draws are keyed by its slot): 0 = two on a machine without CUDA that has
    # 2+ cores (single-threaded processes run a small model's many small operations faster), else one
    world: WorldConfig = field(default_factory=WorldConfig)
    autoencoder: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    diffusion: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)
    generate: GenerateConfig = field(default_factory=lambda: GenerateConfig(prompts=[
        "a red circle moving right", "a green square moving down", "a blue triangle moving left",
        "a yellow circle moving up"]))  # both methods run on the same prompts and seeds
    sweep: GuidanceSweepConfig = field(default_factory=GuidanceSweepConfig)
    long: LongVideoConfig = field(default_factory=LongVideoConfig)
    metrics: MetricsConfig = field(default_factory=lambda: MetricsConfig(pairwise=False))  # FVD / KVD of each
    # method's videos against the world's training videos, when metrics.i3d points at i3d_torchscript.pt
