"""Datasets of video clips, images and single frames from folders of media files, with captions.

Every item is a dict; tensors follow the project layout: a clip is ``video [3, f, h, w]`` and an image
``image [3, h, w]``, both float in [-1, 1]. :func:`collate` batches them to ``[b, 3, f, h, w]`` /
``[b, 3, h, w]`` and keeps strings as lists.

Robustness: a file that cannot be decoded, is truncated, or is too short for the clip is *skipped*: one
:class:`SkippedFileWarning` per file, an entry in ``dataset.skipped`` (path -> ``"reason: detail"``), and the
item is taken from the next good file (index i+1, i+2, ... modulo the number of files), so ``__getitem__``
never raises unless every file is bad. With DataLoader workers each worker process holds its own copy of the
dataset, so skips are recorded (and warned about) per worker and ``dataset.skipped`` in the main process only
lists what the main process itself saw; ``probe=True`` finds bad files up front, in the main process.

Randomness (clip start, random crop, which frame) comes from a generator seeded by ``(seed, epoch, index)``:
an item is a pure function of those three numbers, whichever worker loads it. Call ``set_epoch`` each epoch
to draw new clips (as with ``DistributedSampler``); ``seed=None`` draws instead from torch's global RNG, which
DataLoader seeds differently in every worker.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import Dataset
from tqdm import tqdm

from pipelines.core.config import UserError, check_choice
from pipelines.core.loop import collate  # noqa: F401  (datasets and their collate belong together for users)
from pipelines.media.config import ClipSpec, FramesConfig
from pipelines.media.video_io import MediaReadError, VideoInfo, VideoReadError, read_frames, read_image, video_info

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PATH_COLUMNS = ("path", "video", "videoid", "file", "filename")
CAPTION_COLUMNS = ("caption", "name", "text")
CAPTION_FILES = ("captions.jsonl", "captions.csv")

Roots = str | os.PathLike | Sequence[str | os.PathLike]
Split = Literal["train", "eval", "all"]


class SkippedFileWarning(UserWarning):
    """A dataset met a file it cannot use and will skip it from now on."""


# ---------------------------------------------------------------------------------------------- files


def _as_roots(roots: Roots) -> list[Path]:
    """One folder or several, as a list of paths."""
    return [Path(roots)] if isinstance(roots, (str, os.PathLike)) else [Path(r) for r in roots]


def scan_media(roots: Roots, extensions: Sequence[str]) -> list[Path]:
    """Files under one or several folders (recursively) whose suffix is in ``extensions`` (any case),
    sorted; hidden files and folders (names starting with ``.``: half-written temporaries) are ignored."""
    extensions = tuple(e.lower() for e in extensions)
    found = []
    for root in _as_roots(roots):
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            found += [
                Path(folder) / n for n in names if not n.startswith(".") and n.lower().endswith(extensions)
            ]
    return sorted(set(found), key=lambda p: p.as_posix())  # overlapping roots list a file once


def relative_key(path: Path, roots: Sequence[Path]) -> str:
    """``path`` relative to the first root that contains it (POSIX form), else its full POSIX path."""
    for root in roots:
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return path.as_posix()


def _hash_fraction(key: str) -> float:
    """A stable pseudo-random number in [0, 1) from a string (MD5; same on every machine and process)."""
    return int(hashlib.md5(key.encode()).hexdigest()[:12], 16) / 16**12


def split_files(files: list[Path], roots: Sequence[Path], split: Split, eval_fraction: float) -> list[Path]:
    """The files of a deterministic train / eval split by hash of the path relative to its root.

    A file is in ``eval`` when its hash fraction is below ``eval_fraction``; with two or more files, eval
    holds at least one file and train at least one. ``"all"`` returns every file.
    """
    check_choice("split", split, ("train", "eval", "all"))
    if split == "all":
        return list(files)
    keys = [_hash_fraction(relative_key(f, roots)) for f in files]
    held_out = {i for i, k in enumerate(keys) if k < eval_fraction}
    if len(files) >= 2 and not held_out:
        held_out = {int(np.argmin(keys))}
    if len(files) >= 2 and len(held_out) == len(files):
        held_out.remove(int(np.argmax(keys)))
    return [f for i, f in enumerate(files) if (i in held_out) == (split == "eval")]


def split_folders(data: FramesConfig, split: Split) -> tuple[list[str], Split]:
    """The folders a frame dataset of ``split`` reads under ``data``, and the hash split of them it takes:
    ``roots`` split by hash, or, with ``eval_roots``, all of ``roots`` ("train"), of ``eval_roots`` ("eval") or
    of both ("all")."""
    check_choice("split", split, ("train", "eval", "all"))
    if not data.eval_roots:
        return list(data.roots), split
    folders = {"train": list(data.roots), "eval": list(data.eval_roots), "all": [*data.roots, *data.eval_roots]}
    return folders[split], "all"


# ---------------------------------------------------------------------------------------------- captions


def _pick(row: Mapping[str, Any], columns: Sequence[str]) -> tuple[str, str] | None:
    """The first ``(column, value)`` of ``columns`` that ``row`` has with a non-empty value."""
    for column in columns:
        value = row.get(column)
        if value not in (None, ""):
            return column, str(value).strip()
    return None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (one object per line) or a CSV file with a header, keys lower-cased."""
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
    else:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    return [{str(k).strip().lower(): v for k, v in row.items() if k is not None} for row in rows]


