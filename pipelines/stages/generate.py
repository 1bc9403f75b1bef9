"""``scripts/generate.py``: videos of any length from prompts, or from frames the user brings (``condition``):
continue a clip, animate an image, fill in a low-frame-rate video, enlarge a small one (paper §3.1).

Inputs are read and checked first (:mod:`pipelines.stages.given`), so bad input stops the command before it
writes anything. Latents are sampled batch by batch (:mod:`pipelines.stages.long_video`), then decoded chunk by
chunk and streamed into each video file, so memory stays flat as the length grows. The given frames appear in the
output as given (resized to the model's frames), not as their autoencoder reconstructions.
"""

from __future__ import annotations

import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from autoencoder import decode_video, encode_video, load_autoencoder
from pipelines.core.config import UserError, config_to_dict, save_resolved_config
from pipelines.core.devices import autocast, configure_numerics, resolve_device, vae_dtype
from pipelines.core.files import atomic_write_json
from pipelines.core.visual import save_png, tile, to_uint8
from pipelines.media.config import ClipSpec
from pipelines.models.diffusion import DiffusionBundle, load_diffusion
from pipelines.stages.configs import GenerateConfig
from pipelines.stages.given import GivenFrames, read_given
from pipelines.stages.long_video import autoregressive, chunk_count, hierarchical, infill, upscale


@dataclass
class Job:
    """A batch of videos sampled together: their prompts and, when the user gave frames, those."""

    prompts: list[str]
    given: list[GivenFrames] = field(default_factory=list)

    @property
    def given_count(self) -> int:
        return self.given[0].count if self.given else 0


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe version of a prompt."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "video"


def output_name(cfg: GenerateConfig) -> str:
    """The file-name suffix: ``cfg.name``, or the method with the mode or the condition's task."""
    if cfg.name:
        return cfg.name
    if cfg.condition.image is not None:
        return f"{cfg.method}_image"
    if cfg.condition.video is not None:
        return f"{cfg.method}_{cfg.condition.task}"
    return cfg.method if cfg.mode == "autoregressive" else f"{cfg.method}_{cfg.mode}"


def make_jobs(cfg: GenerateConfig, given: list[GivenFrames]) -> list[Job]:
    """Batches of at most ``cfg.batch_size`` videos: one per prompt, or one per input whose prompt is the only
    prompt, its own, or the null caption; inputs batch together only when they give as many frames."""
    if not given:
        return [Job(cfg.prompts[i : i + cfg.batch_size]) for i in range(0, len(cfg.prompts), cfg.batch_size)]
    if len(cfg.prompts) not in (0, 1, len(given)):
        raise UserError(f"prompts: {len(cfg.prompts)} prompts for {len(given)} inputs; give none, one, or one per "
                        f"input")
    prompts = cfg.prompts if len(cfg.prompts) == len(given) else (cfg.prompts or [""]) * len(given)
    jobs: list[Job] = []
    for prompt, item in zip(prompts, given):
        if jobs and len(jobs[-1].prompts) < cfg.batch_size and jobs[-1].given_count == item.count \
                and jobs[-1].given[0].video.shape == item.video.shape:
            jobs[-1].prompts.append(prompt)
            jobs[-1].given.append(item)
        else:
            jobs.append(Job([prompt], [item]))
    return jobs


