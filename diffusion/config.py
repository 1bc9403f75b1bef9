"""Typed configs of the diffusion model, importable without torch (``--help`` reads them before anything heavy
loads): the space-time U-Net's hyper-parameters (paper §3 and its table) and the noise schedule (paper §2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

AttentionBackend = Literal["auto", "xformers", "sdpa", "math"]
BACKENDS = ("auto", "xformers", "sdpa", "math")


@dataclass(frozen=True)
class ScheduleConfig:
    """The noise schedule ``t ↦ λ_t`` on ``t ∈ [0, 1]``, clipped to ``[logsnr_min, logsnr_max]``
    (:class:`diffusion.NoiseSchedule` adds the arithmetic).

    * ``cosine`` (the paper's): ``λ(t) = −2 log tan(a t + b)`` with ``b = arctan(e^{−λ_max/2})`` and
      ``a = arctan(e^{−λ_min/2}) − b``, so ``λ(0) = λ_max`` and ``λ(1) = λ_min`` exactly.
      ``shift`` adds a constant to λ (the "shifted cosine" of Hoogeboom et al. 2023; ``2·log(64/res)``
      for a ``res``-pixel model) while the endpoints stay at the clip range. With ``shift_clean`` the shift
      itself moves with t, the "interpolated" schedule of the same paper: ``λ(t) = t·λ_shift(t) +
      (1 − t)·λ_shift_clean(t)``, so the noisy end keeps ``shift`` and the clean end ``shift_clean``.
    * ``linear``: the continuous DDPM schedule with β linear in t (β₀ = 0.1, β₁ = 20, as in Song et al.'s VP
      SDE): ``λ(t) = −log(expm1(β₀ t + ½ (β₁ − β₀) t²))``, for comparison.
    """

    kind: Literal["cosine", "linear"] = "cosine"  # the paper's cosine, or the continuous DDPM (VP SDE) one
    logsnr_min: float = -20.0
    logsnr_max: float = 20.0
    shift: float = 0.0  # added to λ: negative values train and sample more at high noise
    shift_clean: Optional[float] = None  # cosine: the shift at t = 0, interpolated linearly in t to shift at t = 1

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "linear"):
            raise ValueError(f"schedule kind must be 'cosine' or 'linear', got {self.kind!r}")
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError("logsnr_min must be below logsnr_max")
        if self.shift_clean is not None and self.kind != "cosine":
            raise ValueError("shift_clean interpolates shifted cosine schedules: it needs kind 'cosine'")


@dataclass
class UNet3DConfig:
    """Hyper-parameters of the space-time U-Net (paper Table of hyper-parameters; defaults: T2V 16×64×64
    scaled to SD-VAE latents)."""

    in_channels: int = 4
    out_channels: int = 4
    base_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attention_levels: list[int] = field(default_factory=lambda: [1, 2, 3])  # level 0 = full resolution
    head_dim: int = 64
    norm_groups: int = 32
    dropout: float = 0.0
    cond_dim: int = 0  # pooled conditioning embedding (e.g. text); 0 = unconditional
    context_dim: int = 0  # token embeddings for optional cross-attention; 0 = none
    emb_dim: Optional[int] = None  # width of the noise/conditioning embedding; None = 4 × base_channels
    emb_mlp_layers: int = 2  # paper: 2 or 4
    temporal_attention: bool = True
    max_relative_distance: int = 32  # relative positions beyond ±k frames share an embedding (Shaw et al.)
    frame_positions: int = 0  # > 0: also a learned absolute embedding of the frame index (0 = relative only)
    coordinates: bool = False  # also feed the network each pixel's (x, y) in [-1, 1] (CoordConv input channels)
    known_frames: bool = False  # also input the clean latents of the frames a sample is conditioned on, and a mask
    attention_backend: AttentionBackend = "auto"  # xformers (CUDA only), PyTorch SDPA, or the math reference
    gradient_checkpointing: bool = False
    channels_last: bool = False  # NHWC activations (often faster convolutions on GPUs)

    def __post_init__(self) -> None:
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}")
        if self.emb_mlp_layers < 1:
            raise ValueError("emb_mlp_layers must be at least 1")
        bad = [level for level in self.attention_levels if not 0 <= level < len(self.channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} outside 0..{len(self.channel_mult) - 1}")
        for mult in self.channel_mult:
            if (mult * self.base_channels) % self.norm_groups:
                raise ValueError(f"norm_groups={self.norm_groups} must divide every width "
                                 f"(base_channels × channel_mult), not {mult * self.base_channels}")

    @property
    def downsample_factor(self) -> int:
        """Spatial size must be divisible by this (2^(levels − 1))."""
        return 2 ** (len(self.channel_mult) - 1)