def load_captions(path: str | os.PathLike) -> dict[str, str]:
    """Read a captions manifest: ``{file key: caption}``.

    CSV with a header, or JSONL (``.jsonl``). The key column is the first of ``path, video, videoid, file,
    filename``; the caption column the first of ``caption, name, text``. WebVid's ``videoid,name`` works:
    a ``videoid`` without a suffix maps to ``<videoid>.mp4``. Keys are matched to files by :class:`Captions`.
    """
    path = Path(path)
    captions = {}
    for row in _read_rows(path):
        key, caption = _pick(row, PATH_COLUMNS), _pick(row, CAPTION_COLUMNS)
        if key is None or caption is None:
            raise ValueError(
                f"{path}: each row needs one of {PATH_COLUMNS} and one of {CAPTION_COLUMNS}; "
                f"got {sorted(row)}"
            )
        column, name = key
        if column == "videoid" and not PurePosixPath(name).suffix:
            name = f"{name}.mp4"
        captions[name] = caption[1]
    return captions


class Captions:
    """Caption of a media file: matched by path relative to a root, by absolute path, by file name, or by
    stem (names and stems shared by manifest entries with different captions are not used)."""

    def __init__(self, captions: Mapping[str, str], roots: Sequence[Path]):
        self.roots = roots
        keys = {PurePosixPath(k.replace("\\", "/")).as_posix(): v for k, v in captions.items()}
        self.by_path = {k: v for k, v in keys.items() if not k.startswith("../")}  # rows escaping the root: ignored
        names, stems = defaultdict(set), defaultdict(set)
        for key, caption in self.by_path.items():
            names[PurePosixPath(key).name].add(caption)
            stems[PurePosixPath(key).stem].add(caption)
        self.by_name = {k: v.pop() for k, v in names.items() if len(v) == 1}
        self.by_stem = {k: v.pop() for k, v in stems.items() if len(v) == 1}

    def __call__(self, path: Path) -> str:
        """The caption of ``path``, or ``""``."""
        for key in (relative_key(path, self.roots), path.resolve().as_posix(), path.as_posix()):
            if key in self.by_path:
                return self.by_path[key]
        return self.by_name.get(path.name, self.by_stem.get(path.stem, ""))

    def __len__(self) -> int:
        return len(self.by_path)


def find_captions(captions: str | os.PathLike | Mapping[str, str] | None, roots: Sequence[Path]) -> Captions:
    """A :class:`Captions` from a manifest path, a mapping, or (``None``) the first ``captions.jsonl`` /
    ``captions.csv`` found directly in a root (what :func:`pipelines.world.synthetic.make_world` writes)."""
    if captions is None:
        manifests = [r / name for r in roots for name in CAPTION_FILES if (r / name).is_file()]
        captions = load_captions(manifests[0]) if manifests else {}
    elif not isinstance(captions, Mapping):
        captions = load_captions(captions)
    return Captions(captions, roots)


