"""KL-regularised autoencoder in the LDM / Stable Diffusion layout (Rombach et al. 2022; docs/method.md,
"KL autoencoder").

Parameter names are LDM's own (``encoder.down.{i}.block.{j}.conv1``, ``encoder.mid.attn_1.q``,
``decoder.up.{i}`` with ``up.0`` at full resolution, ...), so an LDM or SD state dict loads with no renaming.
Frames are ``[n, c, H, W]`` in [-1, 1]; latents ``[n, z, H/F, W/F]`` with F = ``config.downsample_factor``.
Videos go through :mod:`autoencoder.video`, which folds frames into the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from autoencoder.config import AutoencoderConfig

LOGVAR_RANGE = (-30.0, 20.0)


class DiagonalGaussian:
    """Posterior q(z | x) = N(mean, diag(exp(logvar))) over latents ``[n, z, h, w]``.

    Built from the encoder's moments ``[n, 2z, h, w]`` (mean, then log-variance), log-variance clamped to
    [−30, 20] as in LDM.
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)

    @property
    def std(self) -> torch.Tensor:
        """σ = exp(logvar / 2), ``[n, z, h, w]``."""
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        """σ² = exp(logvar), ``[n, z, h, w]``."""
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """z = mean + σ ε with ε ~ N(0, I) drawn from ``generator``, or ``noise`` given; ``[n, z, h, w]``."""
        mean = self.mean
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype) if noise is None \
            else noise.to(mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The posterior mode (= mean), ``[n, z, h, w]``."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) = ½ Σ (mean² + σ² − 1 − log σ²) per sample, ``[n]``."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


def _group_norm(channels: int, config: AutoencoderConfig) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_groups, channels, eps=config.norm_eps)


def _run(module: nn.Module, h: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """``module(h)``; with ``checkpointing`` and grads on, recomputed in the backward pass, not stored."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(module, h, use_reentrant=False)
    return module(h)


class ResnetBlock(nn.Module):
    """x ↦ shortcut(x) + conv2(dropout(SiLU(GN(conv1(SiLU(GN(x))))))).

    The shortcut is a 1×1 conv ``nin_shortcut`` when the widths differ, else the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, config: AutoencoderConfig):
        super().__init__()
        self.norm1 = _group_norm(in_channels, config)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, config)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                             else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h·w positions, x ↦ x + proj_out(softmax(q kᵀ/√c) v).

    q, k, v, proj_out are 1×1 convs (LDM layout, so LDM and diffusers weights load), applied to the tokens as
    matrix products (oneDNN's 1×1 convolution is slow at small h·w on the CPU); the product runs in
    ``F.scaled_dot_product_attention``.
    """

    def __init__(self, channels: int, config: AutoencoderConfig):
        super().__init__()
        self.norm = _group_norm(channels, config)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = rearrange(self.norm(x), "n c h w -> n 1 (h w) c")  # one head of h·w tokens
        q, k, v = (F.linear(tokens, proj.weight.flatten(1), proj.bias) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/√c, as LDM's c^(-1/2)
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + rearrange(out, "n 1 (h w) c -> n c h w", h=x.shape[2])


class Downsample(nn.Module):
    """[n, c, H, W] → [n, c, H/2, W/2]: zero pad (0, 1, 0, 1), then a 3×3 conv with stride 2 (LDM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """[n, c, H, W] → [n, c, 2H, 2W]: nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResNet blocks ``block.{j}``, then its ``downsample`` / ``upsample`` if any."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, config: AutoencoderConfig,
                 resample: str | None):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, config) for a, b in zip(widths[:-1], widths[1:]))
        self.resample = resample
        if resample == "downsample":
            self.downsample = Downsample(out_channels)
        elif resample == "upsample":
            self.upsample = Upsample(out_channels)

    def forward(self, h: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
        for block in self.block:
            h = _run(block, h, checkpointing)
        return getattr(self, self.resample)(h) if self.resample else h


class MidBlock(nn.Module):
    """At the lowest resolution: ``block_1`` → ``attn_1`` (when ``mid_attention``) → ``block_2``."""

    def __init__(self, channels: int, config: AutoencoderConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, config)
        self.attn_1 = AttnBlock(channels, config) if config.mid_attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Frames [n, c_in, H, W] → moments [n, 2z, H/F, W/F] (posterior mean and log-variance on channels)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths, last = config.widths, len(config.widths) - 1
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        inputs = [widths[0]] + widths[:-1]
        self.down = nn.ModuleList(
            Level(c_in, c_out, config.num_res_blocks, config, "downsample" if i < last else None)
            for i, (c_in, c_out) in enumerate(zip(inputs, widths))
        )
        self.mid = MidBlock(widths[-1], config)
        self.norm_out = _group_norm(widths[-1], config)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.z_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h, self.gradient_checkpointing)
        h = _run(self.mid, h, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents [n, z, h, w] → frames [n, c_out, F·h, F·w]; ``up.{i}`` is level i (``up.0`` full resolution).

    Each level has ``num_res_blocks + 1`` blocks; levels run from the lowest resolution up.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = config.widths
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], config)
        inputs = widths[1:] + widths[-1:]  # level i is fed by level i + 1 (the last one by the mid block)
        self.up = nn.ModuleList(
            Level(inputs[i], widths[i], config.num_res_blocks + 1, config, "upsample" if i > 0 else None)
            for i in range(len(widths))
        )
        self.norm_out = _group_norm(widths[0], config)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run(self.mid, self.conv_in(z), self.gradient_checkpointing)
        for level in reversed(self.up):
            h = level(h, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The KL autoencoder: ``encoder`` → ``quant_conv`` (1×1, 2z → 2z) → q(z | x); z → ``post_quant_conv`` →
    ``decoder``. Works on frames; latents here are unscaled (``autoencoder.video`` applies ``latent_scale``).
    """

    def __init__(self, config: AutoencoderConfig | None = None):
        super().__init__()
        self.config = config if config is not None else AutoencoderConfig()
        z = self.config.z_channels
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    def encode(self, frames: torch.Tensor) -> DiagonalGaussian:
        """q(z | x) for frames ``[n, c_in, H, W]`` in [-1, 1]; latents ``[n, z, H/F, W/F]``."""
        return DiagonalGaussian(self.quant_conv(self.encoder(frames)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Frames ``[n, c_out, F·h, F·w]`` (≈ [-1, 1]) from unscaled latents ``[n, z, h, w]``."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, frames: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(reconstruction ``[n, c_out, H, W]``, posterior); decodes a posterior sample (its ε from ``generator``, or
        ``noise [n, z, h, w]``), or its mode."""
        posterior = self.encode(frames)
        z = posterior.sample(generator, noise) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's last weight W_L (``decoder.conv_out.weight``), for the adaptive GAN weight."""
        return self.decoder.conv_out.weight

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute ResNet-block and mid-block activations in the backward pass (saves training memory)."""
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled
