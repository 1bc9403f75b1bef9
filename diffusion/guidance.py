"""Guidance as wrappers: each turns a denoise callable into another with the same signature
``denoise(z, logsnr) -> x̂``, so every sampler runs guided and conditional sampling unchanged.

* :func:`classifier_free_guidance`: ``ε̃ = (1 + w) ε_θ(z, c) − w ε_θ(z)`` (paper §3.2, eq. 7), conditional and
  unconditional in one batched forward pass, optionally limited to an interval of noise levels
  (:func:`in_interval`, Kynkäänniemi et al. 2024).
* :func:`temporal_conditioning`: sample ``x^b ~ p(x^b | x^a)`` for frames ``x^a`` known at any frame indices
  (paper §3.1), by the replacement (imputation) baseline or by reconstruction guidance
  ``x̃^b = x̂^b − (w_r α_t / 2) ∇_{z^b_t} ‖x^a − x̂^a_θ(z_t)‖²`` used inside the replacement scheme.
* :func:`super_resolution_guidance`: the same with a low-resolution ``x^a`` compared with the downsampled x̂,
  the gradient taken with respect to all of ``z_t``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion.schedule import alpha_sigma, append_dims

Denoise = Callable[[Tensor, Tensor], Tensor]
ConditionMethod = Literal["reconstruction", "replacement"]
CONDITION_METHODS = ("reconstruction", "replacement")


def classifier_free_guidance(
    model: Callable[..., Tensor],
    conditioning: Mapping[str, Tensor],
    null_conditioning: Mapping[str, Tensor],
    w: float,
    batched: bool = True,
    interval: Optional[Sequence[float]] = None,
    **net_kwargs,
) -> Denoise:
    """Bind conditioning and guidance weight ``w`` into a denoise callable.

    ``model(z, logsnr, **conditioning, **net_kwargs) -> x̂`` is a :class:`~diffusion.denoiser.Denoiser`. Since x̂ is
    affine in ε̂ at fixed ``(z, λ)``, combining x̂'s with ``(1 + w, −w)`` is exactly the paper's ε combination.
    ``w = 0`` is the conditional model alone (one forward pass). ``batched`` runs both halves as one batch.
    ``interval = (λ_lo, λ_hi)`` guides only at noise levels inside it and uses the conditional model elsewhere
    (:func:`in_interval`).
    """
    def conditional(z: Tensor, logsnr: Tensor) -> Tensor:
        return model(z, logsnr, **conditioning, **net_kwargs)

    if w == 0:
        return conditional

    def pair(z: Tensor, logsnr: Tensor) -> tuple[Tensor, Tensor]:
        if batched:
            both = {k: torch.cat([v, null_conditioning[k].to(v.dtype).expand_as(v)]) for k, v in conditioning.items()}
            return model(torch.cat([z, z]), torch.cat([logsnr, logsnr]), **both, **_twice(net_kwargs)).chunk(2)
        null = {k: null_conditioning[k].expand_as(v) for k, v in conditioning.items()}
        return conditional(z, logsnr), model(z, logsnr, **null, **net_kwargs)

    def guided(z: Tensor, logsnr: Tensor) -> Tensor:
        active = _active(z, logsnr, interval)
        if not bool(active.any()):
            return conditional(z, logsnr)  # outside the interval: one forward pass
        x_cond, x_uncond = pair(z, logsnr)
        x = x_cond + w * (x_cond - x_uncond)
        return torch.where(append_dims(active, z.ndim), x, x_cond)

    return guided


def _twice(net_kwargs: Mapping) -> dict:
    """Per-sample tensors among the network's other arguments (known frames, ``video_start [b]``), repeated for
    the batch that holds the conditional and the unconditional half; flags and counts pass as they are."""
    return {k: torch.cat([v, v]) if isinstance(v, Tensor) and v.ndim > 0 else v for k, v in net_kwargs.items()}


def _active(z: Tensor, logsnr: Tensor | float, interval: Optional[Sequence[float]]) -> Tensor:
    """``[b]`` booleans: which samples of ``z`` are guided at ``logsnr`` (a scalar or ``[b]``)."""
    return in_interval(torch.as_tensor(logsnr, device=z.device).expand(z.shape[0]), interval)


def in_interval(logsnr: Tensor, interval: Optional[Sequence[float]]) -> Tensor:
    """Kynkäänniemi et al. 2024 (*Applying Guidance in a Limited Interval Improves Sample and Distribution
    Quality*): guidance helps at middle noise levels and hurts at the highest (it collapses diversity and drifts
    off the data) and lowest ones. ``[b]`` booleans: ``λ_lo ≤ λ ≤ λ_hi`` (everywhere when ``interval`` is None)."""
    if interval is None:
        return torch.ones(logsnr.shape, dtype=torch.bool, device=logsnr.device)
    lo, hi = interval
    return (logsnr >= lo) & (logsnr <= hi)


def _gradient_of(
    denoise: Denoise, z: Tensor, logsnr: Tensor, error: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """``(x̂_θ(z), ∇_z error(x̂_θ(z)))``, summing the per-sample errors (samples are independent)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        x0 = denoise(z, logsnr)
        (grad,) = torch.autograd.grad(error(x0).sum(), z)
    return x0.detach(), grad


