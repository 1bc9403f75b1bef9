"""Typed configs of the first stage, importable without torch (``--help`` reads them before anything heavy loads).

:class:`AutoencoderConfig` is the architecture (LDM / SD KL layout, docs/method.md); :class:`AutoencoderLossConfig`
the settings of LDM's ``LPIPSWithDiscriminator``, under the same names :class:`autoencoder.AutoencoderLoss` takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CLASS_NAME = "LatentVideoAutoencoderKL"  # ``_class_name`` in the config.json of our model folders

PerceptualMode = Literal["pretrained", "untrained", "none"]
LpipsNet = Literal["alex", "vgg"]
DiscNorm = Literal["batch", "group", "none"]


@dataclass
class AutoencoderConfig:
    """Architecture of :class:`AutoencoderKL` and the latent normalisation z' = (z − shift) · scale.

    Level i has width ``base_channels · channel_mult[i]``; every level but the last halves the resolution, so
    the downsampling factor is 2^(levels − 1). ``latent_scale`` is LDM's scale-by-std (SD: 0.18215).
    """

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 4
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dropout: float = 0.0
    mid_attention: bool = True
    latent_scale: float = 1.0
    latent_shift: float = 0.0

    def __post_init__(self) -> None:
        self.channel_mult = [int(m) for m in self.channel_mult]
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty list of positive ints: {self.channel_mult}")
        uneven = [w for w in self.widths if w % self.norm_groups]
        if uneven:
            raise ValueError(f"norm_groups={self.norm_groups} must divide every level width, not {uneven}")

    @property
    def widths(self) -> list[int]:
        """Channel width of each resolution level, full resolution first."""
        return [self.base_channels * m for m in self.channel_mult]

    @property
    def downsample_factor(self) -> int:
        """Spatial factor F between frames and latents: 2^(levels − 1)."""
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def sd(cls) -> AutoencoderConfig:
        """The SD / LDM KL-f8 VAE: 128 × [1, 2, 4, 4], 2 blocks, z = 4, scale 0.18215 (83.65M params)."""
        return cls(base_channels=128, channel_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4,
                   latent_scale=0.18215)

    @classmethod
    def cpu(cls, factor: int = 4) -> AutoencoderConfig:
        """A small VAE for 64×64 frames on a CPU: base 32, one block per level, factor 4 or 8."""
        channel_mult = {4: [1, 2, 2], 8: [1, 2, 2, 4]}
        if factor not in channel_mult:
            raise ValueError(f"AutoencoderConfig.cpu factor must be 4 or 8, got {factor}")
        return cls(base_channels=32, channel_mult=channel_mult[factor], num_res_blocks=1, norm_groups=8)

@dataclass
class AutoencoderLossConfig:
    """LDM's ``LPIPSWithDiscriminator`` (docs/method.md): rec = |x − x̂| + w_p·LPIPS, nll = rec/e^logvar + logvar,
    L = nll + kl_weight·KL + λ_d·g_loss once ``step ≥ disc_start``."""

    reconstruction: Literal["l1", "l2"] = "l1"  # pixel term of rec
    perceptual: PerceptualMode = "pretrained"  # LPIPS backbone: local torchvision weights, random, or no term
    lpips_net: LpipsNet = "alex"
    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6
    disc_start: int = 50001  # first step with the adversarial term (LDM's KL-f8 default)
    disc_weight: float = 0.5  # scales the adaptive weight λ_d
    disc_factor: float = 1.0
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_num_layers: int = 3  # PatchGAN depth
    disc_norm: DiscNorm = "group"  # GroupNorm: per-sample statistics, so a step is the same at any process count and
    # micro-batch split (LDM's batch: statistics of each process's micro-batch, SyncBatchNorm across GPUs)
    logvar_init: float = 0.0  # the learned output log-variance starts here
