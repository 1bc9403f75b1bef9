"""The evaluation command: Fréchet and kernel distances against closed forms, StyleGAN-V's detector protocol on a
tiny TorchScript stand-in for the I3D, and whole ``evaluate()`` runs on small videos written here (no download)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.core.config import ConfigError, UserError, load_config
from pipelines.evaluation.config import EvaluateConfig
from pipelines.evaluation.fvd import (
    I3D_FILE,
    I3D_URL,
    extract_features,
    frechet_distance,
    fvd_clip_indices,
    fvd_from_features,
    i3d_features,
    kernel_distance,
    load_i3d,
    to_detector_input,
)
from pipelines.media.datasets import SkippedFileWarning
from pipelines.media.video_io import write_video
from pipelines.stages.evaluate import evaluate
from tests.models import TinyI3D

ROOT = Path(__file__).resolve().parents[1]
FRAMES, SIZE = 8, 32


def quiet(*args, **kwargs) -> None:
    pass


# ---------------------------------------------------------------------------------------------- distances


def diagonal_closed_form(mu1, s1, mu2, s2) -> float:
    """Fréchet distance of N(mu1, diag s1) and N(mu2, diag s2): ||mu1 − mu2||² + Σ (s1 + s2 − 2 √(s1 s2))."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))


MU1, S1 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 4.0, 0.25, 2.0])
MU2, S2 = np.array([1.0, -1.0, 0.0, 0.5]), np.array([2.0, 1.0, 1.0, 0.5])


