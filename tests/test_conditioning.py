"""Generation from what the user brings (``generate``'s ``condition.*``, paper §3.1): continue a clip, animate an
image, fill in a low-frame-rate video, enlarge a small one; through the Python API and the command line, on the
tiny trained chain, with the bad inputs as one-line errors that leave ``out_dir`` unwritten."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.core.config import UserError, load_config
from pipelines.media.datasets import resize_crop
from pipelines.media.video_io import read_frames, read_image
from pipelines.stages.configs import GenerateConfig
from pipelines.stages.generate import generate
from tests.videos import ffmpeg_clip, garbage_file, image_file

REPO = Path(__file__).resolve().parents[1]
quiet = lambda *args, **kwargs: None  # noqa: E731


def _run(chain, out: Path, *overrides: str) -> dict:
    config = load_config(GenerateConfig, None, [f"model={chain['diffusion']}", f"out_dir={out}", "sampling.steps=2",
                                                "raw_frames=true", "decode_chunk_frames=4", *overrides])
    return generate(config, log=quiet)


def _given(path: Path, indices, size: int = 32) -> np.ndarray:
    """The frames ``indices`` of ``path`` as the model sees them: resized and cropped, uint8 ``[n, H, W, 3]``."""
    frames = resize_crop(read_frames(path, indices), size)
    return ((frames + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def _raw(out: Path, sample: dict) -> np.ndarray:
    return np.load(out / sample["frames"])


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """A folder of two 10-frame clips (ffmpeg test sources, not the training world), an image, and beside them
    a broken video, a file that is not an image and an 8×8 clip."""
    root = tmp_path_factory.mktemp("given")
    ffmpeg_clip(root / "clips" / "a.mp4", "testsrc2", frames=10, size=(40, 48))
    ffmpeg_clip(root / "clips" / "b.mp4", "mandelbrot", frames=10, size=(32, 32))
    image_file(root / "image.png", size=(36, 30))
    garbage_file(root / "garbage.mp4")
    (root / "not_an_image.png").write_bytes(b"not a png at all")
    ffmpeg_clip(root / "tiny.mp4", frames=4, size=(8, 8))
    return root


def test_a_clip_is_continued_from_its_last_frames_and_the_output_begins_with_them(chain, clips, tmp_path):
    source = clips / "clips" / "a.mp4"
    summary = _run(chain, tmp_path, f"condition.video={source}", "condition.count=3", "num_frames=10")
    (sample,) = summary["samples"]
    frames = _raw(tmp_path, sample)
    assert frames.shape == (10, 32, 32, 3) and sample["given_frames"] == [0, 1, 2]
    np.testing.assert_array_equal(frames[:3], _given(source, [7, 8, 9]))  # the last 3, as given
    assert sample["boundaries"][0] == 3 and sample["source"] == str(source)
    assert read_frames(tmp_path / sample["file"]).shape == (10, 32, 32, 3)
    first = _run(chain, tmp_path / "first", f"condition.video={source}", "condition.count=3", "condition.frames=first",
                 "num_frames=8")["samples"][0]
    np.testing.assert_array_equal(_raw(tmp_path / "first", first)[:3], _given(source, [0, 1, 2]))


def test_a_folder_gives_one_output_per_file_each_with_its_prompt(chain, clips, tmp_path):
    summary = _run(chain, tmp_path, f"condition.video={clips / 'clips'}", "condition.count=2", "num_frames=7",
                   "prompts=[a red circle moving left,a blue square moving up]")
    assert [s["prompt"] for s in summary["samples"]] == ["a red circle moving left", "a blue square moving up"]
    assert [Path(s["source"]).name for s in summary["samples"]] == ["a.mp4", "b.mp4"]
    assert all(_raw(tmp_path, s).shape[0] == 7 for s in summary["samples"])
    unconditional = _run(chain, tmp_path / "null", f"condition.video={clips / 'clips'}", "condition.count=2",
                         "num_frames=7")
    assert [s["prompt"] for s in unconditional["samples"]] == ["", ""]  # no prompt: the null caption


def test_an_image_becomes_the_first_frame_of_a_video(chain, clips, tmp_path):
    summary = _run(chain, tmp_path, f"condition.image={clips / 'image.png'}", "num_frames=9")
    (sample,) = summary["samples"]
    frames = _raw(tmp_path, sample)
    expected = resize_crop(read_image(clips / "image.png")[None], 32)
    expected = ((expected + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    assert frames.shape == (9, 32, 32, 3) and sample["given_frames"] == [0]
    np.testing.assert_array_equal(frames[0], expected[0])
    assert summary["chunks"] == 2 and sample["file"].endswith("_reconstruction_image.mp4")


def test_a_low_frame_rate_video_is_filled_in_between_its_frames_then_extended(chain, clips, tmp_path):
    source = clips / "clips" / "b.mp4"
    summary = _run(chain, tmp_path, f"condition.video={source}", "condition.task=interpolate", "condition.count=3",
                   "condition.every=3", "num_frames=10")
    (sample,) = summary["samples"]
    frames = _raw(tmp_path, sample)
    assert frames.shape == (10, 32, 32, 3) and sample["given_frames"] == [0, 3, 6]
    np.testing.assert_array_equal(frames[[0, 3, 6]], _given(source, [0, 1, 2]))  # every frame of the input, kept
    assert not np.array_equal(frames[1], frames[0]) and not np.array_equal(frames[1], frames[3])


def test_a_small_video_is_enlarged_to_the_models_size(chain, tmp_path):
    small = tmp_path / "small.mp4"
    ffmpeg_clip(small, "mandelbrot", frames=8, size=(8, 8))
    summary = _run(chain, tmp_path / "out", f"condition.video={small}", "condition.task=upscale", "condition.scale=4")
    (sample,) = summary["samples"]
    assert _raw(tmp_path / "out", sample).shape == (8, 32, 32, 3) and sample["given_frames"] == []
    assert summary["chunks"] == 2  # 6-frame chunks: the first 6 frames, then 2 after the last 3


class _Standard(torch.nn.Module):
    """The exact x̂ of latents x ~ N(0, I) (``prediction="x"``): ``α z / (α² + σ²)``."""

    def forward(self, z, logsnr, **_):
        alpha = torch.sigmoid(logsnr).sqrt().reshape(-1, 1, 1, 1, 1)
        return alpha * z  # α² + σ² = 1


class _NearestDecoder(torch.nn.Module):
    """A stand-in autoencoder whose decoder shows the first 3 latent channels 4 times larger (float32 weights)."""

    config = type("Config", (), {"latent_scale": 1.0, "latent_shift": 0.0, "downsample_factor": 4})()

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))

    def decode(self, z):
        return self.gain * torch.nn.functional.interpolate(z[:, :3], scale_factor=4, mode="nearest")


def test_upscaling_guidance_pulls_the_decoded_frames_to_the_low_resolution_ones():
    """:func:`upscale` on N(0, I) latents and a decoder whose area-average is known: the decoded frames,
    averaged back, match the given low-resolution frames where unguided samples do not (paper §3.1)."""
    from diffusion import Denoiser, NoiseSchedule
    from pipelines.models.config import DiffusionModelConfig, SamplingConfig, TextConfig
    from pipelines.models.diffusion import DiffusionBundle
    from pipelines.stages.long_video import upscale

    bundle = DiffusionBundle(Denoiser(_Standard(), "x"), None, TextConfig(kind="none"),
                             DiffusionModelConfig(schedule=NoiseSchedule()), [4, 4, 8, 8], None)
    low = 0.5 * torch.randn(2, 3, 7, 4, 4, generator=torch.Generator().manual_seed(0))
    errors = {}
    for weight in (1e-6, 4.0):
        cfg = GenerateConfig(prompts=[""], context_frames=2, sampling=SamplingConfig(sampler="ddim", steps=20,
                                                                                     guidance=0.0))
        cfg.condition.w_upscale = weight
        latents, starts = upscale(bundle, ["", ""], low, _NearestDecoder(), cfg, 4, torch.Generator().manual_seed(1))
        assert latents.shape == (2, 4, 7, 8, 8) and starts == [4, 6]  # chunks of 4: 4 new, then 2 and 1 new
        down = torch.nn.functional.avg_pool3d(latents[:, :3], (1, 2, 2))
        errors[weight] = float((down - low).pow(2).mean())
    assert errors[4.0] < 0.05 * errors[1e-6], errors


def test_the_command_line_continues_a_clip(chain, clips, tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), f"model={chain['diffusion']}",
                           f"out_dir={out}", f"condition.video={clips / 'clips' / 'b.mp4'}", "condition.count=2",
                           "num_frames=6", "sampling.steps=2"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_frames(next(out.glob("*.mp4"))).shape[0] == 6


@pytest.mark.parametrize("overrides, message", [
    (lambda c: [f"condition.video={c / 'garbage.mp4'}"], "garbage.mp4"),
    (lambda c: [f"condition.video={c / 'clips' / 'a.mp4'}", "condition.count=12"], "condition.count=12"),
    (lambda c: [f"condition.image={c / 'not_an_image.png'}"], "not_an_image.png"),
    (lambda c: [f"condition.video={c / 'missing.mp4'}"], "missing.mp4"),
    (lambda c: [f"condition.video={c / 'clips' / 'a.mp4'}", "condition.task=upscale", "condition.scale=5"],
     "condition.scale=5"),
    (lambda c: [f"condition.video={c / 'tiny.mp4'}", "condition.task=upscale", "condition.scale=2"],
     "smaller than"),  # 8×8 frames cannot be enlarged twice to 32×32: they would have to be 16×16
])
def test_bad_inputs_are_one_line_errors_that_write_nothing(chain, clips, tmp_path, overrides, message):
    out = tmp_path / "out"
    args = overrides(clips)
    with pytest.raises(UserError, match=message.replace(".", r"\.")) as error:
        _run(chain, out, *args)
    assert "\n" not in str(error.value) and not out.exists()
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), f"model={chain['diffusion']}",
                           f"out_dir={out}", *args], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
    assert not out.exists()


def test_the_conditioning_benchmark_compares_every_task_with_the_truth_and_its_baselines(chain, clips, tmp_path):
    """``python -m benchmarks.conditioning`` at toy size on the tiny model: every method and baseline scored
    against the truth, by horizon, written as JSON (the figures themselves mean nothing here)."""
    from benchmarks.conditioning import main

    result = main(["--model", str(chain["diffusion"]), "--clips", str(clips / "clips"), "--given", "2",
                   "--horizon", "3", "--every", "2", "--scale", "4", "--steps", "2", "--out",
                   str(tmp_path / "conditioning.json")])
    assert json.loads((tmp_path / "conditioning.json").read_text()) == json.loads(json.dumps(result))
    assert set(result["continuation"]) == {"reconstruction", "replacement_same_input", "replacement", "text_only",
                                           "copy_last_frame"}
    for row in result["continuation"].values():
        assert set(row) == {"1-1", "2-3", "all"} and 0 < row["all"]["psnr"] < 100 and -1 <= row["all"]["ssim"] <= 1
    assert {"diffusion", "linear_blend"} <= set(result["interpolation"])
    assert {"diffusion", "bicubic"} <= set(result["super_resolution"])
    assert len(result["clips"]) == 2


def test_a_continuation_must_leave_room_for_new_frames():
    with pytest.raises(ValueError, match="condition.count=8 must be below num_frames=8"):
        load_config(GenerateConfig, None, ["condition.video=clip.mp4", "condition.count=8", "num_frames=8"])
