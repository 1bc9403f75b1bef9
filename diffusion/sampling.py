"""Samplers: pure functions sharing one signature (the k-diffusion convention).

``sampler(denoise, z, logsnrs, *, generator=None, progress=False, callback=None, **knobs) -> x``

* ``denoise(z, logsnr) -> x̂``: any callable; conditioning and guidance are bound into it by wrappers
  (:mod:`diffusion.guidance`), so every sampler runs conditional, guided and unconditional sampling alike.
* ``z``: the start ``z_1 ~ N(0, I)`` of any shape ``[b, ...]`` (videos are ``[b, c, f, h, w]``).
* ``logsnrs``: λ at the grid points, from noise to data (``NoiseSchedule.grid(steps)``); one step per interval,
  the last step adds no noise and returns the sample.

The ancestral and predictor–corrector samplers are the paper's (§2); DDIM is Song et al. 2021.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion.schedule import alpha_sigma, append_dims, eps_from_x0, posterior

Denoise = Callable[[Tensor, Tensor], Tensor]
Step = Callable[[Denoise, Tensor, Tensor, Tensor, bool, Optional[torch.Generator]], Tensor]


def _noise_like(z: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """ε ~ N(0, I) shaped like ``z``, from ``generator`` on ``z``'s device."""
    return torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)


def _per_sample(value: Tensor, z: Tensor) -> Tensor:
    """A grid value broadcast to ``[b]``."""
    return value.to(device=z.device, dtype=torch.float32).expand(z.shape[0])


def _run(step: Step, denoise: Denoise, z: Tensor, logsnrs: Tensor, generator, progress: bool, callback) -> Tensor:
    """The loop every sampler shares: step from ``logsnrs[i]`` to ``logsnrs[i + 1]``."""
    steps = len(logsnrs) - 1
    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        last = i == steps - 1
        z = step(denoise, z, _per_sample(logsnrs[i], z), _per_sample(logsnrs[i + 1], z), last, generator)
        if callback is not None:
            callback(i, z)
    return z


def ancestral_step(denoise: Denoise, z: Tensor, logsnr_t: Tensor, logsnr_s: Tensor, last: bool, generator,
                   gamma: float = 0.3) -> Tensor:
    """``z_s = μ̃_{s|t}(z_t, x̂_θ(z_t)) + sqrt((σ̃²_{s|t})^{1−γ} (σ²_{t|s})^γ) ε`` (paper §2)."""
    x0 = denoise(z, logsnr_t)
    mean, var_posterior, var_forward = posterior(z, x0, logsnr_t, logsnr_s)
    if last:
        return mean
    var = var_posterior ** (1 - gamma) * var_forward**gamma
    return mean + var.sqrt() * _noise_like(z, generator)


def ddim_step(denoise: Denoise, z: Tensor, logsnr_t: Tensor, logsnr_s: Tensor, last: bool, generator,
              eta: float = 0.0) -> Tensor:
    """``z_s = α_s x̂ + sqrt(σ_s² − σ_η²) ε̂ + σ_η ε`` with ``σ_η = η σ̃_{s|t}`` (η = 0: deterministic;
    η = 1: the ancestral step with γ = 0)."""
    x0 = denoise(z, logsnr_t)
    eps = eps_from_x0(z, x0, logsnr_t)
    alpha_s, sigma_s = (append_dims(v, z.ndim) for v in alpha_sigma(logsnr_s))
    _, var_posterior, _ = posterior(z, x0, logsnr_t, logsnr_s)
    var_eta = 0.0 if last else eta**2 * var_posterior
    z_s = alpha_s * x0 + (sigma_s**2 - var_eta).clamp(min=0).sqrt() * eps
    if last or eta == 0:
        return z_s
    return z_s + var_eta.sqrt() * _noise_like(z, generator)


def langevin_correct(denoise: Denoise, z: Tensor, logsnr: Tensor, generator, delta: float = 0.1) -> Tensor:
    """One Langevin correction at the current noise level (paper §2):
    ``z ← z − ½ δ σ ε_θ(z) + sqrt(δ) σ ε′`` (a step of size δσ² along the score ``−ε_θ/σ``)."""
    x0 = denoise(z, logsnr)
    eps = eps_from_x0(z, x0, logsnr)
    sigma = append_dims(alpha_sigma(logsnr)[1], z.ndim)
    return z - 0.5 * delta * sigma * eps + delta**0.5 * sigma * _noise_like(z, generator)


def pc_step(denoise: Denoise, z: Tensor, logsnr_t: Tensor, logsnr_s: Tensor, last: bool, generator,
            gamma: float = 0.0, delta: float = 0.1, corrector_steps: int = 1) -> Tensor:
    """Ancestral predictor, then ``corrector_steps`` Langevin corrections at the new level (none at the end)."""
    z = ancestral_step(denoise, z, logsnr_t, logsnr_s, last, generator, gamma=gamma)
    for _ in range(0 if last else corrector_steps):
        z = langevin_correct(denoise, z, logsnr_s, generator, delta=delta)
    return z


def sample_ancestral(denoise: Denoise, z: Tensor, logsnrs: Tensor, *, generator=None, progress=False,
                     callback=None, gamma: float = 0.3) -> Tensor:
    """The paper's ancestral sampler with variance interpolation γ (UCF101 0.1, BAIR 0.0, text-to-video 0.3)."""
    return _run(partial(ancestral_step, gamma=gamma), denoise, z, logsnrs, generator, progress, callback)


def sample_ddim(denoise: Denoise, z: Tensor, logsnrs: Tensor, *, generator=None, progress=False,
                callback=None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021) on the continuous-time grid; η = 0 is deterministic."""
    return _run(partial(ddim_step, eta=eta), denoise, z, logsnrs, generator, progress, callback)


def sample_predictor_corrector(denoise: Denoise, z: Tensor, logsnrs: Tensor, *, generator=None, progress=False,
                               callback=None, gamma: float = 0.0, delta: float = 0.1,
                               corrector_steps: int = 1) -> Tensor:
    """Predictor–corrector (paper §2; BAIR: 256 ancestral steps + 256 Langevin corrections, δ = 0.1)."""
    step = partial(pc_step, gamma=gamma, delta=delta, corrector_steps=corrector_steps)
    return _run(step, denoise, z, logsnrs, generator, progress, callback)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ancestral": sample_ancestral,
    "ddim": sample_ddim,
    "pc": sample_predictor_corrector,
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """A sampler by its short name: ``ancestral``, ``ddim`` or ``pc``."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]
