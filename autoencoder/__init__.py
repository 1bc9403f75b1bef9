"""The first-stage KL autoencoder (LDM / SD layout), applied frame by frame to videos ``[b, c, f, h, w]``.

Names are imported lazily (PEP 562), so ``import autoencoder.config`` stays free of torch and LPIPS.
"""

from importlib import import_module

_EXPORTS = {
    "AutoencoderConfig": "config", "AutoencoderLossConfig": "config", "CLASS_NAME": "config",
    "load_autoencoder": "loading", "save_autoencoder": "loading",
    "AutoencoderLoss": "losses", "PatchDiscriminator": "losses", "build_lpips": "losses",
    "psnr": "metrics", "ssim": "metrics",
    "AutoencoderKL": "model", "DiagonalGaussian": "model",
    "decode_video": "video", "encode_video": "video", "estimate_latent_scale": "video",
    "with_estimated_latent_scale": "video",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'autoencoder' has no attribute {name!r}")
    value = getattr(import_module(f"autoencoder.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
