"""The forward process's noise across the frames of a clip.

The paper (§2) draws ε ~ N(0, I): every frame its own noise. PYoCo's *mixed* noise model (Ge et al. 2023,
"Preserve Your Own Correlation: A Noise Prior for Video Diffusion Models", eq. 4) shares part of it:
``ε_f = √ρ ε̄ + √(1 − ρ) ε'_f`` with one ε̄ per clip, so each frame's noise is still N(0, I) and any two frames'
noises have correlation ρ. Frames of one clip are far more alike than independent noise assumes; with shared
noise, the choices a sampler makes at high noise (which colour, which shape) are made for all frames at once.

Everything downstream stays as it is: ``z_t = α_t x + σ_t ε`` with this ε, the ε / v / x targets, DDIM. Where a
sampler draws fresh noise (ancestral steps, Langevin corrections, the known frames' forward samples) it draws
from the same distribution, ε = Σ^½ n with ``Σ = (1 − ρ) I + ρ 11ᵀ`` over frames: for the ancestral step the
posterior q(z_s | z_t, x) then has covariance σ̃² Σ, and the Langevin correction becomes the one preconditioned
by Σ, whose drift ``−½ δ σ ε̂`` is unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def frame_correlated(noise: Tensor, rho: float, frames: Optional[int] = None) -> Tensor:
    """``Σ^½ n`` for i.i.d. standard normal ``n [b, c, f, h, w]``: noise whose frames (the first ``frames`` of
    them; frames after those, e.g. appended images, stay independent) have correlation ``rho``.

    ``Σ^½ = √(1 − ρ) I + κ 11ᵀ`` with ``κ = (√(1 − ρ + fρ) − √(1 − ρ)) / f``, the symmetric square root of
    ``Σ = (1 − ρ) I + ρ 11ᵀ`` (``(a I + κ 11ᵀ)² = a² I + (2aκ + fκ²) 11ᵀ``). A deterministic map of ``n``, so
    the same draws (per sample, per seed) give the same noise at any ρ; ρ = 0 returns ``n`` itself.
    """
    if _checked(rho) == 0:
        return noise
    if noise.ndim != 5:
        raise ValueError(f"expected noise shaped like a video [b, c, f, h, w], got shape {tuple(noise.shape)}")
    f = noise.shape[2] if frames is None else min(frames, noise.shape[2])
    if f < 2:
        return noise
    a = math.sqrt(1 - rho)
    kappa = (math.sqrt(1 - rho + f * rho) - a) / f
    video = noise[:, :, :f]
    mixed = a * video + kappa * video.sum(dim=2, keepdim=True)
    if f == noise.shape[2]:
        return mixed
    out = noise.clone()
    out[:, :, :f] = mixed
    return out


def noise_mixer(rho: float):
    """``None`` for the paper's i.i.d. noise (``rho = 0``), else ``n ↦ frame_correlated(n, rho)``: the
    ``noise`` argument samplers and :func:`diffusion.guidance.temporal_conditioning` take."""
    if _checked(rho) == 0:
        return None
    return lambda n: frame_correlated(n, rho)


def _checked(rho: float) -> float:
    if not 0 <= rho < 1:
        raise ValueError(f"noise correlation across frames must be in [0, 1), got {rho}")
    return rho


def conditional_frame_noise(others: Tensor, known: int, rho: float,
                            generator: Optional[torch.Generator] = None) -> Tensor:
    """Noise ``[b, c, known, h, w]`` for ``known`` more frames of a clip whose other frames' noise is ``others
    [b, c, m, h, w]``: a draw from the mixed model's conditional p(ε^a | ε^b).

    With ``ε_f = √ρ s + √(1 − ρ) e_f`` the shared ``s`` has, given ``ε^b``, precision ``P = 1 + mρ / (1 − ρ)``
    and mean ``√ρ / (1 − ρ) · Σ_f ε^b_f / P``; the new frames get ``√ρ s + √(1 − ρ) e`` with ``s`` from that
    posterior and fresh ``e``. Conditioning on known frames (:func:`diffusion.guidance.temporal_conditioning`)
    needs it: their forward samples must share the noise the sampled frames carry.
    """
    rho = _checked(rho)
    b, c, m, h, w = others.shape
    precision = 1 + m * rho / (1 - rho)
    mean = math.sqrt(rho) / (1 - rho) * others.sum(dim=2, keepdim=True) / precision
    draw = torch.randn((b, c, known + 1, h, w), generator=generator, device=others.device, dtype=others.dtype)
    shared = mean + draw[:, :, :1] / math.sqrt(precision)
    return math.sqrt(rho) * shared + math.sqrt(1 - rho) * draw[:, :, 1:]
