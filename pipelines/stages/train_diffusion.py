"""Stage 2 training: the space-time U-Net on cached latent clips (or on videos encoded on the fly).

``train_diffusion(config)`` is what ``scripts/train_diffusion.py`` runs, on the shared loop of
:mod:`pipelines.core.loop` (processes, bf16, gradient accumulation, EMA, checkpoints, resume), data parallel or,
with ``run.sharding=fsdp2``, sharded block by block (:mod:`pipelines.core.sharded`). This module adds
what is the diffusion model's own: where clips come from and where their windows lie, joint image–video batches
(paper §3), conditioning dropout for classifier-free guidance, frame-position policy, known first frames (and
for a network trained for conditional generation, and sample videos.

Every random draw of a training sample (its window, appended frames, noise level, noise, conditioning dropout,
hidden start, known frames) comes from a generator keyed by the run's seed and the sample's *slot*, its
place in the sequence of all samples of the run. A slot does not depend on how the global batch is split into
processes and micro-batches, so one process at batch 8, two at batch 4 and one at batch 4 with ``grad_accum=2``
train the same model (up to floating-point reduction order). Network dropout is the one exception: it draws from
torch's global generator, reseeded per step and process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
from einops import rearrange
from torch import Tensor, nn

from autoencoder import decode_video, encode_video, load_autoencoder
from diffusion import EMA, Denoiser, NoiseSchedule, diffusion_loss
from pipelines.core.config import ConfigError, UserError, config_to_dict
from pipelines.core.devices import autocast, to_device, vae_dtype
from pipelines.core.draws import SampleDraws
from pipelines.core.files import atomic_write_json
from pipelines.core.loop import (
    Phase,
    TensorBundle,
    TrainingState,
    finish_run,
    index_batches,
    make_accelerator,
    make_optimizer,
    start_run,
    train_loop,
)
from pipelines.core.sharded import Sharding, start_sharding
from pipelines.core.visual import save_contact_sheet
from pipelines.latents.shards import LatentDataset
from pipelines.media.datasets import ImageDataset, VideoClipDataset
from pipelines.models.conditioning import TextConditioning
from pipelines.models.config import DiffusionModelConfig
from pipelines.models.diffusion import DiffusionBundle, build_unet, build_unet_config, sample, unet_blocks
from pipelines.models.text import build_text_encoder, text_blocks
from pipelines.stages.configs import DiffusionDataConfig, DiffusionTrainConfig


class DiffusionObjective(nn.Module):
    """The per-sample loss ``[b]`` of latent clips (EDM-short: the policies are the functions it calls), as one
    module so data parallelism wraps the U-Net and a trainable text encoder together."""

    def __init__(self, denoiser: Denoiser, text: TextConditioning, schedule: NoiseSchedule,
                 model: DiffusionModelConfig):
        super().__init__()
        self.denoiser, self.text, self.schedule, self.model = denoiser, text, schedule, model

    def forward(self, latents: Tensor, batch: dict, draws: SampleDraws, num_images: int,
                known: Optional[Tensor] = None) -> Tensor:
        """``known``: how many first frames each clip is given ``[b]`` (:func:`draw_windows`); None: none."""
        model = self.model
        conditioning, null = per_frame_conditioning(self.text, batch, latents.shape[2] - num_images)
        extra = {"video_start": video_start(batch, draws, model.p_unknown_start)} if model.unet.frame_positions \
            else {}
        if model.unet.known_frames and known is not None:
            mask = known_first_frames(known, latents.shape[2] - num_images, num_images)
            extra.update(known=latents, known_mask=mask, loss_mask=~mask[:, None, :, None, None])
        return diffusion_loss(self.denoiser, latents, self.schedule, conditioning, null, model.p_uncond,
                              model.weighting, t=draws.times(),
                              noise=draws.normal(tuple(latents.shape[1:])), drop_uniform=draws.uniform(),
                              num_images=num_images, **extra)


def known_counts(draws: SampleDraws, frames: int, p_known: float, max_known: int) -> Tensor:
    """``[b]``: how many first frames each clip of a ``frames``-frame window is given. With probability
    ``p_known`` a clip is given its first ``k ~ U{1, …, min(max_known, frames − 1)}`` frames (what an extension
    chunk is given: the last frames generated so far), so one network learns both to start a video and to
    continue one; otherwise none (0)."""
    given = (draws.uniform() < p_known) & (frames > 1)  # a one-frame window has nothing left to continue
    k = 1 + draws.integers(max(min(max_known, frames - 1), 1))[:, 0]
    return torch.where(given, k, torch.zeros_like(k))


def known_first_frames(counts: Tensor, frames: int, num_images: int) -> Tensor:
    """``[b, frames + num_images]`` bools: each clip's first ``counts`` frames; appended images are never given.
    The loss leaves the given frames out."""
    return torch.arange(frames + num_images, device=counts.device)[None, :] < counts[:, None]


@dataclasses.dataclass
class Windows:
    """Where each training clip's window lies in its cached clip, and what it is given (:func:`draw_windows`)."""

    first: Tensor  # [b] the window's first frame within its clip
    known: Optional[Tensor]  # [b] first frames given as input (unet.known_frames), None without known frames


