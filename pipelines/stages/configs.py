"""Every stage's config, declared once and importable without torch, so each script's ``--help`` answers at once.

A stage config composes the configs of the layers below it (``RunConfig``, ``OptimConfig``, ``ClipSpec``,
``FramesConfig``, ``TextConfig``, ``DiffusionModelConfig``, ``SamplingConfig``, ``AutoencoderConfig``, ...);
the comment after each field is its ``--help`` text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from autoencoder.config import AutoencoderConfig, AutoencoderLossConfig
from pipelines.core.config import Device, OptimConfig, RunConfig, VaeDtype
from pipelines.media.config import ClipSpec, FramesConfig
from pipelines.models.config import DiffusionModelConfig, SamplingConfig, TextConfig


def _cpu_autoencoder() -> AutoencoderConfig:
    return AutoencoderConfig(base_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1, norm_groups=8)


@dataclass
class AutoencoderTrainConfig:
    """Stage 1, ``scripts/train_autoencoder.py``: the per-frame KL autoencoder (LDM's recipe)."""

    model: AutoencoderConfig = field(default_factory=_cpu_autoencoder)
    init_from: Optional[str] = None  # start from a VAE on disk (any layout load_autoencoder reads)
    data: FramesConfig = field(default_factory=FramesConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    disc_lr: Optional[float] = None  # the discriminator's learning rate (default: optim.lr)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=[0.5, 0.9], max_grad_norm=0.0))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="outputs/autoencoder"))
    eval_frames: int = 256  # held-out frames for PSNR / SSIM
    scale_frames: int = 256  # training frames for the latent scale (1 / std)
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, more time)

    def __post_init__(self) -> None:
        if self.run.sharding != "none":
            raise ValueError(f"run.sharding: the autoencoder trains data parallel (none), got {self.run.sharding}")


@dataclass
class EncodeConfig:
    """Latents, ``scripts/encode_latents.py``: clips → scaled latents, captions and frozen text embeddings in
    safetensors shards (resumable)."""

    autoencoder: str = "outputs/autoencoder/model"  # our model folder, a diffusers VAE folder or an LDM/SD file
    videos: list[str] = field(default_factory=lambda: ["data/videos"])  # folders of videos
    captions: Optional[str] = None  # a CSV / JSONL manifest; default: captions.jsonl / .csv in the folder
    out_dir: str = "outputs/latents"
    clip: ClipSpec = field(default_factory=lambda: ClipSpec(start="first"))
    clips_per_video: int = 1  # several clips of a long video (each with its own seeded random start)
    videos_per_shard: int = 256
    batch_size: int = 8  # clips per autoencoder batch
    chunk_frames: int = 16  # frames per autoencoder call
    sample_posterior: bool = False  # store a posterior sample instead of its mean
    text: TextConfig = field(default_factory=lambda: TextConfig(kind="none"))  # frozen encoders only
    store_tokens: bool = False  # also store the token embeddings (for cross-attention)
    seed: int = 0
    num_workers: int = 0  # data-loader worker processes
    vae_dtype: VaeDtype = "auto"  # the autoencoder's precision (auto: bf16 on a GPU that has it, else fp32; fp16,
    # which SD-family VAEs overflow, only when asked); part of each shard's fingerprint
    device: Device = "auto"  # several GPUs: accelerate launch --num_processes N (shards split between processes)

    def __post_init__(self) -> None:
        for name in ("clips_per_video", "videos_per_shard", "batch_size", "chunk_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class DiffusionDataConfig:
    """Training clips: latent shards (``latents``) or, without them, videos encoded on the fly."""

    latents: Optional[str] = "outputs/latents"  # a folder written by scripts/encode_latents.py
    videos: list[str] = field(default_factory=list)  # used when latents is null: videos encoded on the fly
    captions: Optional[str] = None  # captions manifest for those videos
    autoencoder: Optional[str] = None  # for on-the-fly encoding and sample videos (default: the shards')
    clip: ClipSpec = field(default_factory=ClipSpec)  # on-the-fly clips
    num_frames: int = 16  # frames per training clip: a random window of each cached clip
    images_per_video: int = 0  # joint image–video training: independent images appended to each clip
    images: list[str] = field(default_factory=list)  # image folders to draw them from (default: other frames
    # of the same clip)
    image_captions: Optional[str] = None  # a captions manifest for the image folders
    vae_dtype: VaeDtype = "auto"  # the autoencoder's precision for on-the-fly encoding and sample videos (auto: bf16
    # on a GPU that has it, else fp32; fp16, which SD-family VAEs overflow, only when asked)

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.images_per_video < 0:
            raise ValueError(f"num_frames must be at least 1 and images_per_video at least 0, got "
                             f"{self.num_frames}, {self.images_per_video}")


@dataclass
class DiffusionTrainConfig:
    """Stage 2, ``scripts/train_diffusion.py``: the space-time U-Net on latent clips."""

    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, betas=[0.9, 0.99], warmup_steps=100))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="outputs/diffusion", ema_decay=0.9999))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # for the sample sheets during training
    sample_prompts: list[str] = field(default_factory=list)  # prompts of the sample sheets


