"""The continuous-time variance-preserving noise process: every piece of noise-level arithmetic lives here.

Ho et al. 2022 (*Video Diffusion Models*, §2) write the forward process as
``q(z_t | x) = N(α_t x, σ_t² I)`` for ``t ∈ [0, 1]`` with log signal-to-noise ratio ``λ_t = log(α_t² / σ_t²)``
decreasing in ``t``; variance preserving means ``α_t² = sigmoid(λ_t)`` and ``σ_t² = sigmoid(−λ_t)``.
All functions are rank-agnostic: per-sample quantities of shape ``[b]`` broadcast against data of any rank
(images ``[b, c, h, w]``, videos ``[b, c, f, h, w]``) through :func:`append_dims`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from diffusion.config import ScheduleConfig


class Prediction(str, Enum):
    """What the raw network predicts (paper §2): ε (default), v (BAIR/Kinetics) or x itself."""

    EPS = "eps"
    V = "v"
    X = "x"


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dimensions so ``x`` (``[b]``) broadcasts against a rank-``ndim`` tensor."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """``(α, σ)`` from λ for the variance-preserving process: ``α² = sigmoid(λ)``, ``σ² = sigmoid(−λ)``."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


@dataclass(frozen=True)
class NoiseSchedule(ScheduleConfig):
    """The schedule of a :class:`ScheduleConfig` (same fields) with its arithmetic: λ_t, sampling grids."""

    @classmethod
    def of(cls, config: ScheduleConfig) -> NoiseSchedule:
        """The schedule a config describes (itself when it already is one)."""
        return config if isinstance(config, NoiseSchedule) else cls(**dataclasses.asdict(config))

    def logsnr(self, t: Tensor) -> Tensor:
        """λ_t for diffusion times ``t`` (any shape, values in [0, 1])."""
        t = t.to(torch.float64)
        if self.kind == "cosine":
            logsnr = self._shifted_cosine(t, self.shift)
            if self.shift_clean is not None:
                logsnr = t * logsnr + (1 - t) * self._shifted_cosine(t, self.shift_clean)
        else:
            beta0, beta1 = 0.1, 20.0
            logsnr = -torch.log(torch.expm1(beta0 * t + 0.5 * (beta1 - beta0) * t**2))
        return logsnr.clamp(self.logsnr_min, self.logsnr_max).to(torch.float32)

    def _shifted_cosine(self, t: Tensor, shift: float) -> Tensor:
        """The cosine λ(t) plus ``shift``, its ends still at ``logsnr_max`` (t = 0) and ``logsnr_min`` (t = 1)."""
        lo, hi = self.logsnr_min - shift, self.logsnr_max - shift
        b = math.atan(math.exp(-hi / 2))
        a = math.atan(math.exp(-lo / 2)) - b
        return -2 * torch.log(torch.tan(a * t + b)) + shift

    def grid(self, steps: int, device: torch.device | str | None = None) -> Tensor:
        """λ at ``steps + 1`` uniformly spaced times from t = 1 (noise) to t = 0 (data): a sampler's grid."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        return self.logsnr(torch.linspace(1.0, 0.0, steps + 1, device=device))


def q_sample(x0: Tensor, logsnr: Tensor, noise: Tensor) -> Tensor:
    """Forward process sample ``z_t = α_t x + σ_t ε`` (paper eq. 1); ``logsnr`` is ``[b]``."""
    alpha, sigma = (append_dims(v, x0.ndim) for v in alpha_sigma(logsnr))
    return alpha * x0 + sigma * noise


def x0_from_output(output: Tensor, z: Tensor, logsnr: Tensor, prediction: Prediction) -> Tensor:
    """The one place where the network output becomes x̂ (paper §2).

    ε: ``x̂ = (z − σ ε̂) / α``;  v: ``x̂ = α z − σ v̂``;  x: ``x̂ = output``.
    """
    alpha, sigma = (append_dims(v, z.ndim) for v in alpha_sigma(logsnr))
    prediction = Prediction(prediction)
    if prediction is Prediction.EPS:
        return (z - sigma * output) / alpha
    if prediction is Prediction.V:
        return alpha * z - sigma * output
    return output


def eps_from_x0(z: Tensor, x0: Tensor, logsnr: Tensor) -> Tensor:
    """``ε̂ = (z − α x̂) / σ``: the noise a denoised estimate implies."""
    alpha, sigma = (append_dims(v, z.ndim) for v in alpha_sigma(logsnr))
    return (z - alpha * x0) / sigma


def posterior(z_t: Tensor, x0: Tensor, logsnr_t: Tensor, logsnr_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``q(z_s | z_t, x)`` for ``s < t`` (paper §2): ``(μ̃_{s|t}, σ̃²_{s|t}, σ²_{t|s})``.

    ``μ̃ = e^{λ_t − λ_s} (α_s/α_t) z_t + (1 − e^{λ_t − λ_s}) α_s x``, ``σ̃² = (1 − e^{λ_t − λ_s}) σ_s²`` and the
    forward variance ``σ²_{t|s} = (1 − e^{λ_t − λ_s}) σ_t²`` that the ancestral sampler interpolates towards.
    ``logsnr_t`` and ``logsnr_s`` are ``[b]``; the variances come back broadcastable against ``z_t``.
    """
    ndim = z_t.ndim
    alpha_t, sigma_t = (append_dims(v, ndim) for v in alpha_sigma(logsnr_t))
    alpha_s, sigma_s = (append_dims(v, ndim) for v in alpha_sigma(logsnr_s))
    ratio = append_dims(torch.exp(logsnr_t - logsnr_s), ndim)  # e^{λ_t − λ_s} ∈ (0, 1]
    mean = ratio * (alpha_s / alpha_t) * z_t + (1 - ratio) * alpha_s * x0
    return mean, (1 - ratio) * sigma_s**2, (1 - ratio) * sigma_t**2