def draw_windows(draws: SampleDraws, clip_frames: int, num_frames: int, model: DiffusionModelConfig) -> Windows:
    """Each clip's window of ``num_frames`` of its ``clip_frames`` cached frames.

    ``model.window = "random"``: anywhere. ``"first_unless_known"``: a clip given no known frames starts at its
    first frame (a first chunk starts its video, and with ``unet.frame_positions`` learns the frame-0 prior), a
    clip given known frames anywhere (an extension chunk's context lies anywhere in a video)."""
    if clip_frames < num_frames:
        raise ConfigError(f"data.num_frames: the data has {clip_frames}-frame clips, fewer than data.num_frames="
                          f"{num_frames}")
    first = draws.integers(clip_frames - num_frames + 1)[:, 0]
    known = known_counts(draws, num_frames, model.p_known, model.max_known) if model.unet.known_frames else None
    if model.window == "first_unless_known":
        first = torch.where(known > 0, first, 0) if known is not None else torch.zeros_like(first)
    return Windows(first, known)


def per_frame_conditioning(text: TextConditioning, batch: dict, frames: int) -> tuple[dict, Optional[dict]]:
    """(conditioning, null) for the U-Net: per sample, or per frame ``[b, f + images, ...]`` when the batch carries
    appended images with captions of their own (``image_caption``: b lists of ``images``)."""
    captions = list(batch["caption"])
    image_captions = [c for row in batch.get("image_caption", []) for c in row]
    cached = batch.get("cached_text")
    if cached is not None and image_captions:  # shards hold the videos' embeddings; images are encoded now
        images, null = text(image_captions)
        emb = {k: torch.cat([v, images[k].to(v.dtype)]) for k, v in cached.items() if k in images}
    else:
        emb, null = text(captions + image_captions, cached)
    b = len(captions)
    video = {k: v[:b] for k, v in emb.items()}
    if not image_captions or not video:
        return video, null
    images = len(image_captions) // b
    return {k: torch.cat([video[k][:, None].expand(b, frames, *v.shape[1:]),
                          emb[k][b : b + b * images].reshape(b, images, *v.shape[1:])], dim=1)
            for k, v in video.items()}, null


def video_start(batch: dict, draws: SampleDraws, p_unknown_start: float) -> Tensor:
    """Which clips the U-Net is told start their video (frame-position embeddings): those whose window begins
    at frame 0 of the *source video* (not of the cached clip), each kept with probability ``1 − p_unknown_start``,
    so one network also learns the position-free mode that extension chunks are sampled in."""
    starts = batch["source_start"].to(draws.device)
    return (starts == 0) & (draws.uniform() >= p_unknown_start)


def crop_and_append(latents: Tensor, windows: Windows, num_frames: int, images: int, draws: SampleDraws) -> Tensor:
    """Each clip's window of ``num_frames`` frames (``windows``), then ``images`` random frames of the same clip
    appended as independent images (paper §3, joint training): ``[b, c, num_frames + images, h, w]``."""
    f = latents.shape[2]
    window = windows.first.to(latents.device)[:, None] + torch.arange(num_frames, device=latents.device)
    if images:
        window = torch.cat([window, draws.integers(f, images).to(latents.device)], dim=1)
    index = window[:, None, :, None, None].expand(-1, latents.shape[1], -1, *latents.shape[3:])
    return latents.gather(2, index)


