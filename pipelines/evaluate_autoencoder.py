"""Evaluate any autoencoder ``load_autoencoder`` reads (ours, a diffusers SD VAE, an LDM checkpoint) on held-out
frames of a video / image folder: PSNR, SSIM and, when its weights are present, LPIPS; printed and written as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from autoencoder import load_autoencoder
from pipelines.checkpoint import atomic_write_json
from pipelines.data import FrameDataset
from pipelines.latents import resolve_device
from pipelines.train_autoencoder import eval_lpips, evaluate, fixed_frames


@dataclass
class EvaluateConfig:
    """Everything ``scripts/evaluate_autoencoder.py`` reads."""

    autoencoder: str = "outputs/autoencoder/model"
    roots: list[str] = field(default_factory=lambda: ["data/videos"])
    size: int = 64
    split: Literal["eval", "train", "all"] = "eval"  # the same hash split training used
    eval_fraction: float = 0.1
    frames: int = 256
    lpips_net: Literal["alex", "vgg"] = "alex"
    out: str = "outputs/autoencoder/eval_external.json"
    device: Literal["auto", "cpu", "cuda"] = "auto"


def evaluate_autoencoder(cfg: EvaluateConfig, log=print) -> dict:
    """Reconstruct ``cfg.frames`` frames with the posterior mean; returns and writes the scores."""
    device = resolve_device(cfg.device)
    vae = load_autoencoder(cfg.autoencoder, device=device)
    dataset = FrameDataset(cfg.roots, cfg.size, max(1, cfg.frames // 8), cfg.split, cfg.eval_fraction, "center",
                           seed=1)
    frames = fixed_frames(dataset, cfg.frames)
    scores = evaluate(vae, frames, lpips_model=eval_lpips(cfg.lpips_net)) | {"autoencoder": cfg.autoencoder}
    atomic_write_json(Path(cfg.out), scores)
    log(json.dumps(scores))
    if dataset.skipped:
        log(dataset.summary())
    return scores
