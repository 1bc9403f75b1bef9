"""Long videos from prompts (paper §3.1, "long videos"): the first chunk is sampled from noise, then each new
chunk is conditioned on the last ``k`` latent frames generated so far, by reconstruction guidance (default) or
replacement; a network trained with known frames (``unet.known_frames``) is also given the context as input.
With ``anchor_frames`` the chunks are also conditioned on a few frames of the first chunk, placed before the context.
The context never leaves latent space (no decode / re-encode drift); it may carry a small amount of noise. The
paper's hierarchical mode samples sparse keyframes first, then fills the frames between them with the same
conditional sampler (the keyframes reach the network through the guidance only). Latents are decoded chunk by
chunk and streamed into the video file, so memory stays flat as the length grows.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from autoencoder import decode_video, load_autoencoder
from diffusion import condition_guidance, temporal_conditioning
from pipelines.core.config import UserError, config_to_dict, save_resolved_config
from pipelines.core.devices import resolve_device
from pipelines.core.files import atomic_write_json
from pipelines.core.visual import save_png, tile, to_uint8
from pipelines.models.config import SamplingConfig
from pipelines.models.diffusion import DiffusionBundle, load_diffusion, sample
from pipelines.stages.configs import GenerateConfig


@dataclass
class Plan:
    """How one batch of videos is sampled."""

    total: int  # frames wanted
    chunk: int  # frames per sampled chunk
    context: int  # k
    method: str
    w_r: float
    context_noise: float
    sampling: SamplingConfig
    known_input: bool = True  # give a network trained with known frames the context as input
    anchor: int = 0  # m: frames of the first chunk every later chunk is also conditioned on
    context_guidance: float = 0.0  # w_c on the context given as input (known-frames networks)
    context_guidance_interval: Optional[Sequence[float]] = None
    w_r_interval: Optional[Sequence[float]] = None  # [λ_lo, λ_hi]: reconstruction guidance only there

    @property
    def known(self) -> int:
        """Frames every extension chunk is conditioned on: the anchor frames, then the context."""
        return self.anchor + self.context


def _noisy(x: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """``√(1 − σ²) x + σ ε``: a variance-preserving perturbation of the context latents."""
    if sigma <= 0:
        return x
    noise = torch.randn(x.shape, generator=generator, device=x.device)
    return math.sqrt(1 - sigma**2) * x + sigma * noise


def anchor_index(chunk: int, anchor: int) -> list[int]:
    """The ``anchor`` frames of a first chunk of ``chunk`` frames that later chunks are conditioned on, spread
    evenly inside it (the middle one for one anchor), so one odd first frame does not become the reference."""
    return torch.linspace(0, chunk - 1, anchor + 2)[1:-1].round().long().tolist()


def autoregressive(bundle: DiffusionBundle, prompts: list[str], plan: Plan, generator: torch.Generator,
                   on_chunk: Optional[Callable[[Tensor], None]] = None) -> tuple[Tensor, list[int]]:
    """Latents ``[b, c, total, h, w]`` (on the CPU) and the indices where each extension chunk starts.

    Each extension chunk is conditioned on the last ``plan.context`` frames and, with ``plan.anchor`` = m > 0,
    also on m frames of the first chunk placed before them (paper §3.1 conditions on any known frames): a fixed
    reference for what the object looks like, however long the video grows."""
    if not 0 < plan.context or plan.anchor < 0 or plan.known >= plan.chunk:
        raise UserError(f"context_frames (at least 1) plus anchor_frames must be below chunk_frames = {plan.chunk}, "
                        f"got {plan.context} + {plan.anchor}")
    c, _, h, w = bundle.latent_shape
    base, later = bundle.chunk_denoisers(prompts, plan.sampling)
    shape = (len(prompts), c, plan.chunk, h, w)
    first = sample(bundle, base, shape, plan.sampling, generator)  # chunk 1: from noise
    anchor = first[:, :, anchor_index(plan.chunk, plan.anchor)]
    pieces, tail, produced, boundaries = [first.cpu()], first[:, :, -plan.context :], plan.chunk, []
    if on_chunk:
        on_chunk(first)
    while produced < plan.total:
        context = _noisy(torch.cat([anchor, tail], dim=2), plan.context_noise, generator)
        given = later(context, range(plan.known), plan.chunk) if plan.known_input else later()
        if plan.known_input and plan.context_guidance:
            given = condition_guidance(given, later(), plan.context_guidance, plan.context_guidance_interval)
        denoise = temporal_conditioning(given, context, range(plan.known), plan.method, plan.w_r, generator,
                                        bundle.model.noise_correlation, plan.w_r_interval)
        new = sample(bundle, denoise, shape, plan.sampling, generator)[:, :, plan.known :]
        boundaries.append(produced)
        pieces.append(new.cpu())
        tail = torch.cat([tail, new], dim=2)[:, :, -plan.context :]
        produced += new.shape[2]
        if on_chunk:
            on_chunk(new)
    return torch.cat(pieces, dim=2)[:, :, : plan.total], [b for b in boundaries if b < plan.total]


def hierarchical(keyframe_bundle: DiffusionBundle, bundle: DiffusionBundle, prompts: list[str], plan: Plan,
                 skip: int, generator: torch.Generator, on_chunk=None) -> tuple[Tensor, list[int]]:
    """Keyframes ``skip`` frames apart first (themselves extended autoregressively), then each window of
    ``chunk`` frames sampled with its keyframes as the known frames (paper §3.1: frameskip 4, then infill)."""
    num_keys = math.ceil((plan.total - 1) / skip) + 1
    keys, _ = autoregressive(keyframe_bundle, prompts, Plan(**{**plan.__dict__, "total": num_keys}), generator)
    length = (num_keys - 1) * skip + 1
    b, c, _, h, w = keys.shape
    video = torch.zeros(b, c, length, h, w)
    known = torch.zeros(length, dtype=torch.bool)
    video[:, :, ::skip], known[::skip] = keys, True
    first, later = bundle.chunk_denoisers(prompts, plan.sampling)
    step = max((plan.chunk - 1) // skip, 1) * skip  # windows share their boundary keyframe
    starts = list(range(0, length - 1, step))
    for start in starts:
        base = first if start == 0 else later()  # keyframes reach the network only through the guidance
        window = torch.arange(start, min(start + plan.chunk, length))
        index = [i for i, f in enumerate(window.tolist()) if known[f]]
        x_known = video[:, :, window[index]].to(generator.device)
        denoise = temporal_conditioning(base, x_known, index, plan.method, plan.w_r, generator,
                                        bundle.model.noise_correlation, plan.w_r_interval)
        out = sample(bundle, denoise, (b, c, len(window), h, w), plan.sampling, generator).cpu()
        fresh = ~known[window]
        video[:, :, window[fresh]] = out[:, :, fresh]
        known[window] = True
        if on_chunk:
            on_chunk(out)
    return video[:, :, : plan.total], starts[1:]


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe version of a prompt."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "video"


class _Writer:
    """Decode latents in chunks and write each video as it comes (memory flat in the length), keeping only the
    frames a contact sheet shows; with ``raw_frames`` also the decoded frames, losslessly, as ``.npy``."""

    def __init__(self, vae, decode_chunk: int, fps: float, sheet_frames: list[int], raw_frames: bool = False):
        self.vae, self.decode_chunk, self.fps, self.sheet_frames = vae, decode_chunk, fps, sheet_frames
        self.raw_frames = raw_frames

    @torch.no_grad()
    def write(self, latents: Tensor, path: Path, gif: bool) -> Tensor:
        """Write one video ``latents [c, f, h, w]`` to ``path`` (and ``path.with_suffix(".npy")`` with
        ``raw_frames``); returns its contact-sheet frames ``[3, n, H, W]``."""
        from pipelines.media.video_io import FramesWriter, VideoWriter, write_gif

        device = next(self.vae.parameters()).device
        shown, gif_frames = [], []
        raw = FramesWriter(path.with_suffix(".npy"), latents.shape[1]) if self.raw_frames else nullcontext()
        with VideoWriter(path, fps=self.fps) as writer, raw as lossless:
            for start in range(0, latents.shape[1], self.decode_chunk):
                piece = latents[None, :, start : start + self.decode_chunk].to(device)
                video = decode_video(self.vae, piece, self.decode_chunk)[0].clamp(-1, 1).cpu()  # [3, n, H, W]
                writer.write(video)
                if lossless is not None:
                    lossless.write(video)
                keep = [i - start for i in self.sheet_frames if start <= i < start + video.shape[1]]
                shown.append(video[:, keep])
                if gif:
                    gif_frames.append(video)
        if gif:
            write_gif(path.with_suffix(".gif"), torch.cat(gif_frames, dim=1), fps=self.fps)
        return torch.cat(shown, dim=1)


@torch.no_grad()  # reconstruction guidance enables gradients for its own computation only
def generate(cfg: GenerateConfig, log=print) -> dict:
    """Generate ``cfg.prompts`` into ``cfg.out_dir``: videos, a contact sheet and ``generation.json``."""
    device = resolve_device(cfg.device)
    bundle = load_diffusion(cfg.model, device, use_ema=cfg.use_ema)
    keyframe_bundle = load_diffusion(cfg.keyframe_model, device, cfg.use_ema) if cfg.keyframe_model else bundle
    vae_path = cfg.autoencoder or bundle.autoencoder
    if not vae_path:
        raise UserError("no autoencoder: set autoencoder=PATH (the model does not record one)")
    vae = load_autoencoder(vae_path, device=device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out, "generate.yaml")
    plan = Plan(cfg.num_frames, cfg.chunk_frames or bundle.latent_shape[1], cfg.context_frames, cfg.method,
                cfg.w_r, cfg.context_noise, cfg.sampling, cfg.known_input, cfg.anchor_frames, cfg.context_guidance,
                cfg.context_guidance_interval, cfg.w_r_interval)
    columns = min(cfg.num_frames, 16)
    sheet_frames = torch.linspace(0, cfg.num_frames - 1, columns).round().long().tolist()
    writer = _Writer(vae, cfg.decode_chunk_frames, cfg.fps, sheet_frames, cfg.raw_frames)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    samples, sheets, boundaries, start = [], [], [], time.perf_counter()
    name = cfg.name or (cfg.method if cfg.mode == "autoregressive" else f"{cfg.method}_{cfg.mode}")
    batches = [cfg.prompts[i : i + cfg.batch_size] for i in range(0, len(cfg.prompts), cfg.batch_size)]
    chunks = _chunk_count(plan, cfg) * len(batches)
    bar = tqdm(total=chunks, desc=f"generating ({name})", unit="chunk")
    for b, prompts in enumerate(batches):
        if cfg.mode == "autoregressive":
            latents, boundaries = autoregressive(bundle, prompts, plan, generator, on_chunk=lambda _: bar.update(1))
        else:
            latents, boundaries = hierarchical(keyframe_bundle, bundle, prompts, plan, cfg.frame_skip, generator,
                                               on_chunk=lambda _: bar.update(1))
        for i, prompt in enumerate(prompts):
            index = b * cfg.batch_size + i
            path = out / f"{index:03d}_{slug(prompt)}_{name}.mp4"
            sheets.append(writer.write(latents[i], path, cfg.gif))
            samples.append({"file": path.name, "prompt": prompt, "method": cfg.method, "index": index}
                           | ({"frames": path.with_suffix(".npy").name} if cfg.raw_frames else {}))
    bar.close()
    seconds = time.perf_counter() - start
    sheet = tile(to_uint8(torch.cat([s.movedim(1, 0) for s in sheets])), columns=columns)
    save_png(sheet, out / f"contact_sheet_{name}.png")
    summary = {
        "samples": samples, "num_frames": cfg.num_frames, "chunk_frames": plan.chunk, "context_frames": plan.context,
        "chunks": _chunk_count(plan, cfg), "boundaries": boundaries, "seconds": round(seconds, 2),
        "frames_per_second": round(cfg.num_frames * len(cfg.prompts) / seconds, 3), "config": config_to_dict(cfg),
    }
    atomic_write_json(out / f"generation_{name}.json", summary)
    log(f"generated {len(samples)} videos × {cfg.num_frames} frames in {seconds:.1f} s → {out}")
    return summary


def _chunk_count(plan: Plan, cfg: GenerateConfig) -> int:
    """Sampled chunks per batch of prompts."""
    if cfg.mode == "autoregressive":
        return 1 + max(0, math.ceil((plan.total - plan.chunk) / (plan.chunk - plan.known)))
    keys = math.ceil((plan.total - 1) / cfg.frame_skip) + 1
    key_chunks = 1 + max(0, math.ceil((keys - plan.chunk) / (plan.chunk - plan.known)))
    step = max((plan.chunk - 1) // cfg.frame_skip, 1) * cfg.frame_skip
    return key_chunks + len(range(0, (keys - 1) * cfg.frame_skip, step))