@dataclass
class ConditionConfig:
    """Frames the user brings (paper §3.1, conditional sampling): a clip to continue, an image to animate, a
    low-frame-rate video to fill in, a small video to enlarge. Read with the project's video IO, resized and
    cropped to the model's frames, encoded by the model's autoencoder; the output begins with (or, filling in,
    contains) the given frames."""

    video: Optional[str] = None  # a video file, or a folder of them (one output per file)
    image: Optional[str] = None  # an image file, or a folder of them: image-to-video, the image as frame 0
    task: Literal["continue", "interpolate", "upscale"] = "continue"  # what to do with condition.video
    frames: Literal["last", "first"] = "last"  # continue: give the video's last or its first `count` frames
    count: Optional[int] = None  # frames of the video given (null: continue: all of a video that fits in
    # num_frames − 1, the model's frame rate; interpolate / upscale: every frame, as many as fit num_frames)
    every: int = 4  # interpolate: the given frames become every s-th output frame, the frames between sampled
    scale: int = 4  # upscale: the given video is the output at 1 / scale of its side
    w_upscale: float = 1.0  # upscale: reconstruction weight of the low-resolution frames (paper §3.1)

    def __post_init__(self) -> None:
        if self.video is not None and self.image is not None:
            raise ValueError("condition.video and condition.image: give one of them")
        if self.count is not None and self.count < 1:
            raise ValueError(f"condition.count must be at least 1, got {self.count}")
        if self.every < 2 or self.scale < 2:
            raise ValueError(f"condition.every and condition.scale must be at least 2, got {self.every}, {self.scale}")
        if self.w_upscale <= 0:
            raise ValueError(f"condition.w_upscale must be positive, got {self.w_upscale}")

    @property
    def given(self) -> bool:
        """Whether the user gave frames."""
        return self.video is not None or self.image is not None


