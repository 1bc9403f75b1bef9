"""The per-frame VAE on the project's one video layout ``[b, c, f, h, w]``.

Frames run through the VAE ``chunk_frames`` at a time under the caller's grad mode, so activation memory
does not grow with video length: encoding folds them into the batch with einops and unfolds the latents;
decoding writes each chunk into its place in one preallocated video. Latents leaving
:func:`encode_video` are normalised, z' = (z − latent_shift) · latent_scale (LDM scale-by-std);
:func:`decode_video` undoes that before decoding. The VAE runs in the dtype of its weights (float32 or bf16, say),
never under a caller's autocast (a U-Net's fp16 would overflow SD-family VAEs); latents and videos at these
boundaries are float32 whatever it is.
"""

from __future__ import annotations

import dataclasses

import torch
from einops import rearrange

from autoencoder.model import AutoencoderConfig, AutoencoderKL


def _check_video(video: torch.Tensor) -> None:
    if video.ndim != 5:
        raise ValueError(f"expected a video [b, c, f, h, w], got shape {tuple(video.shape)}")


def _fold(video: torch.Tensor) -> torch.Tensor:
    """[b, c, f, h, w] → [(b f), c, h, w] (a view when b = 1)."""
    _check_video(video)
    return rearrange(video, "b c f h w -> (b f) c h w")


def _unfold(frames: torch.Tensor, batch: int) -> torch.Tensor:
    """[(b f), c, h, w] → contiguous [b, c, f, h, w]."""
    return rearrange(frames, "(b f) c h w -> b c f h w", b=batch).contiguous()


def _chunks(frames: torch.Tensor, chunk_frames: int) -> tuple[torch.Tensor, ...]:
    """Consecutive slices of at most ``chunk_frames`` frames along dim 0 (views, no copy)."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be a positive number of frames, got {chunk_frames}")
    return frames.split(chunk_frames)


def _dtype(vae: AutoencoderKL) -> torch.dtype:
    """The dtype the VAE computes in: its weights'."""
    return next(vae.parameters()).dtype


def _encode_frames(vae: AutoencoderKL, frames: torch.Tensor, chunk_frames: int, sample: bool,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Unscaled float32 latents [n, z, h/F, w/F] of frames [n, c, h, w]: posterior samples or means, by chunks."""
    latents, dtype = [], _dtype(vae)
    with torch.autocast(frames.device.type, enabled=False):  # its own precision, whatever the caller's autocast
        for chunk in _chunks(frames, chunk_frames):
            posterior = vae.encode(chunk.to(dtype))
            latents.append((posterior.sample(generator) if sample else posterior.mode()).float())
    return torch.cat(latents)


def encode_video(vae: AutoencoderKL, video: torch.Tensor, chunk_frames: int = 16, sample: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Normalised latents [b, z, f, h/F, w/F] of a video [b, c, f, h, w] in [-1, 1].

    Each frame is encoded alone; z is the posterior mean, or with ``sample`` a draw from ``generator``.
    """
    z = _encode_frames(vae, _fold(video), chunk_frames, sample, generator)
    z = (z - vae.config.latent_shift) * vae.config.latent_scale
    return _unfold(z, video.shape[0])


def decode_video(vae: AutoencoderKL, latents: torch.Tensor, chunk_frames: int = 16,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Video [b, c, f, F·h, F·w] (float32) from normalised latents [b, z, f, h, w], decoding each frame alone.

    Each chunk of at most ``chunk_frames`` frames of one video is decoded and written straight into one
    preallocated output, so memory beyond the output stays one chunk's activations at any length (no list of
    chunks, no concatenation, no relayout copy). ``dtype=torch.uint8`` returns 8-bit frames, [-1, 1] clamped and
    mapped to 0…255 as video writers take them: a quarter of float32's memory for a long video.
    """
    _check_video(latents)
    out, vae_dtype = None, _dtype(vae)
    for index, video in enumerate(latents):
        start = 0
        for z in _chunks(video.transpose(0, 1), chunk_frames):  # [n, z, h, w]
            z = z.float() / vae.config.latent_scale + vae.config.latent_shift
            with torch.autocast(z.device.type, enabled=False):  # its own precision, whatever the caller's autocast
                frames = vae.decode(z.to(vae_dtype)).float().transpose(0, 1)  # [c, n, H, W]
            if dtype == torch.uint8:
                frames = frames.clamp(-1, 1).add(1).mul(127.5).round()
            if out is None:
                out = frames.new_empty((latents.shape[0], frames.shape[0], latents.shape[2], *frames.shape[2:]),
                                       dtype=dtype or frames.dtype)
            out[index, :, start : start + frames.shape[1]] = frames
            start += frames.shape[1]
    if out is None:
        raise ValueError(f"no frames to decode in latents of shape {tuple(latents.shape)}")
    return out


@torch.no_grad()
def estimate_latent_scale(vae: AutoencoderKL, frames_or_video: torch.Tensor, chunk_frames: int = 16,
                          generator: torch.Generator | None = None) -> float:
    """LDM's scale-by-std: 1 / std of posterior samples z of frames [n, c, h, w] or a video [b, c, f, h, w].

    With the same ``generator`` state and ``chunk_frames``, ``encode_video(..., sample=True)`` under the
    returned scale draws the same z and so gives latents of exactly unit standard deviation.
    """
    frames = _fold(frames_or_video) if frames_or_video.ndim == 5 else frames_or_video
    z = _encode_frames(vae, frames, chunk_frames, sample=True, generator=generator)
    return 1.0 / z.float().std().item()


def with_estimated_latent_scale(vae: AutoencoderKL, frames_or_video: torch.Tensor, chunk_frames: int = 16,
                                generator: torch.Generator | None = None) -> AutoencoderConfig:
    """A copy of ``vae.config`` whose ``latent_scale`` is :func:`estimate_latent_scale` on these frames."""
    scale = estimate_latent_scale(vae, frames_or_video, chunk_frames, generator)
    return dataclasses.replace(vae.config, latent_scale=scale)
