"""The README's Python example runs as written (pointed at a trained autoencoder) and answers in seconds."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The first ```python block of the README."""
    return re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)


def test_the_readme_example_runs(chain):
    code = readme_example()
    assert 'load_autoencoder("outputs/demo/work/autoencoder/model")' in code
    code = code.replace("outputs/demo/work/autoencoder/model", str(chain["autoencoder"] / "model"))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    assert namespace["latents"].shape == (1, 4, 8, 8, 8)
    assert namespace["frames"].shape == (1, 3, 8, 32, 32) and torch.isfinite(namespace["frames"]).all()


def readme_stage_commands() -> list[str]:
    """The command lines of the README's "Train on your own videos" block."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Train on your own videos"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("lvd-")]


TINY = {  # what makes each stage of the README run in seconds on the test videos
    "lvd-train-autoencoder": ["data.size=32", "data.frames_per_video=2", "model.base_channels=8",
                              "model.norm_groups=4", "loss.perceptual=none", "run.steps=2", "run.batch_size=4",
                              "run.checkpoint_every=2", "run.log_every=1", "run.num_workers=0", "eval_frames=4",
                              "scale_frames=4"],
    "lvd-encode-latents": ["clip.size=32", "clip.num_frames=8"],
    "lvd-train-diffusion": ["model.unet.base_channels=8", "model.unet.norm_groups=4", "model.unet.head_dim=8",
                            "text.width=16", "text.layers=1", "text.heads=2", "text.vocab_size=512",
                            "data.num_frames=6", "data.images_per_video=1", "run.steps=2", "run.batch_size=2",
                            "run.checkpoint_every=2", "run.log_every=1", "optim.warmup_steps=1", "sampling.steps=2"],
    "lvd-generate": ["num_frames=10", "sampling.steps=2", "gif=false"],
    "lvd-evaluate": ["metrics.frames_per_clip=8"],
}


def test_the_readmes_stage_commands_run_as_written_on_a_folder_of_videos(chain, tmp_path):
    """The README's own stage commands, one after the other in a fresh folder holding ``data/videos`` (the test
    videos, captions and broken files included), each with only the overrides that make it tiny appended."""
    import os
    import shlex
    import shutil
    import subprocess
    import sys

    shutil.copytree(chain["videos"], tmp_path / "data" / "videos")
    commands = readme_stage_commands()
    assert [c.split()[0] for c in commands] == list(TINY)
    bin_dir = Path(sys.executable).parent
    for command in commands:
        words = shlex.split(command.replace("configs/", f"{ROOT}/configs/"))
        done = subprocess.run([str(bin_dir / words[0]), *words[1:], *TINY[words[0]]], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, OMP_NUM_THREADS="2"))
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    assert list((tmp_path / "outputs" / "generate").glob("*.mp4"))
    assert (tmp_path / "outputs" / "evaluate" / "metrics.json").is_file()
