"""Exact denoisers for Gaussian data, known in closed form: oracles that check samplers without training.

For ``x ~ N(μ, Σ)`` and ``z_t = α x + σ ε``: ``E[x | z_t] = μ + α Σ (α² Σ + σ² I)⁻¹ (z_t − α μ)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion.schedule import alpha_sigma


def diagonal_oracle(mean: Tensor, std: Tensor):
    """Exact ``x̂(z, λ)`` for independent ``x_i ~ N(mean_i, std_i²)``; ``mean``/``std`` broadcast over ``z[1:]``."""

    def denoise(z: Tensor, logsnr: Tensor) -> Tensor:
        alpha, sigma = (v.reshape(-1, *([1] * (z.ndim - 1))).double() for v in alpha_sigma(logsnr))
        m, s2 = mean.double(), std.double() ** 2
        return (m + alpha * s2 / (alpha**2 * s2 + sigma**2) * (z.double() - alpha * m)).to(z.dtype)

    return denoise


def covariance_oracle(cov: Tensor):
    """Exact ``x̂(z, λ)`` for zero-mean ``x ~ N(0, cov)`` over the frame axis of ``z [b, 1, f, 1, 1]``."""
    f = cov.shape[0]
    eye = torch.eye(f, dtype=torch.float64)

    def denoise(z: Tensor, logsnr: Tensor) -> Tensor:
        alpha, sigma = (v.double() for v in alpha_sigma(logsnr))
        flat = z.double().reshape(z.shape[0], f)
        gain = alpha[:, None, None] * cov @ torch.linalg.inv(
            alpha[:, None, None] ** 2 * cov + sigma[:, None, None] ** 2 * eye
        )  # [b, f, f]
        return torch.einsum("bij,bj->bi", gain, flat).reshape(z.shape).to(z.dtype)

    return denoise


def gaussian_conditional(cov: Tensor, known: list[int], x_known: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[n, u]`` and covariance ``[u, u]`` of the unknown frames given ``x_known [n, k]``."""
    f = cov.shape[0]
    unknown = [i for i in range(f) if i not in known]
    s_aa = cov[known][:, known]
    s_ba = cov[unknown][:, known]
    s_bb = cov[unknown][:, unknown]
    gain = s_ba @ torch.linalg.inv(s_aa)
    return x_known.double() @ gain.T, s_bb - gain @ s_ba.T