def sample_job(job: Job, cfg: GenerateConfig, bundle: DiffusionBundle, keyframe_bundle: DiffusionBundle, vae,
               chunk: int, generator: torch.Generator, on_chunk) -> tuple[Tensor, list[int]]:
    """Latents ``[b, c, f, h, w]`` of one job and the output indices where its chunks after the first start."""
    if not job.given:
        if cfg.mode == "hierarchical":
            return hierarchical(keyframe_bundle, bundle, job.prompts, cfg, chunk, generator, on_chunk)
        return autoregressive(bundle, job.prompts, cfg, chunk, generator, on_chunk=on_chunk)
    pixels = torch.stack([item.video for item in job.given]).to(generator.device)  # [b, 3, g, H, W]
    if cfg.condition.task == "upscale" and cfg.condition.image is None:
        return upscale(bundle, job.prompts, pixels, vae, cfg, chunk, generator, on_chunk)
    latents = encode_video(vae, pixels)
    if cfg.condition.task == "interpolate" and cfg.condition.image is None:
        keys, starts = infill(bundle, job.prompts, latents, cfg.condition.every, cfg, chunk, generator, on_chunk)
        if keys.shape[2] >= cfg.num_frames:
            return keys[:, :, : cfg.num_frames], starts
        video, more = autoregressive(bundle, job.prompts, cfg, chunk, generator, start=keys, on_chunk=on_chunk)
        return video, starts + more
    return autoregressive(bundle, job.prompts, cfg, chunk, generator, start=latents, on_chunk=on_chunk)


def given_positions(cfg: GenerateConfig, count: int) -> list[int]:
    """Output frame indices the given frames occupy (none when enlarging: the output is new at every frame)."""
    if cfg.condition.image is not None:
        return [0]
    if cfg.condition.task == "upscale":
        return []
    if cfg.condition.task == "interpolate":
        return list(range(0, (count - 1) * cfg.condition.every + 1, cfg.condition.every))
    return list(range(count))


class _Writer:
    """Decode latents in chunks and write each video as it comes (memory flat in the length), the given frames as
    given, keeping only the frames a contact sheet shows; with ``raw_frames`` also every frame losslessly."""

    def __init__(self, vae, decode_chunk: int, fps: float, sheet_frames: list[int], raw_frames: bool = False):
        self.vae, self.decode_chunk, self.fps, self.sheet_frames = vae, decode_chunk, fps, sheet_frames
        self.raw_frames = raw_frames

    @torch.no_grad()
    def write(self, latents: Tensor, path: Path, gif: bool, given: Optional[Tensor] = None,
              positions: tuple[int, ...] = ()) -> Tensor:
        """Write one video ``latents [c, f, h, w]`` to ``path`` (and ``path.with_suffix(".npy")`` with
        ``raw_frames``), frames ``positions`` replaced by ``given [3, len(positions), H, W]``; returns its
        contact-sheet frames ``[3, n, H, W]``."""
        from pipelines.media.video_io import FramesWriter, VideoWriter, write_gif

        device = next(self.vae.parameters()).device
        shown, gif_frames = [], []
        raw = FramesWriter(path.with_suffix(".npy"), latents.shape[1]) if self.raw_frames else nullcontext()
        with VideoWriter(path, fps=self.fps) as writer, raw as lossless:
            for start in range(0, latents.shape[1], self.decode_chunk):
                piece = latents[None, :, start : start + self.decode_chunk].to(device)
                video = decode_video(self.vae, piece, self.decode_chunk)[0].clamp(-1, 1).cpu()  # [3, n, H, W]
                for j, position in enumerate(positions):
                    if start <= position < start + video.shape[1]:
                        video[:, position - start] = given[:, j]
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


def model_frame_size(bundle: DiffusionBundle, vae) -> tuple[int, int]:
    """``(H, W)`` of the model's frames: its latent size times the autoencoder's factor."""
    factor = vae.config.downsample_factor
    return bundle.latent_shape[2] * factor, bundle.latent_shape[3] * factor


def training_clip_spec(bundle: DiffusionBundle) -> Optional[ClipSpec]:
    """The clip spec the model's training clips were cut with (its frame rate), when the run recorded it."""
    clip = bundle.info.get("clip")
    return None if clip is None else ClipSpec(**clip)


