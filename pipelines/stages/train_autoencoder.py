"""Stage 1 training: the per-frame KL autoencoder (LDM's recipe: L1 + LPIPS + KL + PatchGAN).

``train_autoencoder(config)`` is what ``scripts/train_autoencoder.py`` runs. A run directory holds
``config.yaml``, ``checkpoints/`` (full training state; each checkpoint is itself a loadable model directory),
``model/`` (the final weights, EMA when enabled, with the estimated latent scale), ``loss.csv`` / ``loss.png``,
reconstruction grids in ``samples/`` and ``eval.json`` (PSNR, SSIM and, when its weights exist, LPIPS on
held-out frames, beside those of a bicubic enlargement of the frames shrunk by the autoencoder's factor).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from autoencoder import (
    CLASS_NAME,
    AutoencoderConfig,
    AutoencoderKL,
    AutoencoderLoss,
    estimate_latent_scale,
    load_autoencoder,
    save_autoencoder,
)
from autoencoder.losses import loss_gradient, scaled_gradient
from diffusion import EMA
from pipelines.core.config import ConfigError, config_to_dict
from pipelines.core.draws import SampleDraws
from pipelines.core.files import atomic_write_json
from pipelines.core.loop import (
    Phase,
    TrainingState,
    finish_run,
    index_batches,
    make_accelerator,
    make_optimizer,
    start_run,
    train_loop,
)
from pipelines.core.visual import save_image_grid
from pipelines.evaluation.reconstruction import eval_lpips, evaluate, fixed_frames, held_out_frames
from pipelines.media.datasets import FrameDataset, split_folders
from pipelines.stages.configs import AutoencoderTrainConfig


class GeneratorObjective(nn.Module):
    """The generator phase's trained parameters, the VAE and the learned log-variance (with the frozen LPIPS), as one
    module, so data parallelism all-reduces every one of them, ``logvar`` included. The discriminator is a module of
    its own, seen here through ``critic`` with its weights detached: the generator loss neither back-propagates
    into it nor all-reduces it, and clipping sees the generator's gradients only."""

    def __init__(self, vae: AutoencoderKL, loss: AutoencoderLoss):
        super().__init__()
        self.vae, self.loss = vae, loss

    def forward(self, batch: dict, step: int, critic, gradient, noise: Tensor) -> tuple[Tensor, dict]:
        """The VAE's loss on ``batch["image"]`` (keeps the reconstruction for the discriminator phase); ``noise``:
        the posterior samples' ε, drawn per sample (:class:`SampleDraws`)."""
        x = batch["image"]
        recon, posterior = self.vae(x, noise=noise)
        batch["recon"] = recon.detach()
        return self.loss(x, recon, posterior, 0, step, last_layer=self.vae.last_layer, discriminator=critic,
                         gradient=gradient)


class DiscriminatorObjective(nn.Module):
    """The PatchGAN and its loss on a batch's frames and the generator phase's reconstructions, as one module (it
    runs the discriminator twice, on real and on reconstructed frames, in one forward for data parallelism)."""

    def __init__(self, discriminator: nn.Module, loss: AutoencoderLoss):
        super().__init__()
        self.discriminator = discriminator
        self.criterion = loss.discriminator_loss  # a bound method: the loss is no submodule here

    def forward(self, batch: dict, step: int) -> tuple[Tensor, dict]:
        loss, logs = self.criterion(batch["image"], batch["recon"], step, self.discriminator)
        return loss, {k: v for k, v in logs.items() if k != "disc_factor"}


def detached(module: nn.Module):
    """``module``'s forward with its parameters detached: gradients reach its input only."""
    def forward(x: Tensor) -> Tensor:
        return torch.func.functional_call(module, {k: p.detach() for k, p in module.named_parameters()}, (x,))

    return forward


def last_layer_gradient(accelerator):
    """The adaptive weight's ``gradient(loss, W)``: through the fp16 loss scale when there is one, averaged over
    processes, so λ is the global batch's whatever the split (each process's ratio of norms would not be)."""
    base = scaled_gradient(accelerator.scaler.scale) if accelerator.scaler is not None else loss_gradient

    def gradient(loss: Tensor, weight: Tensor) -> Tensor:
        return accelerator.reduce(base(loss, weight), reduction="mean")

    return gradient


def build_models(cfg: AutoencoderTrainConfig) -> tuple[AutoencoderKL, AutoencoderLoss]:
    """The VAE (fresh or from ``init_from``) and its loss module (learned log-variance, LPIPS; it builds the
    discriminator)."""
    vae = load_autoencoder(cfg.init_from, channels_last=False).train() if cfg.init_from else AutoencoderKL(cfg.model)
    vae.set_gradient_checkpointing(cfg.gradient_checkpointing)
    return vae, AutoencoderLoss(cfg.loss, in_channels=vae.config.in_channels)


def model_json(config: AutoencoderConfig) -> dict:
    """The ``config.json`` that makes a directory loadable by ``load_autoencoder``."""
    return {"_class_name": CLASS_NAME, **dataclasses.asdict(config)}


