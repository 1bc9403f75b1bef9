"""Per-image reconstruction metrics for frames ``[n, c, H, W]`` in [-1, 1] (data range 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR = 10 log10(data_range² / MSE) per image, ``[n]`` (inf where x = y)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(data_range**2 / mse)).to(x.dtype)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian window ``[size, size]`` (float64), the outer product of a 1-D one."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """SSIM (Wang et al. 2004) per image, ``[n]``: the mean over channels and all valid window positions of

        ((2 μx μy + C1)(2 σxy + C2)) / ((μx² + μy² + C1)(σx² + σy² + C2)),  C1 = (k1 L)², C2 = (k2 L)²,

    with Gaussian-weighted local statistics (window 11, σ = 1.5, no padding) and L = ``data_range``.
    """
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"ssim needs frames of at least {window_size}×{window_size}, not {tuple(x.shape)}")
    c = x.shape[1]
    window = gaussian_window(window_size, sigma).to(x.device).expand(c, 1, window_size, window_size)

    def local_mean(t: torch.Tensor) -> torch.Tensor:  # depthwise Gaussian filter: [n, c, H', W']
        return F.conv2d(t, window, groups=c)

    dtype, x, y = x.dtype, x.double(), y.double()
    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x.pow(2)
    var_y = local_mean(y * y) - mu_y.pow(2)
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    ssim_map = numerator / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))  # [n, c, H', W']
    return ssim_map.flatten(1).mean(dim=1).to(dtype)