def test_frechet_distance_matches_the_closed_form_for_given_gaussians():
    expected = diagonal_closed_form(MU1, S1, MU2, S2)
    assert frechet_distance(MU1, np.diag(S1), MU2, np.diag(S2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(MU2, np.diag(S2), MU1, np.diag(S1)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(MU1, np.diag(S1), MU1, np.diag(S1)) == pytest.approx(0.0, abs=1e-10)
    # a rotation of both covariances leaves the distance unchanged (non-diagonal Σ1 Σ2 through sqrtm)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    rotated = frechet_distance(q @ MU1, q @ np.diag(S1) @ q.T, q @ MU2, q @ np.diag(S2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_fvd_from_features_of_large_samples_approaches_the_closed_form():
    rng = np.random.default_rng(1)
    n = 200_000
    a = MU1 + rng.normal(size=(n, 4)) * np.sqrt(S1)
    b = MU2 + rng.normal(size=(n, 4)) * np.sqrt(S2)
    expected = diagonal_closed_form(MU1, S1, MU2, S2)  # 13.5...
    assert fvd_from_features(a, b) == pytest.approx(expected, rel=0.01)
    assert abs(fvd_from_features(a, a)) < 1e-8


def direct_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased polynomial-kernel MMD², written out term by term."""
    d, m = x.shape[1], len(x)
    k = lambda u, v: (float(u @ v) / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kernel_distance_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(7, 3)), rng.normal(loc=0.7, size=(7, 3))
    expected = direct_mmd(a, b)
    assert kernel_distance(a, b, num_subsets=1, subset_size=7) == pytest.approx(expected, rel=1e-10)
    assert kernel_distance(a, b, num_subsets=3, subset_size=100) == pytest.approx(expected, rel=1e-10)  # capped
    # subsets are drawn reproducibly, and a smaller subset gives a different (noisier) estimate
    assert kernel_distance(a, b, 5, 4, seed=3) == kernel_distance(a, b, 5, 4, seed=3)
    assert kernel_distance(a, b, 5, 4, seed=3) != pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        kernel_distance(a[:1], b, 1, 10)


def test_clip_indices_follow_stylegan_v():
    assert fvd_clip_indices(20, 8).tolist() == list(range(8))
    assert fvd_clip_indices(20, 4, stride=3).tolist() == [0, 3, 6, 9]
    starts = {int(fvd_clip_indices(20, 8, 2, "random", np.random.default_rng(s))[0]) for s in range(200)}
    assert starts == set(range(20 - 16 + 2))  # randint(0, n - f·s + s − 1), inclusive
    for s in range(50):
        assert fvd_clip_indices(20, 8, 2, "random", np.random.default_rng(s))[-1] <= 19
    assert fvd_clip_indices(8, 8, 1, "random", np.random.default_rng(0)).tolist() == list(range(8))
    with pytest.raises(ValueError, match="too short"):
        fvd_clip_indices(7, 8)


def test_detector_input_is_uint8_bcthw():
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 5, 12, 10, 3), dtype=np.uint8)  # [b, f, H, W, 3]
    x = to_detector_input(frames)
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 5, 12, 10)
    assert torch.equal(x[1, 2, 4], torch.from_numpy(frames[1, 4, :, :, 2]))
    assert to_detector_input(frames, resolution=16).shape == (2, 3, 5, 16, 16)
    video = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 3, 1, 1).expand(1, 3, 3, 2, 2)  # [b, 3, f, H, W]
    assert to_detector_input(video)[0, 0, :, 0, 0].tolist() == [0, 128, 255]  # (x · 127.5 + 128), clamped


# ---------------------------------------------------------------------------------------------- detector


@pytest.fixture
def detector_file(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / I3D_FILE
    torch.jit.script(TinyI3D().eval()).save(str(path))
    return path


def test_load_i3d_and_features(detector_file):
    detector = load_i3d(detector_file, "cpu")
    videos = torch.randint(0, 256, (3, 3, 4, 20, 20), dtype=torch.uint8)
    features = i3d_features(detector, videos)
    assert features.shape == (3, 8) and features.dtype == np.float64
    floats = videos.float() / 127.5 - 1  # the project layout in [-1, 1] gives (almost) the same features
    np.testing.assert_allclose(i3d_features(detector, floats), features, atol=1e-2)
    clips = [np.random.default_rng(i).integers(0, 256, (4, 20, 20, 3), dtype=np.uint8) for i in range(5)]
    clips[2] = clips[2][:, :12, :16]  # another size: a batch of its own (the detector resizes each batch itself)
    batched = extract_features(detector, clips, batch_size=2)
    single = np.concatenate([extract_features(detector, [c], batch_size=1) for c in clips])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    assert extract_features(detector, clips, batch_size=3, resolution=24).shape == (5, 8)


def test_missing_weights_name_the_file_the_key_and_the_url(tmp_path):
    for path in (None, tmp_path / "nowhere" / I3D_FILE):
        with pytest.raises(UserError) as caught:
            load_i3d(path)
        message = str(caught.value)
        assert "\n" not in message and I3D_FILE in message and "metrics.i3d" in message and I3D_URL in message
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torchscript archive")
    with pytest.raises(UserError, match=I3D_FILE):
        load_i3d(garbage)


# ---------------------------------------------------------------------------------------------- evaluate()


def random_video(seed: int, frames: int = FRAMES, shift: float = 0.0) -> torch.Tensor:
    """A varied little video ``[3, f, SIZE, SIZE]`` in [-1, 1]: a random colour field drifting over time, plus
    ``shift`` added to the red channel."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, 1, 4, 4, generator=g) * 1.6 - 0.8
    base = F.interpolate(base, size=(SIZE, SIZE), mode="bilinear", align_corners=False)  # [3, 1, S, S]
    drift = torch.linspace(0, 1, frames).view(1, frames, 1, 1) * (torch.rand(3, 1, 1, 1, generator=g) - 0.5)
    video = base + drift
    video[0] += shift
    return video.clamp(-1, 1)


def write_folder(folder: Path, count: int, shift: float = 0.0, frames: int = FRAMES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        write_video(folder / f"clip_{i:02d}.mp4", random_video(i, frames, shift), fps=8)
    return folder


def config(tmp_path: Path, generated: Path, real: Path, *extra: str) -> EvaluateConfig:
    overrides = [f"generated={generated}", f"real={real}", f"out_dir={tmp_path / 'out'}", "device=cpu",
                 f"metrics.frames_per_clip={FRAMES}", "metrics.batch_size=4", "metrics.kvd_subsets=10", *extra]
    return load_config(EvaluateConfig, None, overrides)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    real = write_folder(root / "real", 16)
    # byte-identical files (writing the same frames twice need not give the same file: x264 runs threads)
    return {"real": real, "copy": Path(shutil.copytree(real, root / "copy")),
            "shifted": write_folder(root / "shifted", 16, shift=0.6)}


def test_fvd_is_zero_for_identical_folders_and_grows_with_a_colour_shift(tmp_path, folders, detector_file):
    same = evaluate(config(tmp_path, folders["copy"], folders["real"], f"metrics.i3d={detector_file}"), quiet)
    shifted = evaluate(config(tmp_path, folders["shifted"], folders["real"], f"metrics.i3d={detector_file}"), quiet)
    assert same["generated"]["clips"] == same["real"]["clips"] == 16 and same["feature_dim"] == 8
    assert shifted["fvd"] > 1e-3
    assert abs(same["fvd"]) < 1e-4 * shifted["fvd"]
    assert abs(same["kvd"]) < 0.05 * shifted["kvd"] and shifted["kvd_x1000"] == pytest.approx(1000 * shifted["kvd"])
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["fvd"] == pytest.approx(shifted["fvd"])
    assert written["protocol"]["detector_kwargs"] == {"rescale": True, "resize": True, "return_features": True}
    assert "FVD" in (tmp_path / "out" / "metrics.md").read_text()
    assert "metrics:" in (tmp_path / "out" / "evaluate.yaml").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_numbers(tmp_path, folders, detector_file):
    cpu = evaluate(config(tmp_path, folders["shifted"], folders["real"], f"metrics.i3d={detector_file}"), quiet)
    cuda = evaluate(config(tmp_path, folders["shifted"], folders["real"], f"metrics.i3d={detector_file}",
                           "device=cuda"), quiet)
    assert cuda["device"].startswith("cuda")
    assert cuda["fvd"] == pytest.approx(cpu["fvd"], rel=1e-3)
    assert cuda["pairwise"]["psnr"] == pytest.approx(cpu["pairwise"]["psnr"], rel=1e-4)


def test_real_clips_start_at_random_and_are_reproducible(tmp_path, detector_file):
    long = write_folder(tmp_path / "long", 6, frames=20)
    run = lambda start, seed: evaluate(config(tmp_path, long, long, f"metrics.i3d={detector_file}",  # noqa: E731
                                              f"metrics.real_clip_start={start}", f"seed={seed}"), quiet)["fvd"]
    assert abs(run("first", 0)) < 1e-6  # both sides take frames 0..7
    assert run("random", 0) == pytest.approx(run("random", 0), rel=1e-9)
    assert run("random", 0) > 1e-6  # real windows elsewhere in the videos


def test_pairwise_metrics_pair_files_by_name(tmp_path, folders):
    same = evaluate(config(tmp_path, folders["copy"], folders["real"]), quiet)["pairwise"]
    shifted = evaluate(config(tmp_path, folders["shifted"], folders["real"]), quiet)["pairwise"]
    assert same["pairs"] == shifted["pairs"] == 16 and same["frames"] == 16 * FRAMES
    assert same["psnr"] == pytest.approx(100.0) and same["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert shifted["psnr"] < 30 and shifted["ssim"] < same["ssim"]
    assert "lpips" in same and (same["lpips"] is not None or "LPIPS" in same["lpips_note"])


def test_without_a_detector_fvd_is_reported_as_not_computed(tmp_path, folders):
    metrics = evaluate(config(tmp_path, folders["copy"], folders["real"]), quiet)
    assert metrics["fvd"] is None and metrics["kvd"] is None
    assert I3D_FILE in metrics["note"] and "metrics.i3d" in metrics["note"]
    assert I3D_FILE in (tmp_path / "out" / "metrics.md").read_text()


def test_a_missing_detector_path_is_a_user_error_before_any_work(tmp_path, folders):
    cfg = config(tmp_path, folders["copy"], folders["real"], f"metrics.i3d={tmp_path / 'missing' / I3D_FILE}")
    with pytest.raises(UserError, match=I3D_FILE):
        evaluate(cfg, quiet)
    assert not (tmp_path / "out" / "metrics.json").exists()
    with pytest.raises(UserError, match="real="):
        evaluate(config(tmp_path, folders["copy"], tmp_path / "no_such_folder"), quiet)


def test_short_and_unreadable_files_are_skipped_with_a_warning(tmp_path, detector_file):
    folder = write_folder(tmp_path / "mixed", 4)
    write_video(folder / "short.mp4", random_video(9, frames=3), fps=8)
    (folder / "broken.mp4").write_bytes(b"\x00garbage" * 100)
    with pytest.warns(SkippedFileWarning) as caught:
        metrics = evaluate(config(tmp_path, folder, folder, f"metrics.i3d={detector_file}"), quiet)
    messages = " ".join(str(w.message) for w in caught)
    assert "short.mp4" in messages and "broken.mp4" in messages and "too short" in messages
    assert metrics["generated"]["clips"] == metrics["real"]["clips"] == 4
    skipped = metrics["generated"]["skipped"]
    assert set(map(lambda p: Path(p).name, skipped)) == {"short.mp4", "broken.mp4"}
    assert metrics["fvd"] is not None and abs(metrics["fvd"]) < 1e-6


def _world_videos(folder: Path, count: int = 4) -> list[dict]:
    """``count`` rendered world clips in ``folder`` with the ``generation_test.json`` that records their prompts
    and a chunk boundary at frame 8; returns the samples."""
    from pipelines.world.config import WorldSpec
    from pipelines.world.synthetic import render_clip, world_params

    spec = WorldSpec(size=32, num_frames=16)
    folder.mkdir()
    samples = []
    for i in range(count):
        params = world_params(i, spec)
        name = f"{i:03d}_world.mp4"
        write_video(folder / name, render_clip(params, spec), fps=spec.fps)
        samples.append({"file": name, "prompt": params.caption, "method": "test", "index": i, "boundaries": [8]})
    (folder / "generation_test.json").write_text(json.dumps({"samples": samples}))
    return samples


def test_world_analysis_reads_prompts_from_the_generation_record(tmp_path):
    folder = tmp_path / "generated"
    _world_videos(folder)
    write_video(folder / "unrecorded.mp4", np.zeros((16, 32, 32, 3), np.uint8), fps=8)  # no prompt: counted apart
    metrics = evaluate(config(tmp_path, folder, folder, "metrics.analysers=[world]"), quiet)
    world = metrics["analysers"]["world"]
    assert world["videos"] == 4 and len(world["per_video"]) == 4 and world["not_world_prompts"] == ["unrecorded.mp4"]
    assert world["colour_accuracy"] == world["shape_accuracy"] == world["direction_accuracy"] == 1.0
    assert world["jump_ratio_mean"] == pytest.approx(1.0, abs=0.5)  # rendered motion is continuous at frame 8
    assert world["identity_per_chunk"] == world["direction_per_chunk"] == 1.0 and world["chunks"] == 8
    assert world["failed_joins"] == 0 and world["vanished_chunks"] == 0
    report = (tmp_path / "out" / "metrics.md").read_text()
    assert "## Analyser `world`" in report and "colour accuracy (4 videos) | 1.00" in report


class FakeAnalyser:
    """An analyser from another package: it records what it was given."""

    calls: list[tuple[str, tuple, dict]] = []

    def add(self, path: Path, frames: np.ndarray, record: dict) -> None:
        self.calls.append((path.name, frames.shape, record))

    def summary(self) -> dict:
        return {"videos": len(self.calls)}

    def markdown(self, summary: dict) -> list[str]:
        return [f"fake saw {summary['videos']} videos"]


@pytest.fixture
def fake_installed(monkeypatch):
    """A package's entry point ``fake`` in the analysers' group (and none of this project's)."""
    from importlib import metadata

    import pipelines.evaluation.analysers as analysers

    point = metadata.EntryPoint("fake", "tests.test_evaluate:FakeAnalyser", analysers.GROUP)
    monkeypatch.setattr(analysers.metadata, "entry_points",
                        lambda group: [point] if group == analysers.GROUP else [])
    FakeAnalyser.calls = []
    return analysers


def test_an_installed_analyser_is_called_on_every_whole_video_with_its_record(tmp_path, fake_installed):
    folder = tmp_path / "generated"
    samples = _world_videos(folder, 2)
    assert set(fake_installed.installed()) == {"fake", "world"}  # the built-in table under the entry points
    metrics = evaluate(config(tmp_path, folder, folder, "metrics.analysers=[fake,world]"), quiet)
    assert FakeAnalyser.calls == [(s["file"], (16, 32, 32, 3), {"prompt": s["prompt"], "boundaries": [8]})
                                  for s in samples]
    assert list(metrics["analysers"]) == ["fake", "world"] and metrics["analysers"]["fake"] == {"videos": 2}
    assert metrics["analysers"]["world"]["videos"] == 2  # found without installed metadata
    assert "fake saw 2 videos" in (tmp_path / "out" / "metrics.md").read_text()


def test_an_unknown_analyser_fails_in_one_line_listing_the_installed_ones(tmp_path, fake_installed):
    folder = tmp_path / "generated"
    _world_videos(folder, 1)
    with pytest.raises(ConfigError, match="metrics.analysers") as caught:
        evaluate(config(tmp_path, folder, folder, "metrics.analysers=[wrold]"), quiet)
    message = str(caught.value)
    assert "\n" not in message and "'wrold'" in message and message.endswith("installed: fake, world")
    assert not (tmp_path / "out").exists()  # nothing done


def test_pyproject_registers_the_built_in_analysers():
    """The built-in table (found before ``pip install -e .``) is what pyproject.toml registers once installed."""
    from pipelines.evaluation.analysers import BUILT_IN, GROUP

    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"][GROUP] == BUILT_IN


# ---------------------------------------------------------------------------------------------- config and script


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="frames_per_clip"):
        config(tmp_path, tmp_path, tmp_path, "metrics.frames_per_clip=0")
    with pytest.raises(ConfigError, match="kvd_subset_size"):
        config(tmp_path, tmp_path, tmp_path, "metrics.kvd_subset_size=1")
    with pytest.raises(ConfigError, match="generated"):
        load_config(EvaluateConfig, None, [f"real={tmp_path}"])
    with pytest.raises(ConfigError, match="nonsense"):
        config(tmp_path, tmp_path, tmp_path, "metrics.nonsense=1")


def test_script_help_lists_the_keys_without_importing_torch():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--help"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "metrics.i3d" in result.stdout and "i3d_torchscript.pt" in result.stdout and "generated" in result.stdout
    probe = ("import runpy, sys\nsys.argv = ['evaluate.py', '--help']\ntry:\n"
             f"    runpy.run_path({str(ROOT / 'scripts' / 'evaluate.py')!r}, run_name='__main__')\n"
             "except SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.stderr.strip().splitlines()[-1] == "False"
