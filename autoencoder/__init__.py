"""The first-stage KL autoencoder (LDM / SD layout), applied frame by frame to videos ``[b, c, f, h, w]``."""

from autoencoder.loading import load_autoencoder, save_autoencoder
from autoencoder.losses import AutoencoderLoss, PatchDiscriminator, build_lpips
from autoencoder.metrics import psnr, ssim
from autoencoder.model import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from autoencoder.video import decode_video, encode_video, estimate_latent_scale, with_estimated_latent_scale

__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "AutoencoderLoss",
    "DiagonalGaussian",
    "PatchDiscriminator",
    "build_lpips",
    "decode_video",
    "encode_video",
    "estimate_latent_scale",
    "load_autoencoder",
    "psnr",
    "save_autoencoder",
    "ssim",
    "with_estimated_latent_scale",
]
