"""Tiny, randomly initialised networks for tests that must run in seconds on a CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusion import Denoiser, UNet3D, UNet3DConfig, cpu_kernels


def tiny_unet_config(**overrides) -> UNet3DConfig:
    """Two levels, attention (spatial and temporal) at both, 16-d heads."""
    base = dict(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[0, 1], head_dim=8,
                norm_groups=4, cond_dim=12, emb_dim=32)
    return UNet3DConfig(**{**base, **overrides})


def randomise_temporal_layers(net: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised output projections random weights, so every path carries signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def tiny_denoiser(prediction: str = "eps", **overrides) -> Denoiser:
    """A :class:`Denoiser` over a random tiny U-Net in eval mode, every layer active, with the CPU fast paths
    swapped in as the pipelines build it for a CPU."""
    net = cpu_kernels.install(UNet3D(tiny_unet_config(**overrides)))
    randomise_temporal_layers(net)
    return Denoiser(net, prediction).eval()


class TinyI3D(nn.Module):
    """Stands in for StyleGAN-V's I3D: the same call, ``forward(x, rescale, resize, return_features)`` on uint8
    ``[b, 3, t, h, w]``, returning ``[b, 8]`` features (a mean-pooled 3-D convolution). It refuses any other call
    than the one StyleGAN-V's FVD makes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise RuntimeError("expected uint8 videos")
        if not (rescale and resize and return_features):
            raise RuntimeError("expected rescale=True, resize=True, return_features=True")
        h = x.float() / 127.5 - 1
        h = F.interpolate(h, size=[x.shape[2], 16, 16], mode="trilinear", align_corners=False)
        features = torch.relu(self.conv(h)).mean(dim=[2, 3, 4])
        return features if return_features else features.softmax(dim=1)
