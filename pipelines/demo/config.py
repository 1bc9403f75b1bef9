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
VALIDATION = ("a red circle moving up", "a green square moving right", "a blue triangle moving down",
              "a yellow square moving left")  # each colour and direction once; none a generation prompt


@dataclass
class WorldConfig:
    """The synthetic world the demo trains on."""

    videos: int = 480  # the autoencoder holds out a hashed tenth of them for its PSNR / SSIM
    spec: WorldSpec = field(default_factory=lambda: WorldSpec(min_speed=2.0, max_speed=3.0, min_run_frames=6))
    seed: int = 0
    held_out: list[str] = field(default_factory=lambda: list(HELD_OUT))  # captions no training video shows
    # (every colour, shape and direction is still seen); the report grades them, and nothing is chosen on them
    validation: list[str] = field(default_factory=lambda: list(VALIDATION))  # captions no training video shows
    # either, for choosing generation settings (benchmarks/demo/*): the held-out captions only grade

    @property
    def unseen(self) -> list[str]:
        """Every caption no training video shows: held out and validation."""
        return [*self.held_out, *self.validation]


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
class ContinuationConfig:
    """Held-out world videos continued from their first frames (``generate``'s ``condition.video``), graded against
    what the world's motion rule really draws after them: the object kept (colour and shape of the *given* one,
    per chunk), its centroid's error in pixels by frame, and the joins."""

    videos: int = 8  # 0: none; one per held-out caption, in turn
    given_frames: int = 8  # frames of each video the model is given
    num_frames: int = 64  # frames of the continued video (and of the rendered truth)


@dataclass
class TargetsConfig:
    """What the report requires (each check says what it measured and, for a comparison, its 95 % bootstrap
    interval over prompts and seeds: a comparison inside the noise reads "within noise", not "met")."""

    autoencoder_psnr_db: float = 28.0  # at least, on held-out frames
    color_accuracy: float = 0.8  # at least, the generated videos
    direction_accuracy: float = 0.7  # at least, the generated videos (per chunk, bounces included)
    identity: float = 0.9  # at least, per chunk, reconstruction guidance at generate.num_frames
    identity_long: float = 0.8  # at least, per chunk, the long videos
    held_out_adherence: float = 0.7  # at least, held-out captions at the default guidance weight
    jump_ratio: float = 1.5  # at most, reconstruction guidance; also below replacement's beyond the noise
    continuation_identity: float = 0.95  # at least, chunks keeping the given object's colour and shape
    continuation_error_frame: int = 32  # the frame whose centroid error must stay below the object's size
    wall_seconds: float = 600.0  # at most, judged only on a run that did every stage itself


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
    continuation: ContinuationConfig = field(default_factory=ContinuationConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    metrics: MetricsConfig = field(default_factory=lambda: MetricsConfig(pairwise=False))  # FVD / KVD of each
    # method's videos against the world's training videos, when metrics.i3d points at i3d_torchscript.pt
