"""Shared fixtures: deterministic seeds, one small on-disk chain (videos → VAE → latents → model) that the
pipeline tests build once per session, and the two data-parallel reference runs the multi-process tests compare
with."""

from pathlib import Path

import pytest
import torch

from pipelines.core.config import load_config
from pipelines.stages.configs import AutoencoderTrainConfig, DiffusionTrainConfig, EncodeConfig
from pipelines.stages.encode_latents import encode_latents
from pipelines.stages.train_autoencoder import train_autoencoder
from pipelines.stages.train_diffusion import train_diffusion
from tests.launches import GLOBAL_BATCH, command, diffusion, run
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


@pytest.fixture(scope="session")
def ddp(chain, tmp_path_factory) -> dict:
    """The tiny model trained by two processes at batch 4 (global batch 8), data parallel."""
    work = tmp_path_factory.mktemp("ddp")
    cmd = command("train_diffusion.py", diffusion(chain["latents"], work / "ddp", GLOBAL_BATCH // 2), processes=2)
    return {"out": work / "ddp", "cmd": cmd, "log": run(cmd, work)}


@pytest.fixture(scope="session")
def single(chain, tmp_path_factory) -> dict:
    """The same model trained by one process at batch 8."""
    work = tmp_path_factory.mktemp("single")
    cmd = command("train_diffusion.py", diffusion(chain["latents"], work / "single", GLOBAL_BATCH), processes=1)
    return {"out": work / "single", "cmd": cmd, "log": run(cmd, work)}