class _Source:
    """Where training clips come from: latent shards, or videos encoded on the fly by a frozen VAE; and, for joint
    training with an image folder, the images appended to each clip (encoded on the fly)."""

    def __init__(self, cfg: DiffusionDataConfig, text_cfg, device: torch.device, seed: int, log=print):
        self.vae, self.images, self.cfg, self.cached_null, self.use_cached_text = None, None, cfg, None, False
        if cfg.latents:
            self.dataset = LatentDataset(cfg.latents)
            manifest = self.dataset.manifest
            self.autoencoder = cfg.autoencoder or manifest["autoencoder"]
            self.shape = list(manifest["latent_shape"])
            self.clip = manifest.get("clip")  # how the clips were cut: generate reads given videos alike
            self.use_cached_text = self.dataset.made_by_text_encoder(text_cfg)
            if manifest.get("has_cond") and not self.use_cached_text:
                log("note: the shards' text embeddings come from another text encoder than text.*: not used")
            self.cached_null = self.dataset.null_text() if self.use_cached_text else None
        elif cfg.videos:
            self.dataset = VideoClipDataset(cfg.videos, cfg.clip, cfg.captions, seed=seed)
            self.autoencoder = cfg.autoencoder
            self.clip = config_to_dict(cfg.clip)
            self._load_vae(device)
            factor = self.vae.config.downsample_factor
            self.shape = [self.vae.config.z_channels, cfg.clip.num_frames, cfg.clip.size // factor,
                          cfg.clip.size // factor]
        else:
            raise ConfigError("data.latents: give data.latents (from scripts/encode_latents.py) or data.videos")
        self.shape[1] = cfg.num_frames
        if cfg.images and cfg.images_per_video:
            self._load_vae(device)
            factor = self.vae.config.downsample_factor
            size = (self.shape[2] * factor, self.shape[3] * factor)
            self.images = ImageDataset(cfg.images, size, crop="random", captions=cfg.image_captions, seed=seed)

    def _load_vae(self, device: torch.device) -> None:
        if self.vae is None:
            if not self.autoencoder:
                raise ConfigError("data.autoencoder is required to encode videos or images on the fly "
                                  "(or give data.latents)")
            self.vae = load_autoencoder(self.autoencoder, device=device, dtype=vae_dtype(self.cfg.vae_dtype, device))

    def encode(self, video: Tensor) -> Tensor:
        """Latents ``[b, c, f, h, w]`` (float32) of pixels ``[b, 3, f, H, W]``: posterior samples of the frozen VAE, in
        its own precision (``data.vae_dtype``), outside the training step's autocast (:func:`encode_video`)."""
        with torch.no_grad():
            return encode_video(self.vae, video, sample=True)

    def latents(self, batch: dict, device: torch.device) -> Tensor:
        """The batch's clips as latents ``[b, c, F, h, w]``."""
        if "latents" in batch:
            return batch["latents"].to(device)
        return self.encode(batch["video"].to(device))

    def training_clips(self, batch: dict, device: torch.device, draws: SampleDraws,
                       model: DiffusionModelConfig) -> tuple[Tensor, Windows]:
        """Cropped clips with their appended images ``[b, c, f + images, h, w]`` and their windows
        (:func:`draw_windows`); each window's first frame in its source video (``source_start``), cached text
        embeddings and image captions go into the batch."""
        images = self.cfg.images_per_video
        clips = self.latents(batch, device)
        windows = draw_windows(draws, clips.shape[2], self.cfg.num_frames, model)
        latents = crop_and_append(clips, windows, self.cfg.num_frames, 0 if self.images else images, draws)
        batch["source_start"] = batch["frame_indices"].to(device).gather(1, windows.first.to(device)[:, None])[:, 0]
        if self.use_cached_text:
            batch["cached_text"] = {k: batch[k] for k in ("cond", "context") if k in batch}
        if self.images is None:
            return latents, windows
        b = latents.shape[0]
        picks = draws.integers(len(self.images), images, on_host=True).flatten().tolist()
        items = [self.images[i] for i in picks]
        pixels = rearrange(torch.stack([it["image"] for it in items]), "(b m) c h w -> b c m h w", b=b)
        image_latents = self.encode(to_device(pixels, device))
        batch["image_caption"] = [[it["caption"] for it in items[i * images : (i + 1) * images]] for i in range(b)]
        return torch.cat([latents, image_latents.to(latents.dtype)], dim=2), windows


def train_diffusion(cfg: DiffusionTrainConfig, log=print) -> dict:
    """Train (or resume) the diffusion model; returns ``{"steps", "started_at_step", "seconds", "final_loss",
    "skipped_steps"}``."""
    accelerator = make_accelerator(cfg.run)
    device = accelerator.device
    source = _Source(cfg.data, cfg.text, device, cfg.run.seed, log)
    torch.manual_seed(cfg.run.seed)  # initial weights are a function of the seed
    text = TextConditioning(build_text_encoder(cfg.text), cfg.text, source.cached_null)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, unet=build_unet_config(cfg.model, cfg.text, text.encoder, source.shape[0])))
    out = start_run(accelerator, cfg, cfg.run, "diffusion", ("model", "text"))
    net = build_unet(cfg.model.unet, device)
    if cfg.run.compile:
        net.compile()  # in place: the same parameters and state dict, compiled at its first calls
    objective = DiffusionObjective(Denoiser(net, cfg.model.prediction), text, NoiseSchedule.of(cfg.model.schedule),
                                   cfg.model)
    objective.text.to_device(device)
    sharding = _shard(objective, cfg.run.mixed_precision, device) if cfg.run.sharding == "fsdp2" else None
    optimizer = make_optimizer(objective.parameters(), cfg.optim)  # of the sharded parameters, under sharding
    if sharding is None:  # data parallel: accelerate's DDP (sharded modules are not prepared)
        objective, optimizer = accelerator.prepare(objective, optimizer)
    raw = accelerator.unwrap_model(objective)
    state = TrainingState(*_trained(raw, cfg.run.ema_decay, optimizer), sharded=sharding is not None)
    state.maybe_resume(out / "checkpoints", cfg.run.resume, log, config_to_dict(cfg), ("model", "text"), accelerator)
    started_at = state.step  # 0: a fresh run; run.steps: everything reused
    global_batch = cfg.run.batch_size * accelerator.num_processes * cfg.run.grad_accum

    def loss(batch: dict, generator) -> tuple[Tensor, dict[str, Tensor]]:
        draws = SampleDraws(cfg.run.seed, batch["slot"], global_batch, device)
        clips, windows = source.training_clips(batch, device, draws, cfg.model)
        value = objective(clips, batch, draws, cfg.data.images_per_video, windows.known).mean()
        return value, {"loss": value.detach()}  # read at the next loss-log row, not now

    info = {"latent_shape": source.shape, "autoencoder": source.autoencoder, "clip": source.clip}
    checkpoint = lambda: state.save(accelerator, out / "checkpoints", config_to_dict(cfg),  # noqa: E731
                                    cfg.run.keep_checkpoints, info=info)
    samples = lambda step: _samples(cfg, accelerator, raw, state.emas, source,  # noqa: E731
                                    out / "samples" / f"step_{step:07d}", sharded=sharding is not None)
    phases = [Phase("main", optimizer, (objective,), loss, cfg.optim.lr)]
    losses = train_loop(cfg.run, cfg.optim, accelerator, state, index_batches(source.dataset, cfg.run, accelerator,
                        state.step), phases, desc="diffusion", checkpoint=checkpoint, sample=samples,
                        plot_keys=["loss"])
    values = [r["loss"] for r in losses.rows if "loss" in r][-10:]
    summary = {"steps": state.step, "started_at_step": started_at, "seconds": round(state.seconds, 2),
               "final_loss": float(sum(values) / len(values)) if values else float("nan"),
               "skipped_steps": state.skipped_steps}
    if accelerator.is_main_process:
        atomic_write_json(out / "summary.json", summary)
        log(f"diffusion: {json.dumps(summary)}")
    finish_run(accelerator)
    if sharding is not None:
        sharding.close()
    return summary


