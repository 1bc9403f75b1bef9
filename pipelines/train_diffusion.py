"""Stage 2 training: the space-time U-Net on cached latent clips (or on videos encoded on the fly).

``train_diffusion(config)`` is what ``scripts/train_diffusion.py`` runs: accelerate (processes, GPUs, bf16,
gradient accumulation; FSDP / DeepSpeed through accelerate's own config), gradient checkpointing, EMA,
conditioning dropout for classifier-free guidance, joint image–video batches, periodic sample videos, loss curves
(CSV + PNG) and checkpoints holding the full training state, resumed automatically.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from autoencoder import decode_video, encode_video, load_autoencoder
from diffusion import EMA, Denoiser, UNet3D, diffusion_loss
from pipelines.checkpoint import atomic_write_json
from pipelines.config import config_to_dict, save_resolved_config
from pipelines.data import ImageDataset, VideoClipDataset, collate
from pipelines.latents import ClipConfig, LatentDataset
from pipelines.model import DiffusionBundle, DiffusionModelConfig, SamplingConfig, build_unet_config, sample
from pipelines.text import TextConfig, build_text_encoder, is_trainable, select
from pipelines.training import (
    EpochView,
    IndexStream,
    OptimConfig,
    RunConfig,
    TensorBundle,
    Timer,
    TrainingState,
    make_accelerator,
    make_optimizer,
    seed_step,
    set_lr,
)
from pipelines.visual import LossLog, save_contact_sheet


@dataclass
class DiffusionDataConfig:
    """Training clips: latent shards (``latents``) or, without them, videos encoded on the fly."""

    latents: Optional[str] = "outputs/latents"
    videos: list[str] = field(default_factory=list)  # used when latents is None
    captions: Optional[str] = None
    autoencoder: Optional[str] = None  # for on-the-fly encoding and sample videos (default: the shards')
    clip: ClipConfig = field(default_factory=lambda: ClipConfig(start="random"))  # on-the-fly clips
    num_frames: int = 16  # frames per training clip: a random window of each cached clip
    images_per_video: int = 0  # joint image–video training: independent images appended to each clip
    images: list[str] = field(default_factory=list)  # image folders to draw them from (default: other frames
    image_captions: Optional[str] = None  # of the same clip); a captions manifest for the image folders


@dataclass
class DiffusionTrainConfig:
    """Everything ``scripts/train_diffusion.py`` reads."""

    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, betas=[0.9, 0.99], warmup_steps=100))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="outputs/diffusion", ema_decay=0.9999))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sample_prompts: list[str] = field(default_factory=list)


class DiffusionObjective(nn.Module):
    """The per-sample loss ``[b]`` of a batch of latent clips, text encoding included, as one module (so
    accelerate wraps the U-Net and a trainable text encoder together for data parallelism)."""

    def __init__(self, denoiser: Denoiser, text_encoder: Optional[nn.Module], model: DiffusionModelConfig,
                 text: TextConfig):
        super().__init__()
        self.denoiser, self.model_cfg, self.use_tokens = denoiser, model, text.use_tokens
        self.text_encoder = text_encoder if is_trainable(text_encoder) else None  # frozen ones stay outside
        self._frozen = None if is_trainable(text_encoder) else text_encoder

    def _embed(self, captions: list[str]) -> dict[str, Tensor]:
        """U-Net conditioning for captions (trainable encoder with gradients, frozen one without)."""
        if self.text_encoder is not None:
            return select(self.text_encoder(captions), self.use_tokens)
        with torch.no_grad():
            return select(self._frozen(captions), self.use_tokens)

    def conditioning(self, batch: dict, null: Optional[dict], frames: int) -> tuple[dict, Optional[dict]]:
        """(conditioning, null conditioning) for the U-Net: per sample, or per frame ``[b, f + m, ...]`` when the
        batch carries ``m`` appended images with captions of their own (``image_caption``: b lists of m)."""
        if self.text_encoder is None and self._frozen is None:
            return {}, None
        captions = list(batch["caption"])
        image_captions = [c for row in batch.get("image_caption", []) for c in row]
        if self.text_encoder is not None:  # trainable: captions, image captions and "" in one pass
            emb = self._embed(captions + image_captions + [""])
            null = {k: v[-1:] for k, v in emb.items()}
        elif "cond" in batch:  # frozen embeddings cached in the shards
            emb = select({k: batch[k] for k in ("cond", "context") if k in batch}, self.use_tokens)
            if image_captions:
                emb = {k: torch.cat([v, self._embed(image_captions)[k].to(v.dtype)]) for k, v in emb.items()}
        else:
            emb = self._embed(captions + image_captions)
        b = len(captions)
        video = {k: v[:b] for k, v in emb.items()}
        if not image_captions:
            return video, null
        m = len(image_captions) // b
        return {k: torch.cat([video[k][:, None].expand(b, frames, *v.shape[1:]),
                              emb[k][b : b + b * m].reshape(b, m, *v.shape[1:])], dim=1)
                for k, v in video.items()}, null

    def video_start(self, batch: dict, generator: torch.Generator) -> Tensor:
        """Which clips the U-Net is told start their video (frame-position embeddings, when it has them): those
        cropped from frame 0, each kept with probability ``1 − p_unknown_start``, so one network also learns
        the position-free mode that extension chunks are sampled in."""
        starts = batch["clip_start"].to(generator.device)
        keep = torch.rand(len(starts), generator=generator, device=generator.device) >= self.model_cfg.p_unknown_start
        return (starts == 0) & keep

    def forward(self, latents: Tensor, batch: dict, null: Optional[dict], num_images: int,
                generator: torch.Generator) -> Tensor:
        frames = latents.shape[2] - num_images
        conditioning, null_conditioning = self.conditioning(batch, null, frames)
        m = self.model_cfg
        extra = {}
        if m.unet.frame_positions:
            extra["video_start"] = self.video_start(batch, generator).to(latents.device)
        return diffusion_loss(
            self.denoiser, latents, m.schedule, conditioning, null_conditioning, m.p_uncond, m.weighting,
            m.min_snr_gamma, generator, num_images=num_images, **extra,
        )


def crop_and_append(latents: Tensor, num_frames: int, images: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random window of ``num_frames`` frames of each clip ``[b, c, F, h, w]``, then ``images`` random frames of
    the same clip appended as independent images (paper §3, joint training): ``[b, c, num_frames + images, h, w]``,
    and each window's first frame ``[b]``."""
    b, _, f = latents.shape[:3]
    if f < num_frames:
        raise ValueError(f"the data has {f}-frame clips, fewer than data.num_frames={num_frames}")
    first = torch.randint(0, f - num_frames + 1, (b,), generator=generator)
    clips = [latents[i, :, s : s + num_frames] for i, s in enumerate(first.tolist())]
    if images:
        picks = torch.randint(0, f, (b, images), generator=generator)
        clips = [torch.cat([clip, latents[i, :, picks[i]]], dim=1) for i, clip in enumerate(clips)]
    return torch.stack(clips), first


