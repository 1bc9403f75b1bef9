"""Evaluate any autoencoder ``load_autoencoder`` reads (ours, a diffusers SD VAE, an LDM checkpoint) on held-out
frames of a video / image folder: PSNR, SSIM and, when its weights are present, LPIPS, beside the same scores of
a bicubic enlargement of the frames shrunk by the autoencoder's factor; printed and written as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from autoencoder import load_autoencoder
from pipelines.core.devices import resolve_device
from pipelines.core.files import atomic_write_json
from pipelines.evaluation.reconstruction import eval_lpips, evaluate, held_out_frames
from pipelines.stages.configs import EvaluateAutoencoderConfig


def evaluate_autoencoder(cfg: EvaluateAutoencoderConfig, log=print) -> dict:
    """Reconstruct ``cfg.frames`` frames with the posterior mean; returns and writes the scores."""
    device = resolve_device(cfg.device)
    vae = load_autoencoder(cfg.autoencoder, device=device)
    frames, split = held_out_frames(cfg.data, cfg.frames, seed=1, split=cfg.split)
    scores = evaluate(vae, frames, lpips_model=eval_lpips(cfg.lpips_net))
    scores |= {"autoencoder": cfg.autoencoder, "split": split}
    atomic_write_json(Path(cfg.out), scores)
    log(json.dumps(scores))
    return scores
