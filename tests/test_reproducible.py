"""A seed names a video: the same saved model, config and seed give the same frames, bit for bit on the CPU, in the
process that trained the model, in one that resumed its training, and in a fresh one (the same thread count)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.core.config import load_config
from pipelines.stages.configs import DiffusionTrainConfig, GenerateConfig
from pipelines.stages.generate import generate
from pipelines.stages.train_diffusion import train_diffusion
from tests.pipeline_helpers import diffusion_overrides

REPO = Path(__file__).resolve().parents[1]
quiet = lambda *args, **kwargs: None  # noqa: E731


def _overrides(model: Path, out: Path) -> list[str]:
    """Text-conditioned extension (two chunks, guidance on) and a sweep-like first chunk: every sampling path."""
    return [f"model={model}", f"out_dir={out}", "prompts=[a red circle moving left,a blue square moving up]",
            "num_frames=10", "sampling.steps=4", "sampling.guidance=1.5", "raw_frames=true", "seed=7"]


def _frames(out: Path) -> np.ndarray:
    summary = json.loads((out / "generation_reconstruction.json").read_text())
    return np.stack([np.load(out / s["frames"]) for s in summary["samples"]])


@pytest.mark.slow
def test_a_seed_gives_the_same_video_in_the_training_process_after_a_resume_and_in_a_fresh_one(chain, tmp_path):
    run_dir = tmp_path / "dif"
    train_diffusion(load_config(DiffusionTrainConfig, None, diffusion_overrides(chain["latents"], run_dir)), quiet)
    trained = tmp_path / "trained"  # sampled by the process that has just trained the model
    generate(load_config(GenerateConfig, None, _overrides(run_dir, trained)), quiet)
    summary = train_diffusion(load_config(DiffusionTrainConfig, None, diffusion_overrides(chain["latents"],
                                                                                          run_dir)), quiet)
    assert summary["started_at_step"] == summary["steps"]  # the second call resumed at the end
    resumed = tmp_path / "resumed"
    generate(load_config(GenerateConfig, None, _overrides(run_dir, resumed)), quiet)
    fresh = tmp_path / "fresh"
    threads = str(torch.get_num_threads())
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), *_overrides(run_dir, fresh)],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = _frames(trained)
    np.testing.assert_array_equal(_frames(resumed), reference)
    np.testing.assert_array_equal(_frames(fresh), reference)
    videos = sorted(p.name for p in trained.glob("*.mp4"))
    assert videos and all((fresh / v).read_bytes() == (trained / v).read_bytes() for v in videos)  # the MP4s too
    other = tmp_path / "other_seed"
    generate(load_config(GenerateConfig, None, [*_overrides(run_dir, other), "seed=8"]), quiet)
    assert not np.array_equal(_frames(other), reference)  # the seed is what names the video
