"""Frame-by-frame scores of videos against the videos they should equal: PSNR, SSIM and, when its ImageNet
weights are on disk, LPIPS. What ``evaluate`` reports for files that pair up by name and what the conditioning
benchmark reports for generated frames against what really happened."""

from __future__ import annotations

import numpy as np
import torch

from autoencoder import psnr, ssim
from pipelines.media.video_io import as_float_frames

PSNR_CAP = 100.0  # dB: identical frames would be infinite


@torch.no_grad()
def frame_scores(generated: np.ndarray, truth: np.ndarray, lpips_model=None,
                 device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """``{"psnr", "ssim"[, "lpips"]}``: one value per frame of ``generated`` against ``truth`` (both
    ``uint8 [f, H, W, 3]`` of one shape); PSNR capped at :data:`PSNR_CAP`."""
    if generated.shape != truth.shape:
        raise ValueError(f"frames to compare differ in shape: {generated.shape} and {truth.shape}")
    x, y = as_float_frames(generated, device), as_float_frames(truth, device)
    scores = {"psnr": psnr(x, y).clamp(max=PSNR_CAP).tolist(), "ssim": ssim(x, y).tolist()}
    if lpips_model is not None:
        scores["lpips"] = lpips_model.to(device)(x, y).flatten().tolist()
    return scores
