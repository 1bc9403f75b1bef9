"""Shared fixtures: deterministic seeds, and one small on-disk chain (videos → VAE → latents → model) that the
pipeline tests build once per session."""

from pathlib import Path

import pytest
import torch

from pipelines.core.config import load_config
from pipelines.stages.configs import AutoencoderTrainConfig, DiffusionTrainConfig, EncodeConfig
from pipelines.stages.encode_latents import encode_latents
from pipelines.stages.train_autoencoder import train_autoencoder
from pipelines.stages.train_diffusion import train_diffusion
from tests.pipeline_helpers import autoencoder_overrides, diffusion_overrides, encode_overrides, make_test_videos


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def chain(tmp_path_factory) -> dict[str, Path]:
    """Real video files (some broken), a trained tiny VAE, its latent shards and a trained tiny diffusion model."""
    root = tmp_path_factory.mktemp("chain")
    videos = make_test_videos(root)
    quiet = lambda *args, **kwargs: None  # noqa: E731
    train_autoencoder(load_config(AutoencoderTrainConfig, None, autoencoder_overrides(videos, root / "ae")), quiet)
    encode_latents(load_config(EncodeConfig, None, encode_overrides(root / "ae" / "model", videos, root / "lat")),
                   quiet)
    train_diffusion(load_config(DiffusionTrainConfig, None, diffusion_overrides(root / "lat", root / "dif")), quiet)
    return {"root": root, "videos": videos, "autoencoder": root / "ae", "latents": root / "lat",
            "diffusion": root / "dif"}
