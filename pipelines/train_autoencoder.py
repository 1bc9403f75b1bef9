"""Stage 1 training: the per-frame KL autoencoder (LDM's recipe: L1 + LPIPS + KL + PatchGAN).

``train_autoencoder(config)`` is what ``scripts/train_autoencoder.py`` runs. A run directory holds
``config.yaml``, ``checkpoints/`` (full training state; each checkpoint is itself a loadable model directory),
``model/`` (the final weights, EMA when enabled, with the estimated latent scale), ``loss.csv`` / ``loss.png``,
reconstruction grids in ``samples/`` and ``eval.json`` (PSNR, SSIM and, when its weights exist, LPIPS on
held-out frames).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    AutoencoderLoss,
    build_lpips,
    estimate_latent_scale,
    load_autoencoder,
    psnr,
    save_autoencoder,
    ssim,
)
from diffusion import EMA
from pipelines.checkpoint import atomic_write_json
from pipelines.config import config_to_dict, save_resolved_config
from pipelines.data import FrameDataset, collate
from pipelines.training import (
    EpochView,
    IndexStream,
    OptimConfig,
    RunConfig,
    Timer,
    TrainingState,
    make_accelerator,
    make_optimizer,
    seed_step,
    set_lr,
)
from pipelines.visual import LossLog, save_image_grid

AUTOENCODER_CLASS = "LatentVideoAutoencoderKL"


@dataclass
class FramesConfig:
    """Training frames: random frames of random videos (and images) under ``roots``; files are split by hash
    into training and held-out evaluation files."""

    roots: list[str] = field(default_factory=lambda: ["data/videos"])
    size: int = 64
    frames_per_video: int = 8  # items per file and epoch
    eval_fraction: float = 0.1
    crop: Literal["center", "random"] = "random"


@dataclass
class AutoencoderLossConfig:
    """LDM's LPIPSWithDiscriminator settings (PAPER.md)."""

    reconstruction: Literal["l1", "l2"] = "l1"
    perceptual: Literal["pretrained", "untrained", "none"] = "pretrained"  # "none": no LPIPS term
    lpips_net: Literal["alex", "vgg"] = "alex"
    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6
    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_layers: int = 3
    disc_lr: Optional[float] = None  # default: optim.lr


@dataclass
class AutoencoderTrainConfig:
    """Everything ``scripts/train_autoencoder.py`` reads."""

    model: AutoencoderConfig = field(default_factory=lambda: AutoencoderConfig.cpu(4))
    init_from: Optional[str] = None  # start from a VAE on disk (any layout load_autoencoder reads)
    data: FramesConfig = field(default_factory=FramesConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=[0.5, 0.9], max_grad_norm=0.0))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="outputs/autoencoder"))
    eval_frames: int = 256  # held-out frames for PSNR / SSIM
    scale_frames: int = 256  # training frames for the latent scale (1 / std)
    gradient_checkpointing: bool = False


def build_models(cfg: AutoencoderTrainConfig) -> tuple[AutoencoderKL, AutoencoderLoss]:
    """The VAE (fresh or from ``init_from``) and its loss module (discriminator, learned log-variance, LPIPS)."""
    if cfg.init_from:
        vae = load_autoencoder(cfg.init_from).train()
    else:
        vae = AutoencoderKL(cfg.model)
    vae.set_gradient_checkpointing(cfg.gradient_checkpointing)
    perceptual = "off" if cfg.loss.perceptual == "none" else cfg.loss.perceptual
    loss = AutoencoderLoss(
        disc_start=cfg.loss.disc_start, kl_weight=cfg.loss.kl_weight, disc_weight=cfg.loss.disc_weight,
        perceptual_weight=cfg.loss.perceptual_weight, perceptual=perceptual, lpips_net=cfg.loss.lpips_net,
        reconstruction=cfg.loss.reconstruction, disc_num_layers=cfg.loss.disc_layers,
        in_channels=vae.config.in_channels,
    )
    return vae, loss


def model_json(config: AutoencoderConfig) -> dict:
    """The ``config.json`` that makes a directory loadable by ``load_autoencoder``."""
    return {"_class_name": AUTOENCODER_CLASS, **dataclasses.asdict(config)}


def _frames(loader: DataLoader, device) -> Iterator[torch.Tensor]:
    for batch in loader:
        yield batch["image"].to(device, non_blocking=True)


def fixed_frames(dataset: FrameDataset, count: int) -> torch.Tensor:
    """The first ``count`` items of a dataset (epoch 0), stacked: ``[n, 3, H, W]``."""
    dataset.set_epoch(0)
    return torch.stack([dataset[i]["image"] for i in range(min(count, len(dataset)))])