def sampling_precision(cfg: GenerateConfig, bundle: DiffusionBundle) -> str:
    """The U-Net's autocast while sampling: ``cfg.mixed_precision``, or with ``auto`` the training run's."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return bundle.info.get("config", {}).get("run", {}).get("mixed_precision", "no")


@torch.no_grad()  # reconstruction guidance enables gradients for its own computation only
def generate(cfg: GenerateConfig, log=print) -> dict:
    """Generate into ``cfg.out_dir``: videos, a contact sheet and ``generation_<name>.json``. On a GPU the U-Net
    samples under the training run's autocast (``mixed_precision``) with TF32, the VAE in ``vae_dtype``."""
    device = resolve_device(cfg.device)
    configure_numerics(device)
    bundle = load_diffusion(cfg.model, device, use_ema=cfg.use_ema)
    keyframe_bundle = load_diffusion(cfg.keyframe_model, device, cfg.use_ema) if cfg.keyframe_model else bundle
    vae_path = cfg.autoencoder or bundle.autoencoder
    if not vae_path:
        raise UserError("no autoencoder: set autoencoder=PATH (the model does not record one)")
    vae = load_autoencoder(vae_path, device=device, dtype=vae_dtype(cfg.vae_dtype, device))
    given = read_given(cfg.condition, model_frame_size(bundle, vae), training_clip_spec(bundle),
                       cfg.num_frames) if cfg.condition.given else []
    jobs = make_jobs(cfg, given)  # every input read and checked: nothing is written before this line
    chunk = cfg.chunk_frames or bundle.latent_shape[1]
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out, "generate.yaml")
    name = output_name(cfg)
    total_frames = [_output_frames(cfg, job.given_count) for job in jobs]
    columns = min(max(total_frames), 16)
    samples, sheets, start = [], [], time.perf_counter()
    bar = tqdm(total=sum(chunk_count(cfg, chunk, job.given_count) for job in jobs), desc=f"generating ({name})",
               unit="chunk")
    generator = torch.Generator(device).manual_seed(cfg.seed)
    index = 0
    for job, frames in zip(jobs, total_frames):
        with autocast(device, sampling_precision(cfg, bundle)):
            latents, boundaries = sample_job(job, cfg, bundle, keyframe_bundle, vae, chunk, generator,
                                             on_chunk=lambda _: bar.update(1))
        positions = tuple(given_positions(cfg, job.given_count)) if job.given else ()
        writer = _Writer(vae, cfg.decode_chunk_frames, cfg.fps,
                         torch.linspace(0, frames - 1, columns).round().long().tolist(), cfg.raw_frames)
        for i, prompt in enumerate(job.prompts):
            item = job.given[i] if job.given else None
            stem = slug(item.source.stem if item is not None else prompt)
            path = out / f"{index:03d}_{stem}_{name}.mp4"
            shown = item.video[:, : len(positions)] if positions else None
            sheets.append(writer.write(latents[i], path, cfg.gif, shown, positions))
            samples.append({"file": path.name, "prompt": prompt, "method": cfg.method, "index": index,
                            "num_frames": latents.shape[2], "boundaries": boundaries}
                           | ({"source": str(item.source), "given_frames": list(positions)} if item else {})
                           | ({"frames": path.with_suffix(".npy").name} if cfg.raw_frames else {}))
            index += 1
    bar.close()
    seconds = time.perf_counter() - start
    sheet = tile(to_uint8(torch.cat([s.movedim(1, 0) for s in sheets])), columns=columns)
    save_png(sheet, out / f"contact_sheet_{name}.png")
    summary = {
        "samples": samples, "num_frames": cfg.num_frames, "chunk_frames": chunk, "context_frames": cfg.context_frames,
        "chunks": chunk_count(cfg, chunk, jobs[0].given_count), "seconds": round(seconds, 2),
        "frames_per_second": round(sum(s["num_frames"] for s in samples) / seconds, 3),
        "config": config_to_dict(cfg),
    }
    atomic_write_json(out / f"generation_{name}.json", summary)
    log(f"generated {len(samples)} videos in {seconds:.1f} s → {out}")
    return summary


def _output_frames(cfg: GenerateConfig, given: int) -> int:
    """Frames of each output video: ``num_frames``, or as many as given when enlarging."""
    return given if given and cfg.condition.task == "upscale" and cfg.condition.image is None else cfg.num_frames