@dataclass
class GenerateConfig:
    """Long videos, ``scripts/generate.py``: from prompts, or from frames the user brings (``condition``): a first
    chunk from noise (or the given frames), then extension conditioned on the last frames (paper §3.1), or
    keyframes first and the frames between them after."""

    model: str = "outputs/diffusion"  # a diffusion training run (or one of its checkpoints)
    autoencoder: Optional[str] = None  # default: the VAE the model was trained with
    prompts: list[str] = field(default_factory=list)  # one video each ("" for the null caption); with a
    # condition: none (null caption), one for every input, or one per input file
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    num_frames: int = 64  # frames of each video
    chunk_frames: Optional[int] = None  # frames per sampled chunk (default: the training clip length)
    context_frames: int = 3  # k: the last frames each new chunk is conditioned on
    anchor_frames: int = 1  # m: frames of the first chunk (spread over it) every later chunk is also conditioned
    # on, a fixed reference for what the scene looks like (docs/experiments/anchor-frames.md)
    method: Literal["reconstruction", "replacement"] = "reconstruction"  # paper §3.1: guidance, or imputation
    w_r: float = 1.0  # reconstruction guidance weight; with a known-frames network a weak one keeps identity best
    # (docs/experiments/known-frames-network.md; the paper's models, not given the context, used 9-50)
    w_r_interval: Optional[list[float]] = None  # [λ_lo, λ_hi]: the reconstruction gradient only at those noise
    # levels, replacement elsewhere (no backward pass there; null: everywhere)
    known_input: bool = True  # a model trained with unet.known_frames is also given the context as input
    # (false: reconstruction guidance or replacement alone)
    mode: Literal["autoregressive", "hierarchical"] = "autoregressive"
    frame_skip: int = 4  # hierarchical: keyframes this many frames apart
    keyframe_model: Optional[str] = None  # hierarchical: a model trained at that frame skip (default: model)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    batch_size: int = 4  # videos sampled together
    decode_chunk_frames: int = 16  # frames per autoencoder decode call (memory stays flat in the length)
    out_dir: str = "outputs/generate"
    name: str = ""  # file-name suffix, default: the method (and the mode or the condition's task)
    fps: float = 8.0
    gif: bool = False  # also write a .gif beside each .mp4
    raw_frames: bool = False  # also write each video's decoded frames losslessly, uint8 [f, H, W, 3] as .npy
    # beside the .mp4 (for measuring: the video codec rounds a frame by the frames around it)
    use_ema: bool = True  # sample with the EMA weights
    mixed_precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # the U-Net's autocast on a GPU (auto: the
    # training run's run.mixed_precision); a CPU samples in fp32
    vae_dtype: VaeDtype = "auto"  # the autoencoder's precision (auto: bf16 on a GPU that has it, else fp32; fp16,
    # which SD-family VAEs overflow, only when asked)
    device: Device = "auto"

    def __post_init__(self) -> None:
        for name in ("num_frames", "context_frames", "frame_skip", "batch_size", "decode_chunk_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.anchor_frames < 0:
            raise ValueError(f"anchor_frames must be at least 0, got {self.anchor_frames}")
        if self.chunk_frames is not None and self.context_frames + self.anchor_frames >= self.chunk_frames:
            raise ValueError(f"context_frames plus anchor_frames must be below chunk_frames = {self.chunk_frames}, "
                             f"got {self.context_frames} + {self.anchor_frames}")
        interval = self.w_r_interval
        if interval is not None and (len(interval) != 2 or interval[0] > interval[1]):
            raise ValueError(f"w_r_interval must be [lo, hi] with lo <= hi, got {self.w_r_interval}")
        if self.w_r < 0 or self.fps <= 0:
            raise ValueError(f"w_r must be at least 0 and fps positive, got {self.w_r}, {self.fps}")
        if self.condition.task == "upscale" and self.method != "reconstruction":
            raise ValueError("condition.task=upscale enlarges by reconstruction guidance: it needs "
                             "method=reconstruction (the low-resolution frames are not latent frames to replace)")
        c = self.condition
        if c.count is not None and c.image is None and c.task == "continue" and c.count >= self.num_frames:
            raise ValueError(f"condition.count={c.count} must be below num_frames={self.num_frames}: the output "
                             f"begins with the given frames and continues them")
        if self.condition.given and self.mode != "autoregressive":
            raise ValueError("condition.*: given frames are continued, filled in or enlarged in "
                             "mode=autoregressive (condition.task=interpolate is the hierarchical infill)")
        if not self.prompts and not self.condition.given:
            raise ValueError("prompts: give at least one prompt (\"\" for the null caption), or frames to start "
                             "from (condition.video or condition.image)")


@dataclass
class EvaluateAutoencoderConfig:
    """``scripts/evaluate_autoencoder.py``: PSNR, SSIM (and LPIPS) of any autoencoder on held-out frames."""

    autoencoder: str = "outputs/autoencoder/model"  # our model folder, a diffusers VAE folder or an LDM/SD file
    data: FramesConfig = field(default_factory=FramesConfig)  # the same settings give training's split
    split: Literal["eval", "train", "all"] = "eval"  # the hash split's held-out files, its training files, or all
    frames: int = 256  # frames scored
    lpips_net: Literal["alex", "vgg"] = "alex"  # LPIPS backbone (scored only when its weights are present)
    out: str = "outputs/autoencoder/eval_external.json"
    device: Device = "auto"
