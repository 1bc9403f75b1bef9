"""Datasets: clip selection, resizing, captions, skipping bad files, splits, DataLoader workers."""

import json
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipelines.core.config import UserError
from pipelines.media.datasets import (
    ClipSpec,
    FrameDataset,
    ImageDataset,
    SkippedFileWarning,
    VideoClipDataset,
    clip_frame_indices,
    collate,
    load_captions,
    resize_crop,
    scan_media,
)
from pipelines.media.video_io import VideoInfo, write_video
from tests.videos import ffmpeg_clip, garbage_file, image_file, truncated_copy

pytestmark = pytest.mark.filterwarnings(
    "ignore::pipelines.media.datasets.SkippedFileWarning"
)  # tests that count them record

GREY_STEP = 6  # frame k of a counter video is uniformly grey at level GREY_STEP * k


def counter_video(path, num_frames=40, fps=24, size=(24, 32)):
    """A video whose frame k is grey ``GREY_STEP * k``, so a decoded frame tells its own index."""
    levels = GREY_STEP * np.arange(num_frames, dtype=np.uint8)
    return write_video(path, np.broadcast_to(levels[:, None, None, None], (num_frames, *size, 3)), fps=fps)


def decoded_indices(video: torch.Tensor) -> list[int]:
    """Frame indices read back from a counter clip ``[3, f, h, w]`` in [-1, 1]."""
    levels = (video.mean(dim=(0, 2, 3)) + 1) * 127.5
    return [round(v / GREY_STEP) for v in levels.tolist()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three good clips (24 frames, one in a subfolder), a counter video, and three bad files."""
    root = tmp_path_factory.mktemp("videos")
    ffmpeg_clip(root / "a.mp4", "testsrc2", frames=24, size=(32, 48))
    ffmpeg_clip(root / "sub" / "b.webm", "mandelbrot", frames=24, size=(32, 32))
    ffmpeg_clip(root / "c.avi", "life", frames=24, size=(40, 32))
    counter_video(root / "counter.mp4")
    truncated_copy(root / "a.mp4", root / "truncated.mp4")
    garbage_file(root / "garbage.mkv")
    ffmpeg_clip(root / "short.mp4", "testsrc2", frames=5, size=(32, 32))
    return root


GOOD = {"a.mp4", "b.webm", "c.avi", "counter.mp4"}
BAD = {"truncated.mp4", "garbage.mkv", "short.mp4"}


def test_scan_finds_media_recursively_and_ignores_hidden_and_other_files(tmp_path):
    names = [
        "b.MP4",
        "a/z.webm",
        "a/deeper/c.mkv",
        ".partial.mp4",
        ".cache/d.mp4",
        "notes.txt",
        "e.png",
        "f.gif",
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = scan_media(tmp_path, (".mp4", ".webm", ".mkv"))
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/deeper/c.mkv", "a/z.webm", "b.MP4"]
    overlapping = scan_media([tmp_path / "a", tmp_path], (".png", ".mkv"))
    assert [p.relative_to(tmp_path).as_posix() for p in overlapping] == ["a/deeper/c.mkv", "e.png"]


def test_clip_shape_range_and_fields(folder):
    spec = ClipSpec(num_frames=8, size=(16, 24), start="first")
    dataset = VideoClipDataset(folder, spec, probe=True)
    item = dataset[dataset.files.index(folder / "a.mp4")]
    assert item["video"].shape == (3, 8, 16, 24) and item["video"].dtype == torch.float32
    assert -1 <= item["video"].min() < item["video"].max() <= 1
    assert item["frame_indices"].tolist() == list(range(8)) and item["frame_indices"].dtype == torch.long
    assert item["path"] == str(folder / "a.mp4") and item["caption"] == ""
    with pytest.raises(IndexError):  # so that `for item in dataset` ends
        dataset[len(dataset)]


def test_stride_selects_every_kth_frame(folder):
    spec = ClipSpec(num_frames=5, frame_stride=3, size=16, start="first")
    dataset = VideoClipDataset(folder, spec)
    item = dataset[dataset.files.index(folder / "counter.mp4")]
    assert item["frame_indices"].tolist() == [0, 3, 6, 9, 12]
    assert decoded_indices(item["video"]) == [0, 3, 6, 9, 12]  # the pixels are those frames


def test_target_fps_derives_the_stride_from_the_video(folder):
    spec = ClipSpec(num_frames=4, frame_stride=1, target_fps=8, size=16, start="center")
    dataset = VideoClipDataset(folder, spec)
    item = dataset[dataset.files.index(folder / "counter.mp4")]  # 24 fps -> stride 3, span 10 of 40 frames
    assert item["frame_indices"].tolist() == [15, 18, 21, 24]
    assert decoded_indices(item["video"]) == [15, 18, 21, 24]
    item = dataset[dataset.files.index(folder / "a.mp4")]  # 8 fps -> stride 1, span 4 of 24 frames
    assert item["frame_indices"].tolist() == [10, 11, 12, 13]


def test_starts_first_center_random():
    info = VideoInfo(num_frames=30, fps=10.0, height=8, width=8)
    rng = np.random.default_rng(0)
    assert clip_frame_indices(ClipSpec(num_frames=4, frame_stride=2, start="first"), info, rng).tolist() == [
        0,
        2,
        4,
        6,
    ]
    assert clip_frame_indices(ClipSpec(num_frames=4, frame_stride=2, start="center"), info, rng).tolist() == [
        11,
        13,
        15,
        17,
    ]
    starts = {int(clip_frame_indices(ClipSpec(num_frames=4, frame_stride=2), info, rng)[0]) for _ in range(300)}
    assert starts == set(range(0, 24))  # every start from 0 to 30 - 7 is drawn, and nothing else


def test_random_starts_are_seeded_per_item_and_epoch(folder):
    spec = ClipSpec(num_frames=4, size=16)
    dataset = VideoClipDataset(folder, spec, seed=3, probe=True)
    index = dataset.files.index(folder / "counter.mp4")
    first = dataset[index]["frame_indices"].tolist()
    assert VideoClipDataset(folder, spec, seed=3, probe=True)[index]["frame_indices"].tolist() == first
    draws = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        draws.add(dataset[index]["frame_indices"][0].item())
    assert len(draws) > 3


def test_random_crop_moves_and_center_crop_stays_centred():
    frame = np.zeros((1, 16, 48, 3), np.uint8)
    frame[:, :, :8] = 255  # a white band on the left, outside the centred 16 x 16 window
    centred = resize_crop(frame, 8, "center")
    assert centred.shape == (1, 3, 8, 8) and torch.all(centred == -1)
    rng = np.random.default_rng(0)
    crops = [resize_crop(frame, 8, "random", rng) for _ in range(20)]
    assert any(c.max() > 0 for c in crops) and any(c.max() == -1 for c in crops)


def test_resize_keeps_a_flat_image_flat_and_covers_the_size():
    frame = np.full((2, 30, 50, 3), 200, np.uint8)
    out = resize_crop(frame, (12, 40))
    assert out.shape == (2, 3, 12, 40)
    torch.testing.assert_close(out, torch.full_like(out, 200 / 127.5 - 1))


def test_webvid_csv_captions(folder, tmp_path):
    manifest = tmp_path / "results_2M_val.csv"
    manifest.write_text(
        "videoid,contentUrl,duration,page_dir,name\n"
        "a,https://example.com/a.mp4,PT00H00M03S,000001_000050,Aerial view of a beach\n"
        'c,https://example.com/c.mp4,PT00H00M03S,000001_000050,"Cells, dividing"\n'
    )
    assert load_captions(manifest) == {"a.mp4": "Aerial view of a beach", "c.mp4": "Cells, dividing"}
    dataset = VideoClipDataset(folder, ClipSpec(num_frames=8, size=16), captions=manifest, probe=True)
    captions = {item["path"].rsplit("/", 1)[-1]: item["caption"] for item in dataset}
    assert captions == {
        "a.mp4": "Aerial view of a beach",
        "b.webm": "",
        "c.avi": "Cells, dividing",
        "counter.mp4": "",
    }


def test_jsonl_captions_match_by_relative_path_name_or_stem(folder, tmp_path):
    manifest = tmp_path / "captions.jsonl"
    lines = [
        {"path": "sub/b.webm", "caption": "a fractal"},
        {"video": "counter.mp4", "text": "grey ramp"},
        {"path": "elsewhere/c.mp4", "caption": "life, by stem"},
    ]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    dataset = VideoClipDataset(folder, ClipSpec(num_frames=8, size=16), captions=manifest, probe=True)
    captions = {item["path"].rsplit("/", 1)[-1]: item["caption"] for item in dataset}
    assert captions == {
        "a.mp4": "",
        "b.webm": "a fractal",
        "c.avi": "life, by stem",
        "counter.mp4": "grey ramp",
    }


def test_manifest_without_known_columns_is_an_error(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("url,description\nx,y\n")
    with pytest.raises(ValueError, match="caption"):
        load_captions(manifest)


def test_bad_files_are_skipped_once_never_raised_and_summarised(folder):
    dataset = VideoClipDataset(folder, ClipSpec(num_frames=8, size=16))
    assert len(dataset) == 7
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = [dataset[i]["path"] for i in range(len(dataset))] + [dataset[i]["path"] for i in range(7)]
    assert {p.rsplit("/", 1)[-1] for p in paths} == GOOD
    assert sum(issubclass(w.category, SkippedFileWarning) for w in caught) == 3  # one per bad file
    assert {k.rsplit("/", 1)[-1] for k in dataset.skipped} == BAD
    assert dataset.skipped[str(folder / "short.mp4")].startswith("too short: 5 frames, clip needs 8")
    summary = dataset.summary()
    assert "7 files, 3 skipped" in summary and "too short: short.mp4" in summary
    assert all(name in summary for name in BAD) and "unreadable" in summary


def test_probe_drops_bad_files_up_front(folder):
    with pytest.warns(SkippedFileWarning):
        dataset = VideoClipDataset(folder, ClipSpec(num_frames=8, size=16), probe=True)
    assert {p.name for p in dataset.files} == GOOD and len(dataset) == 4
    assert {k.rsplit("/", 1)[-1] for k in dataset.skipped} == {"garbage.mkv", "short.mp4", "truncated.mp4"}


def test_a_folder_of_only_bad_files_raises_one_clear_error(tmp_path):
    garbage_file(tmp_path / "x.mp4")
    ffmpeg_clip(tmp_path / "y.mp4", frames=3)
    dataset = VideoClipDataset(tmp_path, ClipSpec(num_frames=8))
    with (
        pytest.warns(SkippedFileWarning),
        pytest.raises(UserError, match="every file is unusable.*2 skipped"),
    ):
        dataset[0]
    with pytest.raises(FileNotFoundError, match="no media files"):
        VideoClipDataset(tmp_path / "empty-folder-that-does-not-exist")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Ten media files for frame training: six short videos and four images, one of them garbage."""
    root = tmp_path_factory.mktemp("mixed")
    for i in range(6):
        ffmpeg_clip(root / f"clip{i}.mp4", ("testsrc2", "mandelbrot", "life")[i % 3], frames=6, size=(24, 24))
    (root / "images").mkdir()
    image_file(root / "img0.jpg", size=(20, 30))
    image_file(root / "images" / "img1.png", size=(30, 20), seed=1)
    image_file(root / "images" / "img2.webp", size=(16, 16), seed=2)
    garbage_file(root / "images" / "broken.png")
    return root


def test_frame_dataset_split_is_disjoint_deterministic_and_nonempty(mixed):
    train = FrameDataset(mixed, size=16, split="train", eval_fraction=0.1)
    held_out = FrameDataset(mixed, size=16, split="eval", eval_fraction=0.1)
    everything = FrameDataset(mixed, size=16, split="all")
    assert len(everything.files) == 10 and len(held_out.files) >= 1
    assert set(train.files).isdisjoint(held_out.files)
    assert set(train.files) | set(held_out.files) == set(everything.files)
    assert FrameDataset(mixed, split="eval", eval_fraction=0.1).files == held_out.files
    wider = FrameDataset(mixed, split="eval", eval_fraction=0.5).files
    assert set(held_out.files) <= set(wider) and len(wider) < 10


def test_frame_dataset_items_and_skips(mixed):
    dataset = FrameDataset(mixed, size=(16, 12), frames_per_video=3)
    assert len(dataset) == 30
    with pytest.warns(SkippedFileWarning, match="broken.png"):
        items = [dataset[i] for i in range(len(dataset))]
    assert all(item["image"].shape == (3, 16, 12) for item in items)
    assert all(-1 <= item["image"].min() and item["image"].max() <= 1 for item in items)
    assert not any(item["path"].endswith("broken.png") for item in items)
    assert "unreadable image: images/broken.png" in dataset.summary()


def test_decoded_videos_give_the_frames_a_file_read_gives_within_their_budget(mixed, monkeypatch):
    import pipelines.media.datasets as datasets

    reads = []
    real = datasets.read_frames
    def counted(path, indices=None):
        reads.append(indices)
        return real(path, indices)

    monkeypatch.setattr(datasets, "read_frames", counted)
    kept, uncached = (FrameDataset(mixed, size=16, frames_per_video=4, crop="random", cache_mb=mb) for mb in (1, 0))
    with pytest.warns(SkippedFileWarning):
        for i in range(len(kept)):
            a, b = kept[i], uncached[i]
            assert a["path"] == b["path"] and torch.equal(a["image"], b["image"])
    whole = [r for r in reads if r is None]
    assert len(whole) == 6  # each of the six videos decoded once, whole, however many frames were drawn
    assert kept.decoded.used == sum(v.nbytes for v in kept.decoded.videos.values()) <= kept.decoded.budget
    one_video = next(iter(kept.decoded.videos.values())).nbytes  # 6 frames of 24×24
    small = datasets.DecodedVideos(1.5 * one_video / 2**20)  # room for one video
    for path in list(kept.decoded.videos)[:3]:
        info = kept._infos[path]
        assert np.array_equal(small.frame(path, 2, info), real(path, [2]))
    assert len(small.videos) == 1 and small.used <= small.budget
    tiny = datasets.DecodedVideos(0.5 * one_video / 2**20)  # no room: frames come from the file one by one
    assert np.array_equal(tiny.frame(path, 5, info), real(path, [5])) and not tiny.videos


def test_image_dataset(mixed):
    dataset = ImageDataset(mixed, size=8, crop="random")
    assert len(dataset) == 4
    with pytest.warns(SkippedFileWarning):
        items = [dataset[i] for i in range(4)]
    assert all(item["image"].shape == (3, 8, 8) and item["caption"] == "" for item in items)
    assert list(dataset.skipped) == [str(mixed / "images" / "broken.png")]


def test_collate_stacks_tensors_and_keeps_strings():
    items = [
        {"video": torch.zeros(3, 2, 4, 4), "caption": "a"},
        {"video": torch.ones(3, 2, 4, 4), "caption": ""},
    ]
    batch = collate(items)
    assert batch["video"].shape == (2, 3, 2, 4, 4) and batch["caption"] == ["a", ""]


def test_dataloader_workers_give_the_same_items_as_the_main_process(folder):
    dataset = VideoClipDataset(folder, ClipSpec(num_frames=4, size=16), seed=1)
    dataset.set_epoch(2)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedFileWarning)
        batches = list(loader)
        expected = [dataset[i] for i in range(len(dataset))]
    assert [b["video"].shape for b in batches] == [(2, 3, 4, 16, 16)] * 3 + [(1, 3, 4, 16, 16)]
    paths = [p for b in batches for p in b["path"]]
    assert paths == [item["path"] for item in expected]
    indices = torch.cat([b["frame_indices"] for b in batches])
    torch.testing.assert_close(indices, torch.stack([item["frame_indices"] for item in expected]))
