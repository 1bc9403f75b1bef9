"""Reconstruction metrics of an autoencoder on fixed frames: PSNR, SSIM and, when its weights are on disk, LPIPS;
beside them, the same metrics of an area downsample by the autoencoder's factor, enlarged back by bicubic
interpolation."""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F

from autoencoder import AutoencoderKL, build_lpips, psnr, ssim
from pipelines.core.config import UserError
from pipelines.media.config import FramesConfig
from pipelines.media.datasets import FrameDataset, split_folders


def fixed_frames(dataset: FrameDataset, count: int) -> torch.Tensor:
    """The first ``count`` items of a dataset (epoch 0), stacked: ``[n, 3, H, W]``."""
    dataset.set_epoch(0)
    return torch.stack([dataset[i]["image"] for i in range(min(count, len(dataset)))])


def held_out_frames(data: FramesConfig, count: int, seed: int, split: str = "eval") -> tuple[torch.Tensor, str]:
    """``count`` centre-cropped frames of the ``split`` files (:func:`split_folders`), and where they came from.

    When the hash split's held-out files are none or all unusable (a small folder whose hashed tenth is one
    broken file), frames of the training files stand in, with a warning: a run never fails after its work is
    done because of its evaluation split. Held-out folders (``eval_roots``) that give no frame are an error.
    """
    def frames_of(which: str) -> torch.Tensor:
        roots, files = split_folders(data, which)
        dataset = FrameDataset(roots, data.size, max(1, -(-count // 8)), files, data.eval_fraction, "center",
                               seed=seed, cache_mb=data.cache_mb)
        return fixed_frames(dataset, count)

    try:
        return frames_of(split), split
    except (FileNotFoundError, UserError) as error:
        if split != "eval" or data.eval_roots:
            raise
        warnings.warn(f"no usable held-out file ({error}); evaluating on unseen frames of the training files",
                      stacklevel=2)
        return frames_of("train"), "train (no usable held-out file)"


def downsample_baseline(frames: torch.Tensor, factor: int) -> torch.Tensor:
    """What the autoencoder must beat: ``frames [n, c, H, W]`` averaged over ``factor × factor`` blocks (area
    downsampling to ``[n, c, H/F, W/F]``), then enlarged back by bicubic interpolation and clamped to [-1, 1]."""
    small = F.interpolate(frames, scale_factor=1 / factor, mode="area")
    return F.interpolate(small, size=frames.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


def _scores(x: torch.Tensor, y: torch.Tensor, lpips_model) -> dict[str, torch.Tensor]:
    """Per-frame PSNR (capped at 100 dB: a perfect reconstruction would be infinite), SSIM and LPIPS, ``[n]``."""
    scores = {"psnr": psnr(x, y).clamp(max=100.0), "ssim": ssim(x, y)}
    return scores | ({"lpips": lpips_model.to(x.device)(x, y).flatten()} if lpips_model is not None else {})


@torch.no_grad()
def evaluate(vae: AutoencoderKL, frames: torch.Tensor, batch_size: int = 32, lpips_model=None) -> dict[str, float]:
    """Mean PSNR (dB), SSIM (and LPIPS) of posterior-mean reconstructions of ``frames [n, 3, H, W]``, and of
    :func:`downsample_baseline` by the autoencoder's factor F (``bicubic_*``), with the numbers per frame each
    keeps: the latent's (H/F)·(W/F)·z (``latent_numbers``) and the small frame's (H/F)·(W/F)·c
    (``bicubic_numbers``)."""
    device, factor = next(vae.parameters()).device, vae.config.downsample_factor
    scores: dict[str, list[torch.Tensor]] = defaultdict(list)
    for chunk in frames.split(batch_size):
        x = chunk.to(device)
        recon = vae.decode(vae.encode(x).mean).clamp(-1, 1)
        for name, value in _scores(x, recon, lpips_model).items():
            scores[name].append(value)
        for name, value in _scores(x, downsample_baseline(x, factor), lpips_model).items():
            scores[f"bicubic_{name}"].append(value)
    cells = (frames.shape[-2] // factor) * (frames.shape[-1] // factor)
    return {k: float(torch.cat(v).mean()) for k, v in scores.items()} | {
        "frames": int(frames.shape[0]), "latent_numbers": cells * vae.config.z_channels,
        "bicubic_numbers": cells * frames.shape[1]}


def eval_lpips(net: str = "alex"):
    """LPIPS for evaluation, only when its pretrained weights are present (else the metric is left out)."""
    try:
        return build_lpips("pretrained", net)
    except FileNotFoundError:
        return None