# ---------------------------------------------------------------------------------------------- frames


def frame_stride(spec: ClipSpec, fps: float) -> int:
    """The stride for a video at ``fps``: from ``target_fps`` when set (and the fps is known)."""
    if spec.target_fps and fps > 0:
        return max(1, round(fps / spec.target_fps))
    return spec.frame_stride


def clip_frame_indices(spec: ClipSpec, info: VideoInfo, rng: np.random.Generator, path: str = "") -> np.ndarray:
    """Frame indices ``[num_frames]`` of one clip of a video described by ``info``.

    Raises:
        VideoReadError: (reason ``too short``) the video has fewer than ``(num_frames - 1) * stride + 1``.
    """
    stride = frame_stride(spec, info.fps)
    span = (spec.num_frames - 1) * stride + 1
    if info.num_frames < span:
        raise VideoReadError(path, "too short", f"{info.num_frames} frames, clip needs {span}")
    latest = info.num_frames - span
    start = {"first": 0, "center": latest // 2, "random": None}[spec.start]
    start = int(rng.integers(0, latest + 1)) if start is None else start
    return start + stride * np.arange(spec.num_frames)


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``(h, w)`` from an int or a pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_crop(
    frames: np.ndarray,
    size: int | Sequence[int],
    crop: Literal["center", "random"] = "center",
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Frames ``uint8 [n, H, W, 3]`` to floats ``[n, 3, h, w]`` in [-1, 1], all cropped alike.

    Equivalent to resizing the short side so ``(h, w)`` is covered, then cropping ``(h, w)``: the matching
    window ``(h / s, w / s)`` (``s`` the scale) is cut from the source first, then resized with antialiased
    bilinear interpolation, which never resizes pixels that are thrown away.
    """
    h, w = _size_hw(size)
    height, width = frames.shape[1:3]
    scale = max(h / height, w / width)
    ch, cw = min(height, round(h / scale)), min(width, round(w / scale))
    if crop == "random" and rng is not None:
        top, left = int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1))
    else:
        top, left = (height - ch) // 2, (width - cw) // 2
    x = rearrange(torch.from_numpy(frames[:, top : top + ch, left : left + cw]), "n h w c -> n c h w").float()
    if (ch, cw) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return (x / 127.5 - 1).clamp(-1, 1)


def item_rng(seed: int | None, epoch: int, index: int, attempt: int = 0) -> np.random.Generator:
    """The generator for one item: seeded by ``(seed, epoch, index, attempt)``, or by torch's RNG if seed is None.

    ``attempt`` counts the files tried for the item, so its draws do not depend on whether a bad file before it
    was already known (skipped unread) or failed while being read: resumed runs see the same items.
    """
    if seed is None:
        return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
    return np.random.default_rng([seed, epoch, index, attempt])


# ---------------------------------------------------------------------------------------------- datasets


class MediaDataset(Dataset, ABC):
    """What the datasets below share: their files, the files found unusable, seeding and skipping.

    ``skipped`` maps a path to ``"reason: detail"``. Item ``index`` is ``_load(file, rng)`` for file
    ``index mod n`` or, when that file fails, the next good one (i+1, i+2, ... mod n). Subclasses define
    ``_load(path, rng) -> dict`` and raise :class:`MediaReadError` for files they cannot use.
    """

    def __init__(self, roots: list[Path], files: list[Path], seed: int | None, name: str):
        if not files:
            raise FileNotFoundError(f"{name}: no media files under {', '.join(map(str, roots))}")
        self.roots, self.files, self.seed, self.name = roots, files, seed, name
        self.epoch = 0
        self.skipped: dict[str, str] = {}

    @abstractmethod
    def _load(self, path: Path, rng: np.random.Generator) -> dict:
        """One item from ``path`` drawing randomness from ``rng``; each dataset below defines it and raises
        :class:`MediaReadError` for a file it cannot use."""

    def set_epoch(self, epoch: int) -> None:
        """Draw different clips, crops and frames in the next epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):  # IndexError is what ends `for item in dataset`
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        for offset in range(len(self.files)):
            path = self.files[(index + offset) % len(self.files)]
            if str(path) in self.skipped:
                continue
            try:
                return self._load(path, item_rng(self.seed, self.epoch, index, offset))
            except MediaReadError as error:
                self.skip(path, error)
        raise UserError(f"every file is unusable. {self.summary()}")

    def skip(self, path: Path, error: MediaReadError) -> None:
        """Record ``path`` as unusable and warn (once: a skipped file is never read again)."""
        self.skipped[str(path)] = f"{error.reason}: {error.detail}" if error.detail else error.reason
        warnings.warn(f"{self.name}: skipping {path}: {self.skipped[str(path)]}", SkippedFileWarning, 3)

    def summary(self) -> str:
        """One paragraph: ``name (roots): N files, M skipped (reason: file, file; reason: file).``"""
        groups = defaultdict(list)
        for path, reason in self.skipped.items():
            groups[reason.split(":", 1)[0]].append(relative_key(Path(path), self.roots))
        roots = ", ".join(map(str, self.roots))
        text = f"{self.name} ({roots}): {len(self.files)} files, {len(self.skipped)} skipped"
        if groups:
            text += (
                " (" + "; ".join(f"{reason}: {', '.join(paths)}" for reason, paths in groups.items()) + ")"
            )
        return text + "."


class VideoClipDataset(MediaDataset):
    """Clips of ``spec.num_frames`` frames from the videos under ``root``, one item per video file.

    Items: ``{"video": [3, f, h, w] in [-1, 1], "caption": str ("" if none), "path": str,
    "frame_indices": LongTensor [f]}``. Captions come from ``captions`` (a manifest path or a mapping, see
    :func:`load_captions`) or, when None, from ``captions.jsonl`` / ``captions.csv`` in a root.
    ``probe=True`` reads every header up front (progress bar) and drops unreadable or too-short files.
    ``split`` / ``eval_fraction`` hold out files as in :func:`split_files`. See the module docstring for
    skipping, workers and seeding.
    """

    def __init__(
        self,
        root: Roots,
        spec: ClipSpec | None = None,
        captions: str | os.PathLike | Mapping[str, str] | None = None,
        seed: int | None = 0,
        probe: bool = False,
        split: Split = "all",
        eval_fraction: float = 0.1,
    ):
        roots = _as_roots(root)
        files = split_files(scan_media(roots, VIDEO_EXTENSIONS), roots, split, eval_fraction)
        super().__init__(roots, files, seed, type(self).__name__)
        self.spec = spec or ClipSpec()
        self.captions = find_captions(captions, roots)
        self._infos: dict[Path, VideoInfo] = {}
        if probe:
            self.probe()

    def _info(self, path: Path) -> VideoInfo:
        """Header of ``path`` (cached)."""
        if path not in self._infos:
            self._infos[path] = video_info(path)
        return self._infos[path]

    def probe(self) -> None:
        """Read every header, skip files that are unreadable or too short, and drop them from ``files``."""
        rng = np.random.default_rng(0)
        for path in tqdm(self.files, desc="probing videos", unit="file", leave=False):
            try:
                clip_frame_indices(self.spec, self._info(path), rng, str(path))
            except MediaReadError as error:
                self.skip(path, error)
        self.files = [f for f in self.files if str(f) not in self.skipped]
        if not self.files:
            raise UserError(f"every file is unusable. {self.summary()}")

    def _load(self, path: Path, rng: np.random.Generator) -> dict:
        """One clip of ``path``."""
        indices = clip_frame_indices(self.spec, self._info(path), rng, str(path))
        frames = read_frames(path, indices)  # uint8 [f, H, W, 3]
        video = resize_crop(frames, self.spec.size, self.spec.crop, rng)  # [f, 3, h, w]
        return {
            "video": rearrange(video, "f c h w -> c f h w"),
            "caption": self.captions(path),
            "path": str(path),
            "frame_indices": torch.from_numpy(indices).long(),
        }


class ImageDataset(MediaDataset):
    """Images under ``root`` for joint image-video training: ``{"image": [3, h, w] in [-1, 1], "caption",
    "path"}``, resized and cropped like clips, skipped and seeded as in :class:`VideoClipDataset`."""

    def __init__(
        self,
        root: Roots,
        size: int | tuple[int, int] = 64,
        crop: Literal["center", "random"] = "center",
        captions: str | os.PathLike | Mapping[str, str] | None = None,
        seed: int | None = 0,
    ):
        check_choice("crop", crop, ("center", "random"))
        roots = _as_roots(root)
        super().__init__(roots, scan_media(roots, IMAGE_EXTENSIONS), seed, type(self).__name__)
        self.size, self.crop = size, crop
        self.captions = find_captions(captions, roots)

    def _load(self, path: Path, rng: np.random.Generator) -> dict:
        """One image of ``path``."""
        image = resize_crop(read_image(path)[None], self.size, self.crop, rng)[0]
        return {"image": image, "caption": self.captions(path), "path": str(path)}


class DecodedVideos:
    """Whole decoded videos kept in memory, at most ``budget_mb`` megabytes of them, least recently used dropped
    first: a frame dataset draws a few frames of every file per epoch, and decoding a short video whole costs
    little more than seeking one frame of it, so each file is decoded about once instead of once per draw. Videos
    larger than the budget are read frame by frame as before. Every data-loader process holds its own."""

    def __init__(self, budget_mb: float):
        self.budget, self.used = int(budget_mb * 2**20), 0
        self.videos: OrderedDict[Path, np.ndarray] = OrderedDict()

    def frame(self, path: Path, index: int, info: VideoInfo) -> np.ndarray:
        """Frame ``index`` of ``path``: ``uint8 [1, H, W, 3]``, as ``read_frames(path, [index])`` decodes it."""
        frames = self.videos.get(path)
        if frames is None and info.num_frames * info.height * info.width * 3 <= self.budget:
            frames = read_frames(path)
            while self.videos and self.used + frames.nbytes > self.budget:
                self.used -= self.videos.popitem(last=False)[1].nbytes
            self.videos[path], self.used = frames, self.used + frames.nbytes
        if frames is None or index >= len(frames):  # too large to keep, or a header promising more frames
            return read_frames(path, [index])
        self.videos.move_to_end(path)
        return frames[index : index + 1]


class FrameDataset(MediaDataset):
    """Single frames for training the per-frame autoencoder: ``{"image": [3, h, w] in [-1, 1], "path"}``.

    Draws from the videos and images under ``root``, one folder or several. An epoch has
    ``frames_per_video`` items per file: item ``i`` is a random frame of file ``i mod n`` (an image is its
    own only frame). ``split`` holds out files by hash (:func:`split_files`) so evaluation never sees a
    training file. Skipping and seeding as in :class:`VideoClipDataset`. Decoded videos of up to ``cache_mb``
    megabytes in all stay in memory (:class:`DecodedVideos`; 0 reads every frame from its file).
    """

    def __init__(
        self,
        root: Roots,
        size: int | tuple[int, int] = 64,
        frames_per_video: int = 8,
        split: Split = "all",
        eval_fraction: float = 0.1,
        crop: Literal["center", "random"] = "center",
        seed: int | None = 0,
        cache_mb: float = 256,
    ):
        check_choice("crop", crop, ("center", "random"))
        roots = _as_roots(root)
        files = split_files(
            scan_media(roots, VIDEO_EXTENSIONS + IMAGE_EXTENSIONS), roots, split, eval_fraction
        )
        super().__init__(roots, files, seed, f"FrameDataset[{split}]")
        self.size, self.crop, self.frames_per_video = size, crop, frames_per_video
        self._infos: dict[Path, VideoInfo] = {}
        self.decoded = DecodedVideos(cache_mb)

    def __len__(self) -> int:
        return len(self.files) * self.frames_per_video

    def _frame(self, path: Path, rng: np.random.Generator) -> np.ndarray:
        """A random frame of a video, or the image: ``uint8 [1, H, W, 3]``."""
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return read_image(path)[None]
        if path not in self._infos:
            self._infos[path] = video_info(path)
        info = self._infos[path]
        return self.decoded.frame(path, int(rng.integers(0, info.num_frames)), info)

    def _load(self, path: Path, rng: np.random.Generator) -> dict:
        """One frame of ``path``."""
        image = resize_crop(self._frame(path, rng), self.size, self.crop, rng)[0]
        return {"image": image, "path": str(path)}
