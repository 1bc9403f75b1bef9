"""Typed configs of the model bundle, importable without torch: the text encoder, the diffusion model (network,
parameterisation, schedule, conditioning dropout) and the sampler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from diffusion.config import ScheduleConfig, UNet3DConfig

CLIP_VOCAB_SIZE = 49408


@dataclass
class TextConfig:
    """Which text encoder, and its size."""

    kind: Literal["none", "small", "open_clip"] = "small"  # small: trained with the U-Net; open_clip: frozen CLIP
    width: int = 128  # small: transformer width (= embedding size)
    layers: int = 2  # small: transformer layers
    heads: int = 4  # small: attention heads
    context_length: int = 16  # small: tokens kept (open_clip uses the model's own, 77)
    vocab_size: int = CLIP_VOCAB_SIZE  # small: below 49 408 token ids are hashed into this many rows
    model: str = "ViT-L-14"  # open_clip: architecture
    pretrained: str = "openai"  # open_clip: a tag in the local cache, or a path to the weights file
    cache_dir: Optional[str] = None  # open_clip: where tagged weights are looked up
    use_tokens: bool = False  # also give the U-Net the token embeddings (cross-attention)


@dataclass
class DiffusionModelConfig:
    """The network and its noise process (paper §2–3)."""

    unet: UNet3DConfig = field(default_factory=lambda: UNet3DConfig(known_frames=True))  # known frames: the
    # network also learns to continue clips it is given the start of (docs/experiments/known-frames-network.md)
    prediction: Literal["eps", "v", "x"] = "eps"  # what the raw network predicts (paper §2)
    weighting: Literal["auto", "eps", "v", "x"] = "auto"  # w(λ) of the x̂-MSE; auto: the prediction's
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    p_uncond: float = 0.1  # classifier-free guidance: probability of training with the null conditioning
    p_unknown_start: float = 0.15  # with unet.frame_positions: probability of hiding that a clip starts its video
    p_known: float = 0.5  # with unet.known_frames: probability that a training clip is given its first frames
    max_known: int = 8  # with unet.known_frames: how many first frames at most (1..max_known, uniformly)
    window: Literal["random", "first_unless_known"] = "first_unless_known"  # where data.num_frames windows of
    # longer cached clips lie: anywhere; or at a clip's first frame unless it is given known frames (then anywhere:
    # an extension's context lies anywhere in a video, a first chunk starts one; docs/experiments/training-windows.md)

    def __post_init__(self) -> None:
        for name in ("p_uncond", "p_unknown_start", "p_known"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.max_known < 1:
            raise ValueError(f"max_known must be at least 1, got {self.max_known}")


@dataclass
class SamplingConfig:
    """A sampler and its knobs (paper §2): ``ancestral`` (γ), ``ddim`` (η) or ``pc`` (δ, corrections)."""

    sampler: Literal["ancestral", "ddim", "pc"] = "ddim"  # pc: ancestral steps, each followed by Langevin ones
    steps: int = 50  # denoising steps from t = 1 to t = 0
    guidance: float = 1.0  # classifier-free guidance weight w (0: the conditional model alone)
    guidance_interval: Optional[list[float]] = None  # [λ_lo, λ_hi]: guide only at these log-SNRs (Kynkäänniemi
    # et al. 2024); null: at every noise level
    gamma: float = 0.3  # ancestral / pc: variance interpolation γ (paper: 0.3 for text-to-video)
    eta: float = 0.0  # ddim: 0 deterministic, 1 ancestral-like
    delta: float = 0.1  # pc: Langevin step size δ
    corrector_steps: int = 1  # pc: corrections per step

    def __post_init__(self) -> None:
        if self.steps < 1 or self.corrector_steps < 0:
            raise ValueError(f"steps must be at least 1 and corrector_steps at least 0, got {self.steps}, "
                             f"{self.corrector_steps}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be at least 0 (0: no guidance), got {self.guidance}")
        if self.guidance_interval is not None and (len(self.guidance_interval) != 2
                                                   or self.guidance_interval[0] > self.guidance_interval[1]):
            raise ValueError(f"guidance_interval must be [λ_lo, λ_hi] with λ_lo ≤ λ_hi, got {self.guidance_interval}")

    def knobs(self) -> dict:
        """The keyword arguments of the chosen sampler."""
        return {"ancestral": {"gamma": self.gamma}, "ddim": {"eta": self.eta},
                "pc": {"gamma": self.gamma, "delta": self.delta, "corrector_steps": self.corrector_steps}}[self.sampler]