def train_autoencoder(cfg: AutoencoderTrainConfig, log=print) -> dict:
    """Train (or resume) the autoencoder; returns the evaluation summary written to ``eval.json``."""
    if cfg.run.compile:
        raise ConfigError("run.compile: compiles the diffusion U-Net; the autoencoder trains uncompiled")
    accelerator = make_accelerator(cfg.run)
    out = start_run(accelerator, cfg, cfg.run, "autoencoder", ("model", "loss"))
    data = cfg.data
    roots, split = split_folders(data, "train")
    train_set = FrameDataset(roots, data.size, data.frames_per_video, split, data.eval_fraction, data.crop,
                             seed=cfg.run.seed, cache_mb=data.cache_mb)
    held_out, held_out_source = held_out_frames(data, cfg.eval_frames, cfg.run.seed + 1)  # checked before training
    scale_frames = fixed_frames(train_set, cfg.scale_frames)
    torch.manual_seed(cfg.run.seed)  # initial weights are a function of the seed
    vae, loss_fn = build_models(cfg)
    discriminator = loss_fn.build_discriminator()
    if cfg.loss.disc_norm == "batch" and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        discriminator = nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)  # the global batch's statistics
    opt_g = make_optimizer(list(vae.parameters()) + [loss_fn.logvar], cfg.optim)
    opt_d = make_optimizer(discriminator.parameters(), cfg.optim)
    generator, critic, opt_g, opt_d = accelerator.prepare(GeneratorObjective(vae, loss_fn),
                                                          DiscriminatorObjective(discriminator, loss_fn), opt_g, opt_d)
    raw = accelerator.unwrap_model(generator)
    raw_discriminator = accelerator.unwrap_model(critic).discriminator
    emas = {"model": EMA(raw.vae, cfg.run.ema_decay)} if cfg.run.ema_decay > 0 else {}
    state = TrainingState({"model": raw.vae, "discriminator": raw_discriminator,
                           "loss_logvar": nn.ParameterDict({"logvar": raw.loss.logvar})},
                          {"generator": opt_g, "discriminator": opt_d}, emas)
    state.maybe_resume(out / "checkpoints", cfg.run.resume, log, config_to_dict(cfg), ("model", "loss"), accelerator)
    started_at = state.step  # 0: a fresh run; run.steps: everything reused
    frozen_critic, gradient = detached(raw_discriminator), last_layer_gradient(accelerator)

    def checkpoint() -> None:
        config = _with_scale(raw.vae, scale_frames, cfg.run.seed)
        state.save(accelerator, out / "checkpoints", config_to_dict(cfg), cfg.run.keep_checkpoints,
                   json_files={"config.json": model_json(config)})

    z, factor = raw.vae.config.z_channels, raw.vae.config.downsample_factor
    global_batch = cfg.run.batch_size * accelerator.num_processes * cfg.run.grad_accum

    def generator_loss(batch: dict, _) -> tuple[Tensor, dict]:
        """The VAE's loss, its posterior noise keyed by each frame's slot: the same at any process count."""
        height, width = (size // factor for size in batch["image"].shape[2:])
        draws = SampleDraws(cfg.run.seed, batch["slot"], global_batch, accelerator.device)
        noise = draws.normal((z, height, width))
        return generator(batch, state.step, frozen_critic, gradient, noise)

    phases = [Phase("generator", opt_g, (generator,), generator_loss, cfg.optim.lr),
              Phase("discriminator", opt_d, (critic,), lambda batch, _: critic(batch, state.step),
                    cfg.disc_lr or cfg.optim.lr, active=lambda step: step >= cfg.loss.disc_start, clip=False)]
    batches = index_batches(train_set, cfg.run, accelerator, state.step)
    train_loop(cfg.run, cfg.optim, accelerator, state, batches, phases, desc="autoencoder", checkpoint=checkpoint,
               plot_keys=["rec_loss", "kl_loss", "g_loss", "disc_loss"])
    summary = {}
    if accelerator.is_main_process:
        summary = _export(cfg, raw.vae, emas, scale_frames, held_out, out, log)
        summary |= {"steps": state.step, "started_at_step": started_at, "seconds": round(state.seconds, 2),
                    "held_out": held_out_source}
        atomic_write_json(out / "eval.json", summary)
        log(f"autoencoder: {json.dumps(summary)}")
        if train_set.skipped:
            log(train_set.summary())
    finish_run(accelerator)
    return summary


def _with_scale(vae: AutoencoderKL, frames: torch.Tensor, seed: int) -> AutoencoderConfig:
    """The VAE's config with the latent scale re-estimated as 1 / std of its latents (LDM's scale-by-std), from
    posterior samples seeded by the run's seed (a rerun exports the same scale)."""
    was_training = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    with torch.no_grad():
        scale = estimate_latent_scale(vae, frames.to(device), generator=torch.Generator(device).manual_seed(seed))
    vae.train(was_training)
    return dataclasses.replace(vae.config, latent_scale=float(scale))


def _export(cfg: AutoencoderTrainConfig, vae: AutoencoderKL, emas: dict, scale_frames: Tensor, held_out: Tensor,
            out: Path, log) -> dict:
    """Save the final (EMA) weights with their latent scale as ``model/``, score them on the held-out frames,
    draw inputs above reconstructions."""
    final = AutoencoderKL(vae.config).to(next(vae.parameters()).device)
    final.load_state_dict(vae.state_dict())
    if emas:
        emas["model"].copy_to(final)
    final.eval()
    final.config = _with_scale(final, scale_frames, cfg.run.seed)
    save_autoencoder(final, out / "model")
    summary = evaluate(final, held_out, lpips_model=eval_lpips(cfg.loss.lpips_net))
    with torch.no_grad():
        shown = held_out[:8].to(next(final.parameters()).device)
        recon = final.decode(final.encode(shown).mean).clamp(-1, 1)
    save_image_grid(torch.cat([shown, recon]).cpu(), out / "samples" / "reconstructions.png", columns=8)
    return summary | {"latent_scale": final.config.latent_scale}
