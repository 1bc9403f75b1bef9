"""The preconditioning wrapper and the training objective (paper §2).

:class:`Denoiser` turns the raw network into ``x̂_θ(z_t, λ_t, c)``, whatever the network predicts; samplers and
guidance see nothing else. :func:`diffusion_loss` is the weighted MSE on x̂,
``L = E_{ε,t}[w(λ_t) ‖x̂_θ(z_t) − x‖²]``, with the weightings that equal ε-, v- and min-SNR losses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from diffusion.schedule import NoiseSchedule, Prediction, q_sample, x0_from_output

Weighting = Literal["auto", "eps", "v", "x"]
WEIGHTINGS = ("auto", "eps", "v", "x")


class Denoiser(nn.Module):
    """``x̂_θ(z_t, λ_t, **conditioning)`` from a raw network and its parameterisation."""

    def __init__(self, net: nn.Module, prediction: Prediction | str = Prediction.EPS):
        super().__init__()
        self.net = net
        self.prediction = Prediction(prediction)

    def forward(self, z: Tensor, logsnr: Tensor, **conditioning) -> Tensor:
        """``z [b, ...]``, ``logsnr [b]`` (or a scalar) → x̂ with the shape of ``z``, in float32."""
        logsnr = torch.as_tensor(logsnr, device=z.device, dtype=torch.float32).expand(z.shape[0])
        output = self.net(z, logsnr, **conditioning)
        return x0_from_output(output.float(), z.float(), logsnr, self.prediction)


def loss_weight(logsnr: Tensor, weighting: Weighting, prediction: Prediction) -> Tensor:
    """``w(λ)`` of the x̂-MSE: ε-MSE ≡ ``e^λ``, v-MSE ≡ ``1 + e^λ``, x-MSE ≡ 1 (paper §2). ``auto`` picks the
    weighting that matches the parameterisation."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "auto":
        weighting = Prediction(prediction).value
    snr = torch.exp(logsnr.double())
    weight = {"eps": snr, "v": 1 + snr, "x": torch.ones_like(snr)}
    return weight[weighting].float()


def drop_conditioning(
    conditioning: Mapping[str, Tensor], null: Mapping[str, Tensor], p_uncond: float,
    generator: Optional[torch.Generator] = None, uniform: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """Replace each sample's conditioning by the null embedding with probability ``p_uncond``, so one network
    learns both ``ε_θ(z, c)`` and ``ε_θ(z)`` for classifier-free guidance (Ho & Salimans 2021). ``uniform [b]``
    (U[0, 1) draws) may be given instead of drawing them from ``generator``."""
    if p_uncond <= 0 or not conditioning:
        return dict(conditioning)
    b = next(iter(conditioning.values())).shape[0]
    device = next(iter(conditioning.values())).device
    if uniform is None:
        uniform = torch.rand(b, generator=generator, device=device)
    drop = uniform.to(device) < p_uncond
    out = {}
    for key, value in conditioning.items():
        keep = drop.reshape((b,) + (1,) * (value.ndim - 1))
        out[key] = torch.where(keep, null[key].to(value.dtype).expand_as(value), value)
    return out


def diffusion_loss(
    denoiser: Denoiser,
    x0: Tensor,
    schedule: NoiseSchedule,
    conditioning: Optional[Mapping[str, Tensor]] = None,
    null_conditioning: Optional[Mapping[str, Tensor]] = None,
    p_uncond: float = 0.0,
    weighting: Weighting = "auto",
    generator: Optional[torch.Generator] = None,
    t: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    drop_uniform: Optional[Tensor] = None,
    loss_mask: Optional[Tensor] = None,
    **net_kwargs,
) -> Tensor:
    """Per-sample loss ``[b]``: ``w(λ_t) · mean ‖x̂_θ(z_t) − x‖²`` with ``t ~ U[0, 1]`` (stratified over the
    batch to lower the variance), ``z_t = α_t x + σ_t ε``. ``x0`` may have any rank ≥ 2.

    ``t [b]``, ``noise`` (shaped like ``x0``) and ``drop_uniform [b]`` may be drawn by the caller (e.g. per
    sample, so a run is the same at any process count); whatever is not given is drawn from ``generator``.
    ``loss_mask`` (broadcastable to ``x0``, 1 = counted) averages the error over part of each sample only, e.g.
    leaving out the frames a conditional model is given."""
    b = x0.shape[0]
    if t is None:
        t = (torch.arange(b, device=x0.device) + torch.rand(b, generator=generator, device=x0.device)) / b
        t = t[torch.randperm(b, generator=generator, device=x0.device)]
    logsnr = schedule.logsnr(t.to(x0.device))
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    z = q_sample(x0, logsnr, noise.to(x0.dtype))
    conditioning = conditioning or {}
    if null_conditioning is not None:
        conditioning = drop_conditioning(conditioning, null_conditioning, p_uncond, generator, drop_uniform)
    x0_hat = denoiser(z, logsnr, **conditioning, **net_kwargs)
    error = (x0_hat - x0.float()).pow(2)
    if loss_mask is None:
        mse = error.flatten(1).mean(dim=1)
    else:
        mask = loss_mask.to(error.dtype).expand_as(error).flatten(1)
        mse = (error.flatten(1) * mask).sum(1) / mask.sum(1).clamp_min(1)
    return loss_weight(logsnr, weighting, denoiser.prediction) * mse
