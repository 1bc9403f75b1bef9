"""Videos longer than a training clip, in latent space (paper §3.1, "long videos" and conditional sampling).

* :func:`autoregressive`: a first chunk from noise (or the frames a user gave), then chunk after chunk, each
  conditioned on the last ``context_frames`` frames so far and on ``anchor_frames`` frames of the first chunk,
  by reconstruction guidance or replacement; a network trained with known frames (``unet.known_frames``) is also
  given them as input.
* :func:`infill`: keyframes ``s`` frames apart (generated ones, or a user's low-frame-rate video) with the
  frames between them sampled window by window, the keyframes reaching the network through the guidance;
  :func:`hierarchical` samples the keyframes first (the paper's frameskip-then-infill).
* :func:`upscale`: a low-resolution video enlarged by reconstruction guidance on ``down(decode(x̂))``, chunk by
  chunk, each later chunk also given the last frames of the one before.

The context never leaves latent space (no decode / re-encode drift). Every function returns latents
``[b, c, f, h, w]`` on the CPU and the output frame indices where each chunk after the first starts (its new
frames), which the grading of chunk joins uses. :func:`chunk_count` says how many chunks a configuration samples,
from the same plans the loops follow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from autoencoder import decode_video
from diffusion import area_downsample, super_resolution_guidance, temporal_conditioning
from pipelines.core.config import UserError
from pipelines.models.diffusion import DiffusionBundle, sample
from pipelines.stages.configs import GenerateConfig

OnChunk = Optional[Callable[[Tensor], None]]


def anchor_index(frames: int, anchor: int) -> list[int]:
    """The ``anchor`` frames of a first chunk (or given clip) of ``frames`` frames that later chunks are
    conditioned on, spread evenly inside it (the middle one for one anchor)."""
    return torch.linspace(0, frames - 1, anchor + 2)[1:-1].round().long().tolist()


def extension_plan(first: int, total: int, chunk: int, context: int, anchor: int) -> list[tuple[int, int]]:
    """``(start, known)`` of every extension chunk of a video whose first ``first`` frames exist: the output
    index of the chunk's first new frame and how many frames it is conditioned on (the last ``context`` frames,
    fewer while the video is shorter, plus ``anchor`` frames of the first piece when it is longer than the
    context)."""
    anchors = anchor if first > context else 0
    plan, produced = [], first
    while produced < total:
        known = anchors + min(context, produced)
        if known >= chunk:
            raise UserError(f"context_frames plus anchor_frames ({known}) must be below chunk_frames = {chunk}")
        plan.append((produced, known))
        produced += chunk - known
    return plan


def keyframe_count(total: int, skip: int) -> int:
    """Keyframes ``skip`` frames apart that span ``total`` frames."""
    return math.ceil((total - 1) / skip) + 1


def infill_starts(length: int, chunk: int, skip: int) -> list[int]:
    """Where each infill window of ``chunk`` frames starts in a video of ``length`` frames with keyframes every
    ``skip``: windows share their boundary keyframe."""
    step = max((chunk - 1) // skip, 1) * skip
    return list(range(0, length - 1, step))


def chunk_count(cfg: GenerateConfig, chunk: int, given: int = 0) -> int:
    """Chunks sampled for one batch of videos, counted on the plans the loops follow; ``given``: frames the user
    gave (0: none)."""
    if cfg.mode == "hierarchical":
        keys = keyframe_count(cfg.num_frames, cfg.frame_skip)
        return (_autoregressive_chunks(keys, chunk, cfg)
                + len(infill_starts((keys - 1) * cfg.frame_skip + 1, chunk, cfg.frame_skip)))
    task = cfg.condition.task if given else "continue"
    if task == "upscale":
        return len(upscale_plan(given, chunk, cfg.context_frames))
    if task == "interpolate":
        length = (given - 1) * cfg.condition.every + 1
        return (len(infill_starts(length, chunk, cfg.condition.every))
                + _autoregressive_chunks(cfg.num_frames, chunk, cfg, length))
    return _autoregressive_chunks(cfg.num_frames, chunk, cfg, given)


def _autoregressive_chunks(total: int, chunk: int, cfg: GenerateConfig, first: int = 0) -> int:
    """Chunks :func:`autoregressive` samples for ``total`` frames after ``first`` existing ones (0: it samples
    the first chunk from noise too)."""
    if first >= total:
        return 0
    return (0 if first else 1) + len(extension_plan(first or chunk, total, chunk, cfg.context_frames,
                                                    cfg.anchor_frames))


def _extension_denoiser(bundle: DiffusionBundle, later, context: Tensor, chunk: int, cfg: GenerateConfig,
                        generator: torch.Generator):
    """The denoiser of one extension chunk conditioned on ``context`` (its first frames): the network given the
    context as input (when it takes known frames and ``known_input``), wrapped by reconstruction guidance or
    replacement (paper §3.1)."""
    index = range(context.shape[2])
    given = later(context, index, chunk) if cfg.known_input else later()
    return temporal_conditioning(given, context, index, cfg.method, cfg.w_r, generator, cfg.w_r_interval)


def autoregressive(bundle: DiffusionBundle, prompts: list[str], cfg: GenerateConfig, chunk: int,
                   generator: torch.Generator, total: Optional[int] = None, start: Optional[Tensor] = None,
                   on_chunk: OnChunk = None) -> tuple[Tensor, list[int]]:
    """Latents ``[b, c, total, h, w]`` (default ``cfg.num_frames``) on the CPU and the index where each extension
    chunk's new frames start.

    The video begins with ``start [b, c, g, h, w]`` (frames a user gave, already latents) or with a chunk
    sampled from noise; each extension chunk of ``chunk`` frames is conditioned on the last
    ``cfg.context_frames`` frames and, with ``cfg.anchor_frames`` = m > 0, on m frames of that first piece
    placed before them (paper §3.1 conditions on any known frames): a fixed reference for what the scene looks
    like, however long the video grows."""
    total = cfg.num_frames if total is None else total
    c, _, h, w = bundle.latent_shape
    base, later = bundle.chunk_denoisers(prompts, cfg.sampling)
    shape = (len(prompts), c, chunk, h, w)
    if start is None:
        first = sample(bundle, base, shape, cfg.sampling, generator)  # chunk 1: from noise
        if on_chunk:
            on_chunk(first)
    else:
        first = start.to(generator.device)
    plan = extension_plan(first.shape[2], total, chunk, cfg.context_frames, cfg.anchor_frames)
    anchors = cfg.anchor_frames if first.shape[2] > cfg.context_frames else 0
    anchor = first[:, :, anchor_index(first.shape[2], anchors)]
    pieces, tail = [first.cpu()], first[:, :, -cfg.context_frames :]
    for _, known in plan:
        context = torch.cat([anchor, tail], dim=2)  # [b, c, known, h, w]
        denoise = _extension_denoiser(bundle, later, context, chunk, cfg, generator)
        new = sample(bundle, denoise, shape, cfg.sampling, generator)[:, :, known:]
        pieces.append(new.cpu())
        tail = torch.cat([tail, new], dim=2)[:, :, -cfg.context_frames :]
        if on_chunk:
            on_chunk(new)
    return torch.cat(pieces, dim=2)[:, :, :total], [s for s, _ in plan if s < total]


def infill(bundle: DiffusionBundle, prompts: list[str], keys: Tensor, skip: int, cfg: GenerateConfig, chunk: int,
           generator: torch.Generator, on_chunk: OnChunk = None) -> tuple[Tensor, list[int]]:
    """Latents ``[b, c, (K − 1)·skip + 1, h, w]`` with the keyframes ``keys [b, c, K, h, w]`` at every
    ``skip``-th frame and the frames between them sampled, window by window of ``chunk`` frames, each window
    conditioned on its keyframes and on the frames the window before it sampled (paper §3.1: temporal
    interpolation). The keyframes reach the network through the guidance only: a known-frames network was
    trained with its *first* frames given, not frames spread over the clip."""
    b, c, count, h, w = keys.shape
    length = (count - 1) * skip + 1
    video = torch.zeros(b, c, length, h, w)
    known = torch.zeros(length, dtype=torch.bool)
    video[:, :, ::skip], known[::skip] = keys.cpu(), True
    first, later = bundle.chunk_denoisers(prompts, cfg.sampling)
    starts = infill_starts(length, chunk, skip)
    for start in starts:
        base = first if start == 0 else later()
        window = torch.arange(start, min(start + chunk, length))
        index = [i for i, f in enumerate(window.tolist()) if known[f]]
        x_known = video[:, :, window[index]].to(generator.device)
        denoise = temporal_conditioning(base, x_known, index, cfg.method, cfg.w_r, generator, cfg.w_r_interval)
        out = sample(bundle, denoise, (b, c, len(window), h, w), cfg.sampling, generator).cpu()
        fresh = ~known[window]
        video[:, :, window[fresh]] = out[:, :, fresh]
        known[window] = True
        if on_chunk:
            on_chunk(out)
    return video, starts[1:]


def hierarchical(keyframe_bundle: DiffusionBundle, bundle: DiffusionBundle, prompts: list[str], cfg: GenerateConfig,
                 chunk: int, generator: torch.Generator, on_chunk: OnChunk = None) -> tuple[Tensor, list[int]]:
    """Keyframes ``cfg.frame_skip`` frames apart first (themselves extended autoregressively by the keyframe
    model), then the frames between them (:func:`infill`): the paper's frameskip-4-then-infill."""
    count = keyframe_count(cfg.num_frames, cfg.frame_skip)
    keys, _ = autoregressive(keyframe_bundle, prompts, cfg, chunk, generator, total=count, on_chunk=on_chunk)
    video, starts = infill(bundle, prompts, keys, cfg.frame_skip, cfg, chunk, generator, on_chunk)
    return video[:, :, : cfg.num_frames], starts


