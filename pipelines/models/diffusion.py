"""The diffusion model as the pipelines use it: network + parameterisation + schedule + text encoder, built
from a typed config, saved in (and loaded from) training checkpoints, and bound into denoise callables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from diffusion import (
    Denoiser,
    NoiseSchedule,
    UNet3D,
    UNet3DConfig,
    classifier_free_guidance,
    cpu_kernels,
    get_sampler,
    known_inputs,
)
from pipelines.core.checkpoint import latest_checkpoint, read_trainer_state
from pipelines.core.config import UserError
from pipelines.models.config import DiffusionModelConfig, SamplingConfig, TextConfig
from pipelines.models.text import build_text_encoder, conditioning_dims, select


@dataclass
class SavedModel:
    """The sections of a training run's config that rebuild its model (the rest is the run's own business)."""

    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class DiffusionBundle:
    """What sampling needs, in one place."""

    denoiser: Denoiser
    text_encoder: Optional[nn.Module]
    text: TextConfig
    model: DiffusionModelConfig
    latent_shape: list[int]  # [c, f, h, w] of a training clip
    autoencoder: Optional[str]  # the VAE whose latents the model was trained on
    null_cache: Optional[dict[str, Tensor]] = None  # frozen encoders: the embedding of "" stored with the data
    info: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def embed(self, captions: list[str]) -> dict[str, Tensor]:
        """U-Net conditioning keyword arguments for ``captions`` (empty for unconditional models)."""
        if self.text_encoder is None:
            return {}
        with torch.no_grad():
            return {k: v.to(self.device) for k, v in select(self.text_encoder(captions), self.text.use_tokens).items()}

    def null(self) -> dict[str, Tensor]:
        """The null conditioning ``[1, ...]`` (the embedding of "")."""
        if self.null_cache is not None:
            return {k: v.to(self.device) for k, v in select(self.null_cache, self.text.use_tokens).items()}
        return self.embed([""])

    def denoise_fn(self, prompts: list[str], guidance: float | SamplingConfig, **net_kwargs):
        """``denoise(z, logsnr) -> x̂`` for a batch of prompts, with classifier-free guidance: a weight ``w``, or
        a :class:`SamplingConfig` (its weight, rescale and interval)."""
        return self._bind(self.embed(prompts), guidance, **net_kwargs)

    def chunk_denoisers(self, prompts: list[str], guidance: float | SamplingConfig):
        """``(first, later)``: the denoiser ``first(z, λ)`` for the chunk that starts each video, and a function
        ``later(x_known, index, frames)`` that returns the denoiser for a chunk of ``frames`` frames continuing
        it, given the frames ``x_known [b, c, k, h, w]`` at ``index``. That one is told ``video_start=False`` (a
        network with frame positions leaves them out) and a network with ``known_frames`` gets ``x_known`` as
        input (``later()`` with no frames: none). The prompts are embedded once; a network with neither option
        uses ``first`` throughout."""
        conditioning = self.embed(prompts)
        first = self._bind(conditioning, guidance)
        net = self.denoiser.net
        positions = getattr(net, "frame_positions", None) is not None
        takes_frames = getattr(getattr(net, "config", None), "known_frames", False)

        def later(x_known: Optional[Tensor] = None, index: Sequence[int] = (), frames: int = 0):
            kwargs: dict = {"video_start": False} if positions else {}
            if takes_frames and x_known is not None:
                kwargs.update(known_inputs(x_known, index, frames))
            return self._bind(conditioning, guidance, **kwargs) if kwargs else first

        return first, later

    def _bind(self, conditioning: dict[str, Tensor], guidance: float | SamplingConfig, **net_kwargs):
        if not conditioning:
            return lambda z, logsnr: self.denoiser(z, logsnr, **net_kwargs)
        if isinstance(guidance, SamplingConfig):
            return classifier_free_guidance(self.denoiser, conditioning, self.null(), guidance.guidance,
                                            interval=guidance.guidance_interval, **net_kwargs)
        return classifier_free_guidance(self.denoiser, conditioning, self.null(), guidance, **net_kwargs)


def build_unet(config: UNet3DConfig, device: torch.device | str) -> UNet3D:
    """The U-Net of ``config``, with :mod:`diffusion.cpu_kernels` swapped in when it runs on a CPU."""
    net = UNet3D(config)
    return cpu_kernels.install(net) if torch.device(device).type == "cpu" else net


def build_unet_config(model: DiffusionModelConfig, text: TextConfig, text_encoder, channels: int) -> UNet3DConfig:
    """The U-Net config with what the data and text encoder decide filled in (channels, conditioning widths)."""
    cond_dim, context_dim = conditioning_dims(text_encoder, text.use_tokens)
    return dataclasses.replace(model.unet, in_channels=channels, out_channels=channels, cond_dim=cond_dim,
                               context_dim=context_dim)


def unet_blocks(net: UNet3D) -> list[nn.Module]:
    """The U-Net's blocks in forward order (every residual, attention, down- and up-sampling block of the down,
    middle and up stages): the units it is sharded in, each gathered whole for its forward and backward. What
    lies outside them (embeddings, the input and output convolutions) belongs to the root unit."""
    return [block for stage in (*net.down, net.mid, *net.up) for block in stage]


def sample(bundle: DiffusionBundle, denoise, shape: tuple[int, ...], sampling: SamplingConfig,
           generator: torch.Generator, progress: bool = False) -> Tensor:
    """Run the configured sampler from ``z_1 ~ N(0, I)`` of ``shape``; ``generator`` lives on the model's device
    and draws every random number, so a seed fixes the result."""
    z = torch.randn(shape, generator=generator, device=generator.device)
    grid = NoiseSchedule.of(bundle.model.schedule).grid(sampling.steps).to(z.device)
    return get_sampler(sampling.sampler)(denoise, z, grid, generator=generator, progress=progress,
                                         **sampling.knobs())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory, a checkpoint root, or the checkpoint itself."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "trainer_state.json").is_file():
            return candidate
        found = latest_checkpoint(candidate) if candidate.is_dir() else None
        if found is not None:
            return found
    raise UserError(f"no diffusion checkpoint at {path}: give a training run directory "
                            f"(with checkpoints/) or a checkpoint directory (with trainer_state.json)")


def load_diffusion(path: str | Path, device: torch.device | str = "cpu", use_ema: bool = True) -> DiffusionBundle:
    """Rebuild the model a diffusion training run saved (EMA weights by default)."""
    directory = resolve_checkpoint(path)
    info = read_trainer_state(directory)
    cfg = _from_saved({k: info["config"][k] for k in ("model", "text")}, SavedModel)
    text_encoder = build_text_encoder(cfg.text)
    net = build_unet(cfg.model.unet, device)
    weights = "ema_unet" if use_ema and (directory / "ema_unet.safetensors").is_file() else "unet"
    net.load_state_dict(load_file(directory / f"{weights}.safetensors"))
    if text_encoder is not None and (directory / "text.safetensors").is_file():
        text_weights = "ema_text" if use_ema and (directory / "ema_text.safetensors").is_file() else "text"
        text_encoder.load_state_dict(load_file(directory / f"{text_weights}.safetensors"))
    if text_encoder is not None:
        text_encoder.to(device).eval()
    null_cache = None
    if (directory / "null_text.safetensors").is_file():
        null_cache = {k.removeprefix("tensors."): v for k, v in load_file(directory / "null_text.safetensors").items()}
    net.requires_grad_(False)  # sampling only: no autograd graphs through the weights
    if text_encoder is not None:
        text_encoder.requires_grad_(False)
    return DiffusionBundle(
        denoiser=Denoiser(net, cfg.model.prediction).to(device).eval(), text_encoder=text_encoder, text=cfg.text,
        model=cfg.model, latent_shape=info["latent_shape"], autoencoder=info.get("autoencoder"),
        null_cache=null_cache, info=info,
    )


def _from_saved(saved: dict, schema: type):
    """A typed config from the plain dict a checkpoint stores."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), saved))
