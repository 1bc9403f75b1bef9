"""Bad inputs, mixed with good ones, through every stage: each bad file is skipped with a warning (or a manifest
entry) that names it and says why, each good file is used, and every stage finishes. Non-finite losses skip their
step and are counted; too many in a row stop a run with one line and leave the last checkpoint intact.

The corpus is made here: ffmpeg's lavfi sources (testsrc2, mandelbrot, life) in odd shapes and encodings, and
damaged files: empty, cut inside the header, cut inside the frame data, random bytes, a valid container whose frame
data is zeroed, text under a video name, a dangling symlink, a directory named like a video, a file with no read
permission, and a captions manifest with missing, extra and escaping rows.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffusion.denoiser
import pipelines.core.loop as loop
import pipelines.media.video_io as video_io
from pipelines.core.config import UserError, load_config
from pipelines.latents.shards import LatentDataset
from pipelines.media.config import ClipSpec
from pipelines.media.datasets import FrameDataset, SkippedFileWarning, VideoClipDataset, scan_media
from pipelines.models.diffusion import load_diffusion
from pipelines.stages.configs import AutoencoderTrainConfig, DiffusionTrainConfig, EncodeConfig
from pipelines.stages.encode_latents import encode_latents
from pipelines.stages.train_autoencoder import train_autoencoder
from pipelines.stages.train_diffusion import train_diffusion
from tests.pipeline_helpers import autoencoder_overrides, diffusion_overrides, encode_overrides
from tests.videos import ffmpeg_clip, garbage_file, image_file, truncated_copy

quiet = lambda *args, **kwargs: None  # noqa: E731
ROOT = Path(__file__).resolve().parents[1]

# Whole clips of 8 frames can be cut from these (they are also good single frames).
CLIP_GOOD = {"testsrc.mp4", "mandelbrot.mp4", "life.mkv", "gray.mp4", "odd_37x23.mp4", "vfr.mp4",
             "wide_4000x16.mp4", "locked.mp4"}
SHORT = {"one_frame.mp4": "too short", "four_frames.mp4": "too short"}  # good frames, too short for a clip
# Bad files and the reasons they may be skipped for (the first decoder's failure decides between near synonyms).
BAD = {
    "empty.mp4": {"empty file"},
    "cut_header.mp4": {"no video stream", "unreadable"},
    "cut_body.mp4": {"unreadable", "truncated", "no frames"},
    "cut_late.mp4": {"truncated"},  # header intact, the frame data breaks off after 2 of 12 frames
    "random.mp4": {"unreadable"},
    "zeroed.mp4": {"unreadable", "no frames"},
    "text.mp4": {"unreadable"},
    "dangling.mp4": {"missing file"},
}
IMAGES_GOOD, IMAGES_BAD = {"still.png"}, {"broken.png": {"unreadable image"}}
# The frame data of cut_late.mp4 is readable up to its break, so a frame dataset may draw frames of it before the
# first draw past the break skips it; clip stages always need frames past the break.
PARTIAL_FRAMES = {"cut_late.mp4"}
CAPTIONED = {"testsrc.mp4": "a test card", "gray.mp4": "a grey test card", "life.mkv": "the game of life"}
ESCAPING = {"../outside/secret.mp4": "SECRET OUTSIDE THE ROOT", "../../etc/passwd": "PASSWD OUTSIDE THE ROOT"}


def _ffmpeg(path: Path, *args: str) -> Path:
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *args, str(path)], check=True)
    return path


def _lavfi(path: Path, source: str, frames: int, size: tuple[int, int], *args: str) -> Path:
    """``frames`` frames of a lavfi ``source`` of ``size = (h, w)`` with extra output options."""
    return _ffmpeg(path, "-f", "lavfi", "-i", f"{source}=size={size[1]}x{size[0]}:rate=8", "-frames:v", str(frames),
                   *args)


def _zero_frame_data(src: Path, dst: Path) -> Path:
    """A copy of an MP4 whose boxes are intact and whose ``mdat`` payload (the coded frames) is all zeros."""
    data, offset = bytearray(src.read_bytes()), 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        header = 8
        if size == 1:  # 64-bit size
            size, header = struct.unpack(">Q", data[offset + 8 : offset + 16])[0], 16
        size = size or len(data) - offset  # 0: to the end of the file
        if kind == b"mdat":
            data[offset + header : offset + size] = bytes(size - header)
        offset += size
    dst.write_bytes(bytes(data))
    return dst


def _can_read(path: Path) -> bool:
    """Whether this process can open ``path`` (root reads files whatever their mode)."""
    try:
        with path.open("rb"):
            return True
    except PermissionError:
        return False


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("bad_inputs")
    root = base / "data" / "videos"
    root.mkdir(parents=True)
    ffmpeg_clip(root / "testsrc.mp4", "testsrc2", frames=12, size=(32, 40))
    ffmpeg_clip(root / "mandelbrot.mp4", "mandelbrot", frames=12, size=(32, 32))
    ffmpeg_clip(root / "life.mkv", "life", frames=12, size=(32, 32))
    _lavfi(root / "gray.mp4", "testsrc2", 12, (32, 32), "-pix_fmt", "gray")
    _lavfi(root / "odd_37x23.mp4", "mandelbrot", 12, (23, 37), "-pix_fmt", "yuv444p")  # 4:4:4 allows odd sizes
    _lavfi(root / "vfr.mp4", "testsrc2", 14, (32, 32), "-vf", r"settb=1/1000,setpts=if(lt(N\,7)\,N*125\,875+(N-7)*42)",
           "-fps_mode", "passthrough", "-enc_time_base", "1/1000", "-pix_fmt", "yuv420p")  # 8 fps, then 24 fps
    _lavfi(root / "wide_4000x16.mp4", "testsrc2", 10, (16, 4000), "-pix_fmt", "yuv420p")
    ffmpeg_clip(root / "locked.mp4", "life", frames=12, size=(32, 32))
    ffmpeg_clip(root / "one_frame.mp4", "testsrc2", frames=1, size=(32, 32))
    ffmpeg_clip(root / "four_frames.mp4", "mandelbrot", frames=4, size=(32, 32))
    image_file(root / "still.png", (24, 40))

    source = _lavfi(base / "faststart.mp4", "testsrc2", 12, (32, 32), "-pix_fmt", "yuv420p", "-movflags", "+faststart")
    (root / "empty.mp4").write_bytes(b"")
    truncated_copy(source, root / "cut_header.mp4", fraction=0.02)  # inside the moov box
    truncated_copy(source, root / "cut_body.mp4", fraction=0.6)  # inside the first (key) frame
    truncated_copy(source, root / "cut_late.mp4", fraction=0.9)
    garbage_file(root / "random.mp4")
    _zero_frame_data(source, root / "zeroed.mp4")
    (root / "text.mp4").write_text("not a video, only its name says so\n" * 20)
    (root / "dangling.mp4").symlink_to(root / "deleted-long-ago.mp4")
    garbage_file(root / "broken.png", 300)
    (root / "folder.mp4").mkdir()  # a directory with a video's name is not a file: never listed
    os.chmod(root / "locked.mp4", 0)

    # Outside the root: a real video and a file an escaping manifest path points at. Neither may be read.
    outside = ffmpeg_clip(base / "data" / "outside" / "secret.mp4", "testsrc2", frames=12, size=(32, 32))
    passwd = (root / "../../etc/passwd").resolve()
    passwd.parent.mkdir(parents=True)
    passwd.write_text("root:x:0:0:root:/root:/bin/sh\n")
    rows = [{"path": k, "caption": v} for k, v in CAPTIONED.items() if k != "life.mkv"]
    rows += [{"video": "life", "caption": CAPTIONED["life.mkv"]},  # by stem
             {"path": "gone.mp4", "caption": "a video that was deleted"},  # extra rows
             {"path": "sub/also_gone.webm", "caption": "another"},
             *({"path": k, "caption": v} for k, v in ESCAPING.items()),
             {"path": str(outside), "caption": "SECRET BY ABSOLUTE PATH"}]
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    locked_readable = _can_read(root / "locked.mp4")
    clip_good, bad = set(CLIP_GOOD), {k: set(v) for k, v in BAD.items()}
    if not locked_readable:  # not root: a file without read permission is unreadable
        clip_good.discard("locked.mp4")
        bad["locked.mp4"] = {"unreadable"}
    return {"base": base, "root": root, "outside": {outside.resolve(), passwd}, "clip_good": clip_good, "bad": bad,
            "locked_readable": locked_readable}


# ---------------------------------------------------------------------------------------------- helpers


class _Reads:
    """Every path the process opens from Python (audit hook) or hands to the video decoders, while active."""

    active: list[str] | None = None

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.active is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            cls.active.append(os.fsdecode(args[0]))


sys.addaudithook(_Reads.hook)


@contextlib.contextmanager
def _recording_reads():
    """Yields the list of paths opened inside the block: by Python (``open``) or handed to the video decoders."""
    opened: list[str] = []
    original = video_io._with_fallback

    def spy(path, backend, calls):
        opened.append(os.fspath(path))
        return original(path, backend, calls)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(video_io, "_with_fallback", spy)
        _Reads.active = opened
        try:
            yield opened
        finally:
            _Reads.active = None


@pytest.fixture
def reads() -> list[str]:
    with _recording_reads() as opened:
        yield opened


def _assert_nothing_outside_read(corpus, opened: list[str], reads_the_corpus: bool = True) -> None:
    touched = {Path(p).resolve() for p in opened}
    if reads_the_corpus:  # the spies work
        assert any(p.parent == corpus["root"].resolve() for p in touched), "the spies saw no read of the corpus"
    assert not touched & corpus["outside"], touched & corpus["outside"]
    assert Path("/etc/passwd") not in touched


def _skip_warnings(caught) -> dict[str, str]:
    """``{file name: message}`` of the SkippedFileWarnings, asserting there is one per file."""
    messages = [str(w.message) for w in caught if issubclass(w.category, SkippedFileWarning)]
    names = [m.split(": skipping ", 1)[1].split(": ", 1)[0] for m in messages]
    assert len(names) == len(set(names)), f"a file was warned about twice: {messages}"
    return {Path(n).name: m for n, m in zip(names, messages)}


def _assert_skipped(skipped: dict[str, str], expected: dict[str, set[str]], root: Path) -> None:
    """``skipped`` (path -> "reason: detail") holds exactly the expected files, each for an expected reason."""
    by_name = {Path(p).name: reason for p, reason in skipped.items()}
    assert set(by_name) == set(expected), f"skipped {sorted(by_name)}, expected {sorted(expected)}"
    for name, reason in by_name.items():
        assert reason.split(":", 1)[0] in expected[name], f"{name} skipped as {reason!r}"
    assert all(Path(p).parent == root for p in skipped)


def _iterate(dataset) -> tuple[list[dict], list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [dataset[i] for i in range(len(dataset))]
    return items, caught


# ---------------------------------------------------------------------------------------------- datasets


def test_the_corpus_lists_files_only(corpus):
    names = {p.name for p in scan_media(corpus["root"], (".mp4", ".mkv"))}
    assert "folder.mp4" not in names and "dangling.mp4" in names and "secret.mp4" not in names
    assert names == corpus["clip_good"] | set(SHORT) | set(corpus["bad"])


def test_clip_dataset_skips_every_bad_file_with_a_warning_and_uses_every_good_one(corpus, reads):
    root = corpus["root"]
    dataset = VideoClipDataset(root, ClipSpec(num_frames=8, size=32, start="random"), seed=0)
    items, caught = _iterate(dataset)
    assert {Path(it["path"]).name for it in items} == corpus["clip_good"]
    for item in items:
        assert item["video"].shape == (3, 8, 32, 32) and torch.isfinite(item["video"]).all()
        assert item["video"].abs().max() <= 1 and item["video"].std() > 0.01  # real pixels, not a blank frame
    expected = {**corpus["bad"], **{k: {v} for k, v in SHORT.items()}}
    _assert_skipped(dataset.skipped, expected, root)
    warned = _skip_warnings(caught)
    assert set(warned) == set(expected)
    for name, message in warned.items():
        assert str(root / name) in message and dataset.skipped[str(root / name)] in message
    captions = {Path(it["path"]).name: it["caption"] for it in items}
    assert captions == {name: CAPTIONED.get(name, "") for name in corpus["clip_good"]}  # missing rows: ""
    _assert_nothing_outside_read(corpus, reads)


def test_frame_dataset_reads_every_good_file_and_skips_the_bad(corpus, reads):
    root = corpus["root"]
    dataset = FrameDataset(root, size=32, frames_per_video=2, split="all", crop="center", seed=0)
    items, caught = _iterate(dataset)
    used = {Path(it["path"]).name for it in items}
    expected = {**corpus["bad"], **IMAGES_BAD}
    partial = {name for name in PARTIAL_FRAMES if name not in {Path(p).name for p in dataset.skipped}}
    assert used - partial == corpus["clip_good"] | set(SHORT) | IMAGES_GOOD  # one-frame and short clips included
    assert all(it["image"].shape == (3, 32, 32) and torch.isfinite(it["image"]).all() for it in items)
    _assert_skipped(dataset.skipped, {k: v for k, v in expected.items() if k not in partial}, root)
    warned = _skip_warnings(caught)
    assert set(warned) == set(expected) - partial
    for name, message in warned.items():
        assert str(root / name) in message and dataset.skipped[str(root / name)] in message
    _assert_nothing_outside_read(corpus, reads)


def test_an_unreadable_file_is_skipped_unless_this_process_can_read_it(corpus):
    """``chmod 000`` stops everyone but root; as root the file is simply a good file."""
    dataset = VideoClipDataset(corpus["root"], ClipSpec(num_frames=8, size=32), seed=0)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        paths = {Path(dataset[i]["path"]).name for i in range(len(dataset))}
    assert ("locked.mp4" in paths) == corpus["locked_readable"]
    assert (str(corpus["root"] / "locked.mp4") in dataset.skipped) == (not corpus["locked_readable"])


def test_damaged_videos_do_not_deadlock_pyav_when_its_python_logging_is_on(corpus):
    """Importing torchvision switches PyAV's FFmpeg logs to a Python callback; decoding threads that log errors of a
    damaged stream then deadlocked the process when the codec context was freed. Run in a child process: a
    deadlock must fail the test, not hang it."""
    code = ("import sys, av\n"
            "av.logging.set_level(av.logging.ERROR)  # what importing torchvision does\n"
            "from pipelines.media.video_io import VideoReadError, read_frames\n"
            "for _ in range(10):\n"
            "    for path in sys.argv[1:]:\n"
            "        try:\n"
            "            read_frames(path, list(range(8)), backend='pyav')\n"
            "        except VideoReadError:\n"
            "            pass\n"
            "print('no deadlock')\n")
    paths = [str(corpus["root"] / name) for name in ("zeroed.mp4", "cut_body.mp4", "cut_late.mp4")]
    try:
        result = subprocess.run([sys.executable, "-c", code, *paths], cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("decoding damaged videos through PyAV deadlocked")
    assert result.returncode == 0 and "no deadlock" in result.stdout, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- the stages


@pytest.fixture(scope="module")
def stages(corpus, tmp_path_factory) -> dict:
    """The autoencoder (2 steps), the latents and the diffusion model (2 steps), each made from the corpus, with the
    warnings each stage gave and the paths each read."""
    out = tmp_path_factory.mktemp("bad_inputs_runs")
    runs: dict = {"out": out}
    for name, run in (
        ("autoencoder", lambda: train_autoencoder(load_config(
            AutoencoderTrainConfig, None, autoencoder_overrides(corpus["root"], out / "ae", steps=2)), quiet)),
        ("encode", lambda: encode_latents(load_config(
            EncodeConfig, None, encode_overrides(out / "ae" / "model", corpus["root"], out / "lat")), quiet)),
        ("diffusion", lambda: train_diffusion(load_config(
            DiffusionTrainConfig, None, diffusion_overrides(out / "lat", out / "dif", steps=2)), quiet)),
    ):
        with _recording_reads() as opened, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs[name] = run()
        runs[f"{name}_warnings"], runs[f"{name}_reads"] = caught, opened
    return runs


def test_autoencoder_training_finishes_and_skips_only_bad_files(corpus, stages):
    summary = stages["autoencoder"]
    assert summary["steps"] == 2 and 0 < summary["psnr"] < 100 and torch.isfinite(torch.tensor(summary["ssim"]))
    assert (stages["out"] / "ae" / "model" / "config.json").is_file()
    messages = [str(w.message) for w in stages["autoencoder_warnings"] if issubclass(w.category, SkippedFileWarning)]
    skipped = {Path(m.split(": skipping ", 1)[1].split(": ", 1)[0]).name for m in messages}
    assert skipped <= set(corpus["bad"]) | set(IMAGES_BAD)  # never a good file
    assert skipped, "the training and held-out frames met no bad file: the corpus no longer tests the stage"
    _assert_nothing_outside_read(corpus, stages["autoencoder_reads"])


def test_encoding_lists_every_skipped_file_with_its_reason_and_encodes_every_good_one(corpus, stages):
    manifest = stages["encode"]
    root = corpus["root"]
    expected = {**corpus["bad"], **{k: {v} for k, v in SHORT.items()}}
    _assert_skipped(manifest["skipped"], expected, root)
    assert all(": " in reason or reason in ("empty file", "missing file") for reason in manifest["skipped"].values())
    assert manifest["videos"] == len(corpus["clip_good"]) + len(expected)
    assert manifest["clips"] == len(corpus["clip_good"]) and manifest["latent_shape"] == [4, 8, 8, 8]
    dataset = LatentDataset(stages["out"] / "lat")
    records = {Path(r["path"]).name: r for r in dataset.records}
    assert set(records) == corpus["clip_good"]
    assert {name: r["caption"] for name, r in records.items()} == {n: CAPTIONED.get(n, "") for n in records}
    assert all(r["frame_indices"] == list(range(8)) for r in records.values())
    assert all(torch.isfinite(dataset[i]["latents"]).all() for i in range(len(dataset)))
    assert all(Path(r["path"]).resolve().parent == root.resolve() for r in dataset.records)
    _assert_nothing_outside_read(corpus, stages["encode_reads"])


def test_escaping_caption_paths_are_never_read_nor_matched(corpus, stages):
    captions = [r["caption"] for r in LatentDataset(stages["out"] / "lat").records]
    assert not any("OUTSIDE" in c or "ABSOLUTE" in c for c in captions)
    for name in ("autoencoder", "encode", "diffusion"):
        _assert_nothing_outside_read(corpus, stages[f"{name}_reads"], reads_the_corpus=name != "diffusion")


def test_diffusion_trains_on_the_shards_of_the_corpus(stages):
    summary = stages["diffusion"]
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    assert (stages["out"] / "dif" / "checkpoints" / "step_0000002" / "unet.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- non-finite losses


def _nan_from(monkeypatch, bad_steps) -> list[int]:
    """Make the diffusion loss NaN at the 0-based training steps in ``bad_steps`` (one loss call per step here:
    one process, no gradient accumulation); returns the list of steps seen."""
    calls: list[int] = []
    original = diffusion.denoiser.loss_weight

    def loss_weight(*args, **kwargs):
        weight = original(*args, **kwargs)
        calls.append(len(calls))
        return weight * float("nan") if bad_steps(calls[-1]) else weight

    monkeypatch.setattr(diffusion.denoiser, "loss_weight", loss_weight)
    return calls


def _optimizer_steps(checkpoint: Path) -> int:
    """AdamW's step count, from the optimiser state saved in a checkpoint."""
    state = load_file(checkpoint / "optimizer_main.safetensors")
    steps = {int(v.item()) for k, v in state.items() if k.endswith(".step")}
    assert len(steps) == 1, steps
    return steps.pop()


