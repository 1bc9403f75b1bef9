"""Stage 2: continuous-time Gaussian diffusion on latent videos ``[b, c, f, h, w]`` (Ho et al. 2022).

Never imports ``autoencoder``: it works on latents, whoever made them.
"""

from diffusion.attention import attention, xformers_available
from diffusion.denoiser import Denoiser, diffusion_loss, drop_conditioning, loss_weight
from diffusion.ema import EMA
from diffusion.guidance import classifier_free_guidance, super_resolution_guidance, temporal_conditioning
from diffusion.sampling import (
    SAMPLERS,
    get_sampler,
    sample_ancestral,
    sample_ddim,
    sample_predictor_corrector,
)
from diffusion.schedule import NoiseSchedule, Prediction, alpha_sigma, append_dims, q_sample
from diffusion.unet3d import UNet3D, UNet3DConfig

__all__ = [
    "EMA", "SAMPLERS", "Denoiser", "NoiseSchedule", "Prediction", "UNet3D", "UNet3DConfig", "alpha_sigma",
    "append_dims", "attention", "classifier_free_guidance", "diffusion_loss", "drop_conditioning", "get_sampler",
    "loss_weight", "q_sample", "sample_ancestral", "sample_ddim", "sample_predictor_corrector",
    "super_resolution_guidance", "temporal_conditioning", "xformers_available",
]