def _shard(objective: DiffusionObjective, mixed_precision: str, device: torch.device) -> Sharding:
    """FSDP2 over the trained modules (in place): the U-Net with each of its blocks a unit, a trainable text
    encoder with each transformer layer a unit. All processes built the same initial weights from the seed, so
    each keeps its shard of them; nothing is broadcast."""
    sharding = start_sharding(device, mixed_precision)
    objective.to(device)
    sharding.shard(objective.denoiser.net, unet_blocks(objective.denoiser.net))
    if objective.text.trainable is not None:
        sharding.shard(objective.text.trainable, text_blocks(objective.text.trainable))
    return sharding


def _trained(raw: DiffusionObjective, ema_decay: float, optimizer) -> tuple[dict, dict, dict]:
    """(modules, optimisers, EMAs) a checkpoint saves: the U-Net, a trainable text encoder, the frozen
    encoder's null conditioning."""
    modules: dict[str, nn.Module] = {"unet": raw.denoiser.net}
    if raw.text.trainable is not None:
        modules["text"] = raw.text.trainable
    if raw.text.frozen_null() is not None:
        modules["null_text"] = TensorBundle(raw.text.frozen_null())
    emas = {name: EMA(modules[name], ema_decay) for name in ("unet", "text") if name in modules} if ema_decay else {}
    return modules, {"main": optimizer}, emas