class _Source:
    """Where training clips come from: latent shards, or videos encoded on the fly by a frozen VAE; and, for joint
    training with an image folder, the images appended to each clip (encoded on the fly)."""

    def __init__(self, cfg: DiffusionDataConfig, device: torch.device, seed: int):
        self.vae, self.images, self.cfg = None, None, cfg
        if cfg.latents:
            self.dataset = LatentDataset(cfg.latents)
            manifest = self.dataset.manifest
            self.autoencoder = cfg.autoencoder or manifest["autoencoder"]
            self.shape = list(manifest["latent_shape"])
            self.null = self.dataset.null_text()
        elif cfg.videos:
            self.dataset = VideoClipDataset(cfg.videos, cfg.clip.spec(), cfg.captions, seed=seed)
            self.autoencoder = cfg.autoencoder
            self._load_vae(device)
            factor = self.vae.config.downsample_factor
            self.shape = [self.vae.config.z_channels, cfg.clip.num_frames, cfg.clip.size // factor,
                          cfg.clip.size // factor]
            self.null = None
        else:
            raise ValueError("give data.latents (from scripts/encode_latents.py) or data.videos")
        self.shape[1] = cfg.num_frames
        if cfg.images and cfg.images_per_video:
            self._load_vae(device)
            factor = self.vae.config.downsample_factor
            size = (self.shape[2] * factor, self.shape[3] * factor)
            self.images = ImageDataset(cfg.images, size, crop="random", captions=cfg.image_captions, seed=seed)

    def _load_vae(self, device: torch.device) -> None:
        if self.vae is None:
            if not self.autoencoder:
                raise ValueError("data.autoencoder is required to encode videos or images on the fly "
                                 "(or give data.latents)")
            self.vae = load_autoencoder(self.autoencoder, device=device)

    def latents(self, batch: dict, device: torch.device) -> Tensor:
        """The batch's clips as latents ``[b, c, F, h, w]``."""
        if "latents" in batch:
            return batch["latents"].to(device)
        with torch.no_grad():
            return encode_video(self.vae, batch["video"].to(device), sample=True)

    def training_clips(self, batch: dict, device: torch.device, generator: torch.Generator) -> Tensor:
        """Cropped clips with their appended images ``[b, c, f + m, h, w]``; the windows' first frames
        (``clip_start``) and image captions go into the batch."""
        m = self.cfg.images_per_video
        latents, batch["clip_start"] = crop_and_append(self.latents(batch, device), self.cfg.num_frames,
                                                       0 if self.images else m, generator)
        if self.images is None:
            return latents
        b = latents.shape[0]
        picks = torch.randint(0, len(self.images), (b * m,), generator=generator, device=generator.device).tolist()
        items = [self.images[i] for i in picks]
        pixels = rearrange(torch.stack([it["image"] for it in items]), "(b m) c h w -> b c m h w", b=b).to(device)
        with torch.no_grad():
            image_latents = encode_video(self.vae, pixels, sample=True)
        batch["image_caption"] = [[it["caption"] for it in items[i * m : (i + 1) * m]] for i in range(b)]
        return torch.cat([latents, image_latents.to(latents.dtype)], dim=2)


def _batches(loader: DataLoader, device: torch.device):
    for batch in loader:
        yield {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def train_diffusion(cfg: DiffusionTrainConfig, log=print) -> dict:
    """Train (or resume) the diffusion model; returns ``{"steps", "seconds", "final_loss"}``."""
    accelerator = make_accelerator(cfg.run)
    device = accelerator.device
    out = Path(cfg.run.out_dir)
    source = _Source(cfg.data, device, cfg.run.seed)
    torch.manual_seed(cfg.run.seed)  # initial weights are a function of the seed
    text_encoder = build_text_encoder(cfg.text)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, unet=build_unet_config(cfg.model, cfg.text, text_encoder, source.shape[0])))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved_config(cfg, out)
    net = UNet3D(cfg.model.unet)
    objective = DiffusionObjective(Denoiser(net, cfg.model.prediction), text_encoder, cfg.model, cfg.text)
    if text_encoder is not None and not is_trainable(text_encoder):
        text_encoder.to(device)
    optimizer = make_optimizer(objective.parameters(), cfg.optim)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    raw = accelerator.unwrap_model(objective)
    null = {k: v.to(device) for k, v in source.null.items()} if source.null else None
    modules = {"unet": raw.denoiser.net}
    emas = {"unet": EMA(raw.denoiser.net, cfg.run.ema_decay)} if cfg.run.ema_decay > 0 else {}
    if raw.text_encoder is not None:
        modules["text"] = raw.text_encoder
        if emas:
            emas["text"] = EMA(raw.text_encoder, cfg.run.ema_decay)
    if null:
        modules["null_text"] = TensorBundle(null)
    state = TrainingState(modules, {"main": optimizer}, emas)
    state.maybe_resume(out / "checkpoints", cfg.run.resume, log)

    stream = IndexStream(len(source.dataset), cfg.run.batch_size, cfg.run.seed, accelerator.process_index,
                         accelerator.num_processes)
    loader = DataLoader(EpochView(source.dataset), batch_sampler=stream.batches(state.step * cfg.run.grad_accum),
                        num_workers=cfg.run.num_workers, collate_fn=collate,
                        generator=torch.Generator().manual_seed(cfg.run.seed))  # not the global RNG
    batches = _batches(loader, device)
    losses = LossLog(out / "loss.csv", resume_step=state.step) if accelerator.is_main_process else None
    info = {"latent_shape": source.shape, "autoencoder": source.autoencoder}
    timer = Timer(state)
    bar = tqdm(total=cfg.run.steps, initial=state.step, desc="diffusion", disable=not accelerator.is_main_process)
    recent: list[float] = []  # losses since the last log line (each step draws its own noise levels)
    while state.step < cfg.run.steps:
        generator = seed_step(cfg.run.seed, accelerator.process_index, state.step, device)
        lr = set_lr(optimizer, state.step, cfg.run.steps, cfg.optim)
        recent.append(_train_step(cfg, accelerator, objective, optimizer, batches, source, null, generator))
        for name, ema in emas.items():
            ema.update(modules[name])
        state.step += 1
        bar.update(1)
        if state.step % cfg.run.log_every == 0 or state.step == cfg.run.steps:
            if losses is not None:  # the main process logs; every process keeps only the current window
                losses.append(state.step, loss=sum(recent) / len(recent), lr=lr)
                bar.set_postfix(loss=f"{losses.last('loss'):.4f}")
            recent.clear()
        periodic = cfg.run.sample_every and state.step % cfg.run.sample_every == 0
        if state.step % cfg.run.checkpoint_every == 0 or state.step == cfg.run.steps or periodic:
            timer.pause()
            if state.step % cfg.run.checkpoint_every == 0 or state.step == cfg.run.steps:
                _save(state, accelerator, cfg, out, info)
            if periodic or state.step == cfg.run.steps:
                _samples(cfg, accelerator, raw, emas, null, source, out / "samples" / f"step_{state.step:07d}")
            timer.resume()
    bar.close()
    timer.pause()
    summary = {"steps": state.step, "seconds": round(state.seconds, 2),
               "final_loss": _smoothed_loss(losses) if losses is not None else float("nan")}
    if accelerator.is_main_process:
        if losses is not None:
            losses.plot(out / "loss.png", ["loss"], "diffusion")
        atomic_write_json(out / "summary.json", summary)
        log(f"diffusion: {json.dumps(summary)}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _smoothed_loss(losses: LossLog, window: int = 10) -> float:
    """Mean of the last ``window`` logged losses."""
    values = [r["loss"] for r in losses.rows if "loss" in r][-window:]
    return float(sum(values) / len(values)) if values else float("nan")


def _train_step(cfg, accelerator, objective, optimizer, batches, source: _Source, null, generator) -> float:
    """One optimiser step over ``grad_accum`` batches; returns the mean loss."""
    total = 0.0
    for _ in range(cfg.run.grad_accum):
        batch = next(batches)
        latents = source.training_clips(batch, accelerator.device, generator)
        with accelerator.autocast():
            loss = objective(latents, batch, null, cfg.data.images_per_video, generator).mean()
        accelerator.backward(loss / cfg.run.grad_accum)
        total += loss.item() / cfg.run.grad_accum
    if cfg.optim.max_grad_norm > 0:
        accelerator.clip_grad_norm_(objective.parameters(), cfg.optim.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def _save(state: TrainingState, accelerator, cfg: DiffusionTrainConfig, out: Path, info: dict) -> None:
    """A checkpoint with the full training state; the data facts generation needs go into its info."""
    saved = state.save(accelerator, out / "checkpoints", config_to_dict(cfg), cfg.run.keep_checkpoints)
    if saved is not None:
        trainer_state = json.loads((saved / "trainer_state.json").read_text())
        atomic_write_json(saved / "trainer_state.json", {**trainer_state, **info})


@torch.no_grad()
def _samples(cfg, accelerator, raw: DiffusionObjective, emas: dict, null, source: _Source, prefix: Path) -> None:
    """Sample the prompts with the EMA weights; write a contact sheet (and videos when a VAE is at hand)."""
    if not accelerator.is_main_process or not cfg.sample_prompts:
        return
    from pipelines.video_io import write_video

    net, text = raw.denoiser.net, raw.text_encoder
    saved = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in (("unet", net), ("text", text))
             if m is not None}
    for name, ema in emas.items():
        ema.copy_to(net if name == "unet" else text)
    bundle = DiffusionBundle(raw.denoiser, text or raw._frozen, cfg.text, cfg.model, source.shape,
                             source.autoencoder, null_cache=null)
    net.eval()
    try:
        denoise = bundle.denoise_fn(cfg.sample_prompts, cfg.sampling.guidance)
        generator = torch.Generator(accelerator.device).manual_seed(cfg.run.seed)
        latents = sample(bundle, denoise, (len(cfg.sample_prompts), *source.shape), cfg.sampling, generator)
    finally:
        net.train()
        for name, state in saved.items():
            (net if name == "unet" else text).load_state_dict(state)
    vae = source.vae or (load_autoencoder(source.autoencoder, device=accelerator.device) if source.autoencoder
                         else None)
    if vae is None:
        return
    videos = decode_video(vae, latents).clamp(-1, 1).cpu()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    save_contact_sheet(videos, prefix.with_suffix(".png"))
    for i, video in enumerate(videos):
        write_video(prefix.parent / f"{prefix.name}_{i}.mp4", video)
