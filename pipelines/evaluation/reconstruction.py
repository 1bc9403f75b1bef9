"""Reconstruction metrics of an autoencoder on fixed frames: PSNR, SSIM and, when its weights are on disk, LPIPS."""

from __future__ import annotations

import warnings

import torch

from autoencoder import AutoencoderKL, build_lpips, psnr, ssim
from pipelines.core.config import UserError
from pipelines.media.config import FramesConfig
from pipelines.media.datasets import FrameDataset


def fixed_frames(dataset: FrameDataset, count: int) -> torch.Tensor:
    """The first ``count`` items of a dataset (epoch 0), stacked: ``[n, 3, H, W]``."""
    dataset.set_epoch(0)
    return torch.stack([dataset[i]["image"] for i in range(min(count, len(dataset)))])


def held_out_frames(data: FramesConfig, count: int, seed: int, split: str = "eval") -> tuple[torch.Tensor, str]:
    """``count`` centre-cropped frames of the ``split`` files, and where they came from.

    When the held-out split is empty or every file in it is unusable (a small folder whose hashed tenth is one
    broken file), frames of the training files stand in, with a warning: a run never fails after its work is
    done because of its evaluation split.
    """
    def frames_of(which: str) -> torch.Tensor:
        dataset = FrameDataset(data.roots, data.size, max(1, -(-count // 8)), which, data.eval_fraction, "center",
                               seed=seed, cache_mb=data.cache_mb)
        return fixed_frames(dataset, count)

    try:
        return frames_of(split), split
    except (FileNotFoundError, UserError) as error:
        if split != "eval":
            raise
        warnings.warn(f"no usable held-out file ({error}); evaluating on unseen frames of the training files",
                      stacklevel=2)
        return frames_of("train"), "train (no usable held-out file)"


@torch.no_grad()
def evaluate(vae: AutoencoderKL, frames: torch.Tensor, batch_size: int = 32, lpips_model=None) -> dict[str, float]:
    """Mean PSNR (dB), SSIM (and LPIPS) of posterior-mean reconstructions of ``frames [n, 3, H, W]``.

    PSNR is capped at 100 dB (a perfect reconstruction would be infinite)."""
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
