"""Exact denoisers for Gaussian data, known in closed form: oracles that check samplers and conditional sampling
without training (used by the tests and by ``python -m benchmarks.gaussian_oracles``).

For ``x ~ N(μ, Σ)`` and ``z_t = α x + σ ε``: ``E[x | z_t] = μ + α Σ (α² Σ + σ² I)⁻¹ (z_t − α μ)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor

from diffusion.guidance import area_downsample, super_resolution_guidance, temporal_conditioning
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


def conditional_kl(method: str, w_r: float, sampler: str = "ancestral", n: int = 3000, steps: int = 64,
                   known: Sequence[int] = (0, 1, 2, 3), placed: Optional[Sequence[int]] = None) -> float:
    """How far conditional samples of 8 jointly Gaussian frames given the frames ``known`` (the first 4:
    continuation; frames spread over the clip: interpolation) are from the true p(x^b | x^a). ``placed``: where
    the sampler is told the known frames are (default ``known``; another index measures what a wrong one costs)."""
    cov = gaussian_frames()
    known = list(known)
    unknown = [i for i in range(8) if i not in known]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    mean_b, cov_b = gaussian_conditional(cov, known, x[:, known])
    placed = known if placed is None else list(placed)
    denoise = temporal_conditioning(covariance_oracle(cov), x[:, None, known, None, None], placed, method=method,
                                    w_r=w_r, generator=generator)
    z = torch.randn(n, 1, 8, 1, 1, generator=generator, dtype=torch.float64)
    sample = get_sampler(sampler)(denoise, z, NoiseSchedule().grid(steps), generator=generator)
    if not torch.allclose(sample[:, 0, placed, 0, 0], x[:, known], atol=1e-3, rtol=0):
        raise AssertionError("conditional sampling changed the known frames")
    return gaussian_kl(sample[:, 0, unknown, 0, 0] - mean_b, cov_b)


def pixel_covariance(frames: int = 4, side: int = 2) -> Tensor:
    """A full covariance over ``frames × side × side`` pixels (RBF over time ⊗ RBF over space, each pixel with its
    own scale, plus a floor): the posterior of a downsampled observation then reaches every pixel."""
    i = torch.arange(side, dtype=torch.float64)
    space = torch.exp(-((i[:, None] - i[None]) ** 2) / 2.0)
    cov = torch.kron(gaussian_frames(frames, 2.0), torch.kron(space, space))
    scale = torch.linspace(0.5, 1.5, cov.shape[0], dtype=torch.float64)
    return scale[:, None] * cov * scale[None] + 0.05 * torch.eye(cov.shape[0], dtype=torch.float64)


def full_oracle(cov: Tensor):
    """Exact ``x̂(z, λ)`` for zero-mean ``x ~ N(0, cov)`` over all of ``z[1:]`` flattened (cov is ``[d, d]``)."""
    d = cov.shape[0]
    eye = torch.eye(d, dtype=torch.float64)

    def denoise(z: Tensor, logsnr: Tensor) -> Tensor:
        alpha, sigma = (v.double()[:, None, None] for v in alpha_sigma(logsnr))
        gain = alpha * cov @ torch.linalg.inv(alpha**2 * cov + sigma**2 * eye)  # [b, d, d]
        return torch.einsum("bij,bj->bi", gain, z.double().reshape(z.shape[0], d)).reshape(z.shape).to(z.dtype)

    return denoise


def super_resolution_errors(w_r: float, downsample: Callable = area_downsample, n: int = 2000, steps: int = 64,
                            frames: int = 4, side: int = 2) -> tuple[float, float]:
    """Super-resolution guidance (paper §3.1) on Gaussian pixels ``[n, 1, frames, side, side]`` given their
    ``area_downsample`` to one pixel a frame: ``(constraint error, KL)``. The exact posterior matches the
    observation (``A x = y``: the mean squared error of the samples' downsampled frames) and, in the directions
    ``A`` does not see, is Gaussian with a known mean and covariance (the KL there). ``downsample`` is the
    operator the guidance is given (pass a wrong one to measure what it costs); ``w_r = 0``: no guidance."""
    cov = pixel_covariance(frames, side)
    d = cov.shape[0]
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(n, d, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(cov).T)
    y = area_downsample(x.reshape(n, 1, frames, side, side), (1, 1))  # [n, 1, frames, 1, 1]
    A = torch.kron(torch.eye(frames, dtype=torch.float64), torch.full((1, side * side), 1 / side**2,
                                                                      dtype=torch.float64))
    gain = cov @ A.T @ torch.linalg.inv(A @ cov @ A.T)
    mean, post = y.reshape(n, frames) @ gain.T, cov - gain @ A @ cov
    values, vectors = torch.linalg.eigh(post)
    unseen = vectors[:, values > 1e-6]  # the directions A does not see
    denoise = full_oracle(cov)
    if w_r:
        denoise = super_resolution_guidance(denoise, y, w_r=w_r, downsample=downsample)
    z = torch.randn(n, 1, frames, side, side, generator=generator, dtype=torch.float64)
    sample = get_sampler("ddim")(denoise, z, NoiseSchedule().grid(steps)).reshape(n, d)
    constraint = (sample @ A.T - y.reshape(n, frames)).pow(2).mean().item()
    return constraint, gaussian_kl((sample - mean) @ unseen, unseen.T @ post @ unseen)