@torch.no_grad()
def evaluate(vae: AutoencoderKL, frames: torch.Tensor, batch_size: int = 32, lpips_model=None) -> dict[str, float]:
    """Mean PSNR (dB), SSIM (and LPIPS) of posterior-mean reconstructions of ``frames [n, 3, H, W]``."""
    device = next(vae.parameters()).device
    scores: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "lpips": []}
    for chunk in frames.split(batch_size):
        x = chunk.to(device)
        recon = vae.decode(vae.encode(x).mean).clamp(-1, 1)
        scores["psnr"].append(psnr(x, recon).clamp(max=100.0))
        scores["ssim"].append(ssim(x, recon))
        if lpips_model is not None:
            scores["lpips"].append(lpips_model.to(device)(x, recon).flatten())
    return {k: float(torch.cat(v).mean()) for k, v in scores.items() if v} | {"frames": int(frames.shape[0])}


def eval_lpips(net: str = "alex"):
    """LPIPS for evaluation, only when its pretrained weights are present (else the metric is left out)."""
    try:
        return build_lpips("pretrained", net)
    except FileNotFoundError:
        return None


def train_autoencoder(cfg: AutoencoderTrainConfig, log=print) -> dict:
    """Train (or resume) the autoencoder; returns the evaluation summary written to ``eval.json``."""
    accelerator = make_accelerator(cfg.run)
    out = Path(cfg.run.out_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved_config(cfg, out)
    train_set = FrameDataset(cfg.data.roots, cfg.data.size, cfg.data.frames_per_video, "train",
                             cfg.data.eval_fraction, cfg.data.crop, seed=cfg.run.seed)
    eval_set = FrameDataset(cfg.data.roots, cfg.data.size, max(1, cfg.eval_frames // 8), "eval",
                            cfg.data.eval_fraction, "center", seed=cfg.run.seed + 1)
    torch.manual_seed(cfg.run.seed)  # initial weights are a function of the seed
    vae, loss_fn = build_models(cfg)
    opt_g = make_optimizer(list(vae.parameters()) + [loss_fn.logvar], cfg.optim)
    opt_d = make_optimizer(loss_fn.discriminator.parameters(),
                           dataclasses.replace(cfg.optim, lr=cfg.loss.disc_lr or cfg.optim.lr))
    vae, loss_fn.discriminator, opt_g, opt_d = accelerator.prepare(vae, loss_fn.discriminator, opt_g, opt_d)
    loss_fn.to(accelerator.device)
    raw_vae = accelerator.unwrap_model(vae)
    ema = EMA(raw_vae, cfg.run.ema_decay) if cfg.run.ema_decay > 0 else None
    modules = {"model": vae, "discriminator": loss_fn.discriminator,
               "loss_logvar": torch.nn.ParameterDict({"logvar": loss_fn.logvar})}  # shares the parameter
    state = TrainingState(modules, {"generator": opt_g, "discriminator": opt_d}, {"model": ema} if ema else {})
    state.maybe_resume(out / "checkpoints", cfg.run.resume, log)
    scale_frames = fixed_frames(train_set, cfg.scale_frames)

    stream = IndexStream(len(train_set), cfg.run.batch_size, cfg.run.seed, accelerator.process_index,
                         accelerator.num_processes)
    loader = DataLoader(EpochView(train_set), batch_sampler=stream.batches(state.step * cfg.run.grad_accum),
                        num_workers=cfg.run.num_workers, collate_fn=collate,
                        generator=torch.Generator().manual_seed(cfg.run.seed))  # not the global RNG
    batches = _frames(loader, accelerator.device)
    losses = LossLog(out / "loss.csv", resume_step=state.step) if accelerator.is_main_process else None

    def checkpoint() -> None:
        config = _with_scale(accelerator.unwrap_model(vae), scale_frames)
        state.save(accelerator, out / "checkpoints", config_to_dict(cfg), cfg.run.keep_checkpoints,
                   json_files={"config.json": model_json(config)})

    timer = Timer(state)
    bar = tqdm(total=cfg.run.steps, initial=state.step, desc="autoencoder", disable=not accelerator.is_main_process)
    while state.step < cfg.run.steps:
        seed_step(cfg.run.seed, accelerator.process_index, state.step)
        set_lr(opt_g, state.step, cfg.run.steps, cfg.optim)
        logs = _train_step(cfg, accelerator, vae, loss_fn, opt_g, opt_d, batches, state.step)
        if ema is not None:
            ema.update(raw_vae)
        state.step += 1
        bar.update(1)
        if losses is not None and (state.step % cfg.run.log_every == 0 or state.step == cfg.run.steps):
            losses.append(state.step, **logs)
            bar.set_postfix(rec=f"{logs['rec_loss']:.4f}")
        if state.step % cfg.run.checkpoint_every == 0 or state.step == cfg.run.steps:
            timer.pause()
            checkpoint()
            timer.resume()
    bar.close()
    timer.pause()
    return _finish(cfg, accelerator, vae, ema, (train_set, eval_set), scale_frames, losses, state, out, log)


def _train_step(cfg, accelerator, vae, loss_fn, opt_g, opt_d, batches, step: int) -> dict[str, float]:
    """One optimiser step of the VAE (and of the discriminator once it is on), over ``grad_accum`` batches.

    The VAE's GAN term back-propagates into the discriminator too (as in LDM); those gradients are cleared before
    the discriminator's own losses are accumulated.
    """
    logs: dict[str, float] = {}
    scale = 1.0 / cfg.run.grad_accum
    last_layer = accelerator.unwrap_model(vae).last_layer
    pairs = []
    for _ in range(cfg.run.grad_accum):
        x = next(batches)
        with accelerator.autocast():
            recon, posterior = vae(x)
            loss_g, log_g = loss_fn(x, recon, posterior, 0, step, last_layer=last_layer)
        accelerator.backward(loss_g * scale)
        pairs.append((x, recon.detach(), posterior))
        logs = {k: logs.get(k, 0.0) + v * scale for k, v in log_g.items()}
    _optimizer_step(accelerator, opt_g, vae.parameters(), cfg.optim.max_grad_norm)
    opt_d.zero_grad(set_to_none=True)
    if step >= cfg.loss.disc_start:
        for x, recon, posterior in pairs:
            with accelerator.autocast():
                loss_d, log_d = loss_fn(x, recon, posterior, 1, step)
            accelerator.backward(loss_d * scale)
            logs.update({k: logs.get(k, 0.0) + v * scale for k, v in log_d.items() if k != "disc_factor"})
        _optimizer_step(accelerator, opt_d, loss_fn.discriminator.parameters(), cfg.optim.max_grad_norm)
    return logs


def _optimizer_step(accelerator, optimizer, params, max_grad_norm: float) -> None:
    """Clip (when asked), step, clear."""
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _with_scale(vae: AutoencoderKL, frames: torch.Tensor) -> AutoencoderConfig:
    """The VAE's config with the latent scale re-estimated as 1 / std of its latents (LDM's scale-by-std)."""
    was_training = vae.training
    vae.eval()
    with torch.no_grad():
        scale = estimate_latent_scale(vae, frames.to(next(vae.parameters()).device))
    vae.train(was_training)
    return dataclasses.replace(vae.config, latent_scale=float(scale))


def _finish(cfg, accelerator, vae, ema, datasets, scale_frames, losses, state, out: Path, log) -> dict:
    """Export the final (EMA) weights with their latent scale, evaluate on held-out frames, draw pictures."""
    summary: dict = {}
    train_set, eval_set = datasets
    if accelerator.is_main_process:
        final = AutoencoderKL(accelerator.unwrap_model(vae).config).to(accelerator.device)
        final.load_state_dict(accelerator.unwrap_model(vae).state_dict())
        if ema is not None:
            ema.copy_to(final)
        final.eval()
        final.config = _with_scale(final, scale_frames)
        save_autoencoder(final, out / "model")
        held_out = fixed_frames(eval_set, cfg.eval_frames)
        summary = evaluate(final, held_out, lpips_model=eval_lpips(cfg.loss.lpips_net))
        summary |= {"steps": state.step, "seconds": round(state.seconds, 2), "latent_scale": final.config.latent_scale}
        atomic_write_json(out / "eval.json", summary)
        with torch.no_grad():
            shown = held_out[:8].to(accelerator.device)
            recon = final.decode(final.encode(shown).mean).clamp(-1, 1)
        save_image_grid(torch.cat([shown, recon]).cpu(), out / "samples" / "reconstructions.png", columns=8)
        if losses is not None:
            losses.plot(out / "loss.png", ["rec_loss", "kl_loss", "g_loss", "disc_loss"], "autoencoder")
        log(f"autoencoder: {json.dumps(summary)}")
        for dataset in (train_set, eval_set):
            if dataset.skipped:
                log(dataset.summary())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
