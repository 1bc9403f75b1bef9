"""Stage 2: continuous-time Gaussian diffusion on latent videos ``[b, c, f, h, w]`` (Ho et al. 2022).

Never imports ``autoencoder``: it works on latents, whoever made them. Names are imported lazily (PEP 562), so
``import diffusion.config`` stays free of torch.
"""

from importlib import import_module

_EXPORTS = {
    "BACKENDS": "config", "ScheduleConfig": "config", "UNet3DConfig": "config",
    "xformers_available": "attention",  # the function `attention` lives at diffusion.attention.attention
    "Denoiser": "denoiser", "diffusion_loss": "denoiser", "drop_conditioning": "denoiser", "loss_weight": "denoiser",
    "EMA": "ema",
    "classifier_free_guidance": "guidance", "super_resolution_guidance": "guidance", "area_downsample": "guidance",
    "temporal_conditioning": "guidance",
    "SAMPLERS": "sampling", "get_sampler": "sampling", "sample_ancestral": "sampling", "sample_ddim": "sampling",
    "sample_predictor_corrector": "sampling",
    "NoiseSchedule": "schedule", "Prediction": "schedule", "alpha_sigma": "schedule", "append_dims": "schedule",
    "q_sample": "schedule",
    "UNet3D": "unet3d", "known_inputs": "unet3d",
}
_SUBMODULES = ("cpu_kernels",)
__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return import_module(f"diffusion.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffusion' has no attribute {name!r}")
    value = getattr(import_module(f"diffusion.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