def decoded_downsample(vae, size: tuple[int, int]) -> Callable[[Tensor, tuple[int, int]], Tensor]:
    """``down(x)``: latents ``[b, c, f, h, w]`` → the pixels the autoencoder decodes them to, area-averaged to
    ``size``: the operator super-resolution guidance compares with the given low-resolution frames
    (differentiable through the decoder; ``docs/conditioning.md`` says why this one)."""
    def down(latents: Tensor, _: tuple[int, int]) -> Tensor:
        return area_downsample(decode_video(vae, latents), size)

    return down


def upscale(bundle: DiffusionBundle, prompts: list[str], low: Tensor, vae, cfg: GenerateConfig, chunk: int,
            generator: torch.Generator, on_chunk: OnChunk = None) -> tuple[Tensor, list[int]]:
    """Latents ``[b, c, F, h, w]`` whose decoded frames, area-averaged, match ``low [b, 3, F, h', w']`` (pixels in
    [−1, 1]): super-resolution by reconstruction guidance, ``x̃ = x̂ − (w α_t / 2) ∇_{z_t} ‖x^a − down(x̂)‖²``
    (paper §3.1, the gradient taken with respect to all of ``z_t``). Chunks of ``chunk`` frames follow one another;
    each later one is also given the last ``cfg.context_frames`` latent frames of the video so far (as input to a
    known-frames network, and by replacement), so the enlarged video stays one video."""
    b, _, frames, *size = low.shape
    c, _, h, w = bundle.latent_shape
    base, later = bundle.chunk_denoisers(prompts, cfg.sampling)
    down = decoded_downsample(vae, tuple(size))
    low = low.to(generator.device)
    pieces, tail = [], low.new_zeros(b, c, 0, h, w)
    for produced, known in upscale_plan(frames, chunk, cfg.context_frames):
        new = min(chunk - known, frames - produced)
        denoise = base
        if known:
            given = later(tail, range(known), known + new) if cfg.known_input else later()
            denoise = temporal_conditioning(given, tail, range(known), "replacement", 0.0, generator)
        target = low[:, :, produced - known : produced + new]
        denoise = super_resolution_guidance(denoise, target, cfg.condition.w_upscale, downsample=down)
        out = sample(bundle, denoise, (b, c, known + new, h, w), cfg.sampling, generator)[:, :, known:]
        pieces.append(out.cpu())
        tail = torch.cat([tail, out], dim=2)[:, :, -cfg.context_frames :]
        if on_chunk:
            on_chunk(out)
    return torch.cat(pieces, dim=2), [s for s, _ in upscale_plan(frames, chunk, cfg.context_frames)[1:]]


def upscale_plan(frames: int, chunk: int, context: int) -> list[tuple[int, int]]:
    """``(start, known)`` of each chunk :func:`upscale` samples: the first from nothing, the others after the
    last ``context`` frames."""
    return [(0, 0), *extension_plan(min(chunk, frames), frames, chunk, context, 0)]