@contextlib.contextmanager
def _ema_weights(modules: dict[str, nn.Module], emas: dict) -> Iterator[None]:
    """The EMA weights in ``modules`` for the block (copied in place: into the shards of a sharded module), the
    trained ones again after. A sharded module's ``load_state_dict`` first frees the weights its forward passes
    gathered (FSDP2's pre-load hook), so no gathered EMA weight outlives the block."""
    saved = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in modules.items()}
    for name, ema in emas.items():
        ema.copy_to(modules[name])
    try:
        yield
    finally:
        for name, module in modules.items():
            module.load_state_dict(saved[name])


@torch.no_grad()
def _samples(cfg, accelerator, raw: DiffusionObjective, emas: dict, source: _Source, prefix: Path,
             sharded: bool = False) -> None:
    """Sample the prompts with the EMA weights; write a contact sheet (and videos when a VAE is at hand).

    Data parallel, the main process samples alone. Sharded, every process runs the same sampler with the same
    seed through its shards (each forward gathers the weights from all), with the EMA swapped into the shards
    in place and swapped out after; the main process writes."""
    if not (accelerator.is_main_process or sharded) or not cfg.sample_prompts:
        return
    from pipelines.media.video_io import write_video

    modules = {name: m for name, m in {"unet": raw.denoiser.net, "text": raw.text.trainable}.items() if m is not None}
    bundle = DiffusionBundle(raw.denoiser, raw.text.encoder, cfg.text, cfg.model, source.shape, source.autoencoder,
                             null_cache=raw.text.frozen_null())
    with _ema_weights(modules, emas):
        raw.denoiser.eval()
        try:  # sharded weights are gathered in the compute dtype (bf16): autocast as in training
            with accelerator.autocast() if sharded else autocast(accelerator.device, cfg.run.mixed_precision):
                denoise = bundle.denoise_fn(cfg.sample_prompts, cfg.sampling)
                generator = torch.Generator(accelerator.device).manual_seed(cfg.run.seed)
                latents = sample(bundle, denoise, (len(cfg.sample_prompts), *source.shape), cfg.sampling, generator)
        finally:
            raw.denoiser.train()
    if not accelerator.is_main_process:
        return
    try:
        vae = source.vae or (load_autoencoder(source.autoencoder, device=accelerator.device,
                                              dtype=vae_dtype(cfg.data.vae_dtype, accelerator.device))
                             if source.autoencoder else None)
    except (FileNotFoundError, UserError):
        vae = None  # the shards' VAE moved: sample sheets need it, training does not
    if vae is None:
        return
    videos = decode_video(vae, latents).clamp(-1, 1).cpu()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    save_contact_sheet(videos, prefix.with_suffix(".png"))
    for i, video in enumerate(videos):
        write_video(prefix.parent / f"{prefix.name}_{i}.mp4", video)