def _nan_run_overrides(stages, out: Path, steps: int) -> list[str]:
    """The corpus's shards, a checkpoint after every step, at most 2 bad steps in a row, no sample sheets."""
    return diffusion_overrides(stages["out"] / "lat", out, steps=steps) + [
        "run.checkpoint_every=1", "run.keep_checkpoints=5", "run.max_bad_steps=2", "sample_prompts=[]"]


@pytest.fixture(scope="module")
def one_bad_step(stages, tmp_path_factory) -> dict:
    """3 steps whose second loss is NaN."""
    out = tmp_path_factory.mktemp("one_bad_step")
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = _nan_from(monkeypatch, lambda step: step == 1)
        summary = train_diffusion(load_config(DiffusionTrainConfig, None, _nan_run_overrides(stages, out, 3)), quiet)
    return {"out": out, "calls": calls, "summary": summary}


def test_a_non_finite_loss_skips_its_step_and_is_counted(one_bad_step):
    out, summary = one_bad_step["out"], one_bad_step["summary"]
    assert len(one_bad_step["calls"]) == 3 and summary["steps"] == 3 and summary["skipped_steps"] == 1
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1
    with (out / "loss.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["skipped_steps"]) for r in rows] == [0, 1, 1]
    checkpoints = out / "checkpoints"
    assert [_optimizer_steps(checkpoints / f"step_{k:07d}") for k in (1, 2, 3)] == [1, 1, 2]  # step 2 changed nothing
    before, after = (load_file(checkpoints / f"step_{k:07d}" / "unet.safetensors") for k in (1, 2))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(w).all() for w in load_file(checkpoints / "step_0000003" / "unet.safetensors").values())