def temporal_conditioning(
    denoise: Denoise,
    x_known: Tensor,
    frame_index: Sequence[int],
    method: ConditionMethod = "reconstruction",
    w_r: float = 1.0,
    generator: Optional[torch.Generator] = None,
    interval: Optional[Sequence[float]] = None,
) -> Denoise:
    """Condition on frames ``x^a`` (``x_known [b, c, k, h, w]``) at ``frame_index`` (k indices along f).

    Each call first replaces ``z^a_t`` by a fresh forward sample ``α_t x^a + σ_t ε`` (the replacement scheme:
    equivalent to replacing ``z^a_s`` after every step, since the next step sees the same input); with
    ``method="reconstruction"`` the unknown frames' estimate is then corrected by the gradient of the
    reconstruction error of the known frames (paper §3.1, eq. 8). The known frames' estimate is ``x^a`` itself.

    ``interval = (λ_lo, λ_hi)`` applies the reconstruction gradient only at noise levels inside it (a scheduled
    ``w_r``, as guidance intervals schedule ``w``); elsewhere the step is the replacement scheme's, which needs no
    backward pass through the network.
    """
    if method not in CONDITION_METHODS:
        raise ValueError(f"conditioning method must be one of {CONDITION_METHODS}, got {method!r}")
    index = torch.as_tensor(list(frame_index), dtype=torch.long, device=x_known.device)
    if index.numel() != x_known.shape[2]:
        raise ValueError(f"{index.numel()} frame indices for {x_known.shape[2]} known frames")

    def conditioned(z: Tensor, logsnr: Tensor) -> Tensor:
        alpha, sigma = (append_dims(v, z.ndim) for v in alpha_sigma(logsnr))
        noise = torch.randn(x_known.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = z.clone()
        z[:, :, index] = alpha * x_known + sigma * noise  # z^a_t ~ q(z^a_t | x^a)
        guided = _active(z, logsnr, interval) if method == "reconstruction" and w_r else None
        if guided is None or not guided.any():
            x0 = denoise(z, logsnr)
        else:
            x0, grad = _gradient_of(denoise, z, logsnr, lambda x: (x_known - x[:, :, index]).pow(2).flatten(1).sum(1))
            weight = append_dims(w_r * guided.to(z.dtype), z.ndim)
            x0 = x0 - (weight * alpha / 2) * grad  # only the unknown frames' part is kept below
        x0 = x0.clone()
        x0[:, :, index] = x_known
        return x0

    return conditioned


def area_downsample(video: Tensor, size: tuple[int, int]) -> Tensor:
    """Average-pool each frame of ``[b, c, f, h, w]`` to ``size`` (differentiable)."""
    return F.adaptive_avg_pool3d(video, (video.shape[2], *size))


def super_resolution_guidance(
    denoise: Denoise,
    x_low: Tensor,
    w_r: float = 1.0,
    downsample: Callable[[Tensor, tuple[int, int]], Tensor] = area_downsample,
) -> Denoise:
    """Spatial super-resolution by reconstruction guidance (paper §3.1): ``x̃ = x̂ − (w_r α_t / 2)
    ∇_{z_t} ‖x^a − down(x̂_θ(z_t))‖²`` with ``x_low [b, c, f, h', w']`` the low-resolution video."""
    size = tuple(x_low.shape[-2:])

    def guided(z: Tensor, logsnr: Tensor) -> Tensor:
        alpha = append_dims(alpha_sigma(logsnr)[0], z.ndim)
        x0, grad = _gradient_of(denoise, z, logsnr, lambda x: (x_low - downsample(x, size)).pow(2).flatten(1).sum(1))
        return x0 - (w_r * alpha / 2) * grad

    return guided
