"""Exact denoisers for Gaussian data, known in closed form: oracles that check samplers and conditional sampling
without training (used by the tests and by ``benchmarks/gaussian_oracles.py``).

For ``x ~ N(μ, Σ)`` and ``z_t = α x + σ ε``: ``E[x | z_t] = μ + α Σ (α² Σ + σ² I)⁻¹ (z_t − α μ)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion.guidance import temporal_conditioning
from diffusion.sampling import get_sampler
from diffusion.schedule import NoiseSchedule, alpha_sigma


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


def gaussian_frames(f=8, length=3.0):
    """Zero-mean frames (one scalar each) with an RBF covariance over time."""
    i = torch.arange(f, dtype=torch.float64)
    return torch.exp(-((i[:, None] - i[None]) ** 2) / (2 * length**2)) + 1e-3 * torch.eye(f, dtype=torch.float64)


def gaussian_kl(residual: torch.Tensor, cov: torch.Tensor) -> float:
    """KL(N(mean, cov) of the residuals ‖ N(0, cov)) — 0 for exact conditional samples."""
    m, c = residual.mean(0), torch.cov(residual.T)
    inv = torch.linalg.inv(cov)
    return 0.5 * (torch.trace(inv @ c) + m @ inv @ m - cov.shape[0] + torch.logdet(cov) - torch.logdet(c)).item()


def conditional_kl(method: str, w_r: float, sampler: str = "ancestral", n: int = 3000, steps: int = 64) -> float:
    """How far conditional samples of the last 4 of 8 jointly Gaussian frames are from the true p(x^b | x^a)."""
    cov = gaussian_frames()
    known, unknown = [0, 1, 2, 3], [4, 5, 6, 7]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    mean_b, cov_b = gaussian_conditional(cov, known, x[:, known])
    denoise = temporal_conditioning(covariance_oracle(cov), x[:, None, known, None, None], known, method=method,
                                    w_r=w_r, generator=generator)
    z = torch.randn(n, 1, 8, 1, 1, generator=generator, dtype=torch.float64)
    sample = get_sampler(sampler)(denoise, z, NoiseSchedule().grid(steps), generator=generator)
    if not torch.allclose(sample[:, 0, known, 0, 0], x[:, known], atol=1e-3, rtol=0):
        raise AssertionError("conditional sampling changed the known frames")
    return gaussian_kl(sample[:, 0, unknown, 0, 0] - mean_b, cov_b)