def test_the_final_loss_leaves_skipped_steps_out(one_bad_step):
    assert math.isfinite(one_bad_step["summary"]["final_loss"])


def test_too_many_non_finite_losses_stop_the_run_and_keep_the_last_checkpoint(stages, monkeypatch, tmp_path):
    overrides = _nan_run_overrides(stages, tmp_path, 3)
    saved: dict[str, dict[str, torch.Tensor]] = {}
    original = loop.save_checkpoint

    def save_and_remember(*args, **kwargs):  # what each checkpoint held when it was written
        directory = original(*args, **kwargs)
        saved[directory.name] = {p.name: load_file(p) for p in directory.glob("*.safetensors")}
        return directory

    monkeypatch.setattr(loop, "save_checkpoint", save_and_remember)
    calls = _nan_from(monkeypatch, lambda step: step >= 1)
    with pytest.raises(UserError) as stopped:
        train_diffusion(load_config(DiffusionTrainConfig, None, overrides), quiet)
    message = str(stopped.value)
    assert "\n" not in message and "2 steps in a row with a non-finite loss" in message and "intact" in message
    assert len(calls) == 3  # one good step, then two bad ones
    # a checkpoint after the good step and one after the first (skipped) bad step, with the same weights; the stop
    # leaves both as they were written
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_0000002"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == sorted(saved) == ["step_0000001", "step_0000002"]
    for step, tensors in saved.items():
        on_disk = {p.name: load_file(p) for p in (checkpoints / step).glob("*.safetensors")}
        assert on_disk.keys() == tensors.keys() and "unet.safetensors" in on_disk
        for name, values in on_disk.items():
            assert all(torch.equal(values[k], tensors[name][k]) for k in values), f"{step}/{name}"
    first, second = (saved[f"step_000000{k}"]["unet.safetensors"] for k in (1, 2))
    assert all(torch.equal(first[k], second[k]) for k in first)
    bundle = load_diffusion(tmp_path)
    assert all(torch.isfinite(p).all() for p in bundle.denoiser.parameters())
    monkeypatch.undo()  # the loss is finite again: the run resumes from that checkpoint and finishes
    summary = train_diffusion(load_config(DiffusionTrainConfig, None, overrides), quiet)
    assert summary["steps"] == 3 and summary["skipped_steps"] == 1  # the skip the step-2 checkpoint counted
    assert _optimizer_steps(checkpoints / "step_0000003") == 2
