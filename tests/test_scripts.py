"""The command-line front door: --help everywhere, exit codes and one-line errors, and a real run."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.video_io import read_frames

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_autoencoder", "evaluate_autoencoder", "encode_latents", "train_diffusion", "generate", "demo"]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help_listing_its_keys(script):
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert "config keys" in result.stdout and "--config" in result.stdout


def test_unknown_key_and_wrong_type_exit_2_naming_the_key():
    result = run("train_diffusion", "model.unet.base_chanels=64")
    assert result.returncode == 2 and "base_chanels" in result.stderr
    result = run("generate", "num_frames=many")
    assert result.returncode == 2 and "num_frames" in result.stderr
    result = run("generate", "method=inpaint")
    assert result.returncode == 2 and "method" in result.stderr


def test_missing_inputs_are_one_line_errors_with_exit_1(tmp_path):
    result = run("encode_latents", f"autoencoder={tmp_path / 'nope'}", f"videos=[{tmp_path}]")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "nope" in result.stderr
    result = run("generate", f"model={tmp_path / 'missing'}")
    assert result.returncode == 1 and "no diffusion checkpoint" in result.stderr


def test_the_four_stages_through_their_scripts(chain, tmp_path):
    """Real files end to end through the scripts: encode (with broken files), a resumed training, generation."""
    lat, dif, gen = tmp_path / "lat", tmp_path / "dif", tmp_path / "gen"
    result = run("encode_latents", f"autoencoder={chain['autoencoder'] / 'model'}", f"videos=[{chain['videos']}]",
                 f"out_dir={lat}", "clip.size=32", "clip.num_frames=8")
    assert result.returncode == 0, result.stderr
    from tests.pipeline_helpers import diffusion_overrides

    result = run("train_diffusion", *diffusion_overrides(lat, dif, steps=2))
    assert result.returncode == 0, result.stderr
    result = run("generate", f"model={dif}", "prompts=[a yellow triangle moving down]", "num_frames=10",
                 "context_frames=2", "sampling.steps=2", f"out_dir={gen}")
    assert result.returncode == 0, result.stderr
    videos = sorted(gen.glob("*.mp4"))
    assert len(videos) == 1 and read_frames(videos[0]).shape[0] == 10
