"""The command-line front door: --help everywhere, exit codes and one-line errors, and a real run."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.media.video_io import read_frames

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_autoencoder", "evaluate_autoencoder", "encode_latents", "train_diffusion", "generate", "demo"]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help_with_types_choices_defaults_and_comments(script):
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    keys = [line for line in result.stdout.splitlines() if line.startswith("  ") and ": " in line and " = " in line]
    assert len(keys) > 5
    documented = [line for line in keys if "  # " in line]
    assert len(documented) >= len(keys) // 3  # the dataclass field comments are the keys' documentation


def test_help_shows_literal_choices_types_and_field_comments():
    out = run("generate", "--help").stdout
    assert "sampling.sampler: {ancestral, ddim, pc} = ddim" in out
    assert "method: {reconstruction, replacement} = reconstruction  # paper §3.1" in out
    assert "chunk_frames: int or null = null  # frames per sampled chunk" in out
    out = run("train_diffusion", "--help").stdout
    assert "run.report_to: {none, tensorboard, wandb, all} = none" in out
    assert "model.unet.attention_backend: {auto, xformers, sdpa, math} = auto" in out
    # a comment continued on the next source line is joined to its field
    assert "images: list[str] = []  # image folders to draw them from (default: other frames of the same clip)" in out


def test_help_imports_no_torch():
    """``--help`` parses with configs alone: the schemas of every script import without torch."""
    code = ("import sys; import pipelines.stages.configs, pipelines.demo.config, pipelines.evaluation.config; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "False", result.stderr


def test_demo_help_hides_the_keys_it_wires_and_refuses_them():
    out = run("demo", "--help").stdout
    assert "diffusion.data.latents" not in out and "generate.model:" not in out and "encode.out_dir" not in out
    assert "diffusion.run.steps" in out and "generate.sampling.guidance" in out
    result = run("demo", "diffusion.data.latents=/elsewhere")
    assert result.returncode == 2 and "diffusion.data.latents" in result.stderr


def test_unknown_key_and_wrong_type_exit_2_naming_the_key():
    result = run("train_diffusion", "model.unet.base_chanels=64")
    assert result.returncode == 2 and "base_chanels" in result.stderr
    result = run("generate", "num_frames=many")
    assert result.returncode == 2 and "num_frames" in result.stderr
    result = run("generate", "method=inpaint")
    assert result.returncode == 2 and "method" in result.stderr


@pytest.mark.parametrize("script, override, key", [
    ("train_diffusion", "run.checkpoint_every=0", "checkpoint_every"),
    ("train_autoencoder", "run.batch_size=0", "batch_size"),
    ("generate", "prompts=[]", "prompts"),
    ("generate", "w_r=-1", "w_r"),
    ("train_diffusion", "model.p_uncond=2", "p_uncond"),
    ("encode_latents", "videos_per_shard=0", "videos_per_shard"),
    ("train_diffusion", "run.compile=maybe", "compile"),
    ("train_diffusion", "data.vae_dtype=fp8", "vae_dtype"),
    ("generate", "mixed_precision=fp8", "mixed_precision"),
    ("train_autoencoder", "run.compile=true", "run.compile"),
])
def test_run_value_errors_exit_2_with_one_line_naming_the_key(script, override, key):
    result = run(script, override)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and key in result.stderr


def test_missing_inputs_are_one_line_errors_with_exit_2(tmp_path):
    result = run("encode_latents", f"autoencoder={tmp_path / 'nope'}", f"videos=[{tmp_path}]")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "nope" in result.stderr
    result = run("generate", f"model={tmp_path / 'missing'}", "prompts=[a red circle]")
    assert result.returncode == 2 and "no diffusion checkpoint" in result.stderr


def test_internal_errors_keep_their_traceback():
    """Only bad input becomes one line: a bug (any other exception) propagates with its traceback."""
    from pipelines.core.cli import main
    from pipelines.stages.configs import GenerateConfig

    def buggy(config):
        raise RuntimeError("a real bug")

    with pytest.raises(RuntimeError, match="a real bug"):
        main(GenerateConfig, buggy, "", argv=["prompts=[a]"])
    with pytest.raises(SystemExit) as exit_info:
        main(GenerateConfig, lambda config: (_ for _ in ()).throw(FileNotFoundError("no such file: x")), "",
             argv=["prompts=[a]"])
    assert exit_info.value.code == 2


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


def test_resuming_another_model_is_refused_in_one_line_and_writes_nothing(chain, tmp_path):
    """A run folder whose checkpoint holds another model config (here a wider U-Net) is not continued: exit 2,
    one line naming the changed key, the run's files untouched."""
    import shutil

    from tests.pipeline_helpers import diffusion_overrides

    run_dir = tmp_path / "dif"
    shutil.copytree(chain["diffusion"], run_dir)
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    result = run("train_diffusion", *diffusion_overrides(chain["latents"], run_dir), "model.unet.base_channels=16",
                 "run.device=cpu")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "model.unet.base_channels" in result.stderr and "run.resume=false" in result.stderr
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before


def test_encoding_into_shards_of_other_settings_is_refused_in_one_line(chain, tmp_path):
    """Latent shards made with other settings (here 6-frame clips instead of 8) are never mixed with new ones:
    exit 2, one line naming what changed, the folder untouched."""
    import shutil

    from tests.pipeline_helpers import encode_overrides

    latents = tmp_path / "lat"
    shutil.copytree(chain["latents"], latents)
    before = {p: p.read_bytes() for p in sorted(latents.rglob("*")) if p.is_file()}
    result = run("encode_latents", *encode_overrides(chain["autoencoder"] / "model", chain["videos"], latents),
                 "clip.num_frames=6")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "made with other settings" in result.stderr and "clip" in result.stderr
    assert {p: p.read_bytes() for p in sorted(latents.rglob("*")) if p.is_file()} == before
