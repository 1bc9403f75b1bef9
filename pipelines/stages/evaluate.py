"""``scripts/evaluate.py``: a folder of generated videos against a folder of real ones, in one command.

* FVD and KVD on StyleGAN-V's I3D (``metrics.i3d``; the protocol is in :mod:`pipelines.evaluation.fvd`);
  without the detector they are reported as not computed, with the line that says how to enable them.
* PSNR / SSIM (and LPIPS when its ImageNet weights are on disk) of the generated and real files whose names
  (stems) pair up: reconstructions against their sources.
* The analysers ``metrics.analysers`` names (plug-ins, :mod:`pipelines.evaluation.analysers`; ``world``: the demo
  world's) on the whole generated videos, with the prompt and chunk boundaries a ``generation_*.json`` of
  ``scripts/generate.py`` records for each.

Videos are decoded one at a time and clips go to the I3D a batch at a time, so memory stays flat in the number
of videos. A file that cannot be read or is shorter than a clip is skipped with a warning naming it and why.
Writes ``out_dir/metrics.json``, ``out_dir/metrics.md`` and the resolved ``out_dir/evaluate.yaml``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from autoencoder import build_lpips
from pipelines.core.config import UserError, config_to_dict, save_resolved_config
from pipelines.core.devices import resolve_device
from pipelines.core.files import atomic_write_json, atomic_write_text
from pipelines.evaluation.analysers import Analyser, build_analysers
from pipelines.evaluation.config import EvaluateConfig, MetricsConfig
from pipelines.evaluation.frames import frame_scores
from pipelines.evaluation.fvd import (
    DETECTOR_KWARGS,
    I3D_URL,
    FeatureExtractor,
    fvd_clip_indices,
    fvd_from_features,
    i3d_hint,
    kernel_distance,
    load_i3d,
)
from pipelines.media.datasets import VIDEO_EXTENSIONS, SkippedFileWarning, scan_media
from pipelines.media.video_io import MediaReadError, read_frames, video_info


@dataclass
class Side:
    """One folder's files and what became of them."""

    folder: Path
    files: list[Path]
    clips: int | None = 0  # None: not read
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason

    def skip(self, path: Path, reason: str) -> None:
        """Record and warn about a file that cannot be used."""
        self.skipped[str(path)] = reason
        warnings.warn(f"skipping {path}: {reason}", SkippedFileWarning, stacklevel=3)

    def summary(self) -> dict:
        return {"folder": str(self.folder), "files": len(self.files), "clips": self.clips, "skipped": self.skipped}


# ---------------------------------------------------------------------------------------------- inputs


def _videos(folder: str, key: str) -> Side:
    """The sorted video files of ``folder`` (UserError naming ``key`` when it is missing or holds none)."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{key}={folder}: no such folder")
    files = scan_media(path, VIDEO_EXTENSIONS)
    if not files:
        raise UserError(f"{key}={folder}: no video files ({', '.join(VIDEO_EXTENSIONS)})")
    return Side(path, files)


def generation_records(folder: Path) -> dict[Path, dict]:
    """``{video path: {"prompt", "boundaries"}}`` from the ``generation_*.json`` files under ``folder``
    (``{"samples": [{"file", "prompt", "boundaries", ...}]}``, file names relative to the JSON)."""
    records = {}
    for manifest in sorted(folder.rglob("generation_*.json")):
        try:
            summary = json.loads(manifest.read_text(encoding="utf-8"))
            for sample in summary["samples"]:
                boundaries = [int(b) for b in sample.get("boundaries", [])]
                records[(manifest.parent / sample["file"]).resolve()] = {"prompt": str(sample["prompt"]),
                                                                         "boundaries": boundaries}
        except (OSError, ValueError, KeyError, TypeError) as error:
            warnings.warn(f"ignoring {manifest}: not a generation record ({error})", stacklevel=2)
    return records


def _pairs(generated: Side, real: Side) -> dict[Path, Path]:
    """``{generated file: real file}`` for file names (stems) both folders hold once."""
    def by_stem(files: list[Path]) -> dict[str, Path | None]:
        found: dict[str, Path | None] = {}
        for f in files:
            found[f.stem] = None if f.stem in found else f  # a repeated stem is ambiguous
        return found

    gen, ref = by_stem(generated.files), by_stem(real.files)
    ambiguous = sorted(s for s in gen.keys() & ref.keys() if gen[s] is None or ref[s] is None)
    if ambiguous:
        warnings.warn(f"not pairing file names that occur more than once: {', '.join(ambiguous[:5])}", stacklevel=2)
    return {gen[s]: ref[s] for s in gen.keys() & ref.keys() if gen[s] is not None and ref[s] is not None}


def _read_clip(path: Path, m: MetricsConfig, start: str, rng: np.random.Generator | None,
               whole: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """A clip ``uint8 [frames_per_clip, H, W, 3]`` of ``path`` and, with ``whole``, all its frames.

    Raises:
        MediaReadError: unreadable; ValueError: too short for a clip.
    """
    info = video_info(path)
    indices = fvd_clip_indices(info.num_frames, m.frames_per_clip, m.frame_stride, start, rng)
    if not whole:
        return read_frames(path, indices), None
    frames = read_frames(path)
    if len(frames) <= indices[-1]:
        raise ValueError(f"too short: {len(frames)} frames decoded, a clip needs {indices[-1] + 1}")
    return frames[indices], frames


# ---------------------------------------------------------------------------------------------- metrics


class Pairwise:
    """Per-frame PSNR, SSIM and LPIPS of generated clips against the real clips they pair with."""

    def __init__(self, device: torch.device, log: Callable[[str], None]):
        self.device, self.scores = device, {"psnr": [], "ssim": [], "lpips": []}
        self.pairs, self.skipped = 0, {}
        try:
            self.lpips = build_lpips("pretrained").to(device)
            self.lpips_note = None
        except FileNotFoundError as error:
            self.lpips, self.lpips_note = None, f"LPIPS not computed: {error}"
            log(self.lpips_note)

    def add(self, generated: np.ndarray, real_path: Path, m: MetricsConfig) -> None:
        """Score one generated clip ``uint8 [f, H, W, 3]`` against the same frames of ``real_path``."""
        try:
            real, _ = _read_clip(real_path, m, "first", None)
        except (MediaReadError, ValueError) as error:
            self._skip(real_path, _reason(error))
            return
        if real.shape != generated.shape:
            self._skip(real_path, f"frames are {real.shape[1:3]}, the generated ones {generated.shape[1:3]}")
            return
        for key, values in frame_scores(generated, real, self.lpips, self.device).items():
            self.scores[key] += values
        self.pairs += 1

    def _skip(self, path: Path, reason: str) -> None:
        self.skipped[str(path)] = reason
        warnings.warn(f"not pairing {path}: {reason}", SkippedFileWarning, stacklevel=3)

    def summary(self, unpaired: int) -> dict:
        means = {k: float(np.mean(v)) if v else None for k, v in self.scores.items()}
        frames = len(self.scores["psnr"])
        return {"pairs": self.pairs, "frames": frames, **means, "lpips_note": self.lpips_note,
                "unpaired_generated": unpaired, "skipped": self.skipped}


def _reason(error: Exception) -> str:
    """Why a file cannot be used, without its path: ``reason (detail)`` of a media error, else the message."""
    if isinstance(error, MediaReadError):
        return error.reason + (f" ({error.detail})" if error.detail else "")
    return str(error)


def _finite(value: float) -> float | None:
    """``value`` as a float, or None when it is NaN or infinite (JSON has no NaN)."""
    return float(value) if value is not None and math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------- passes


def _generated_pass(side: Side, cfg: EvaluateConfig, extractor: FeatureExtractor | None, pairs: dict[Path, Path],
                    pairwise: Pairwise | None, analysers: dict[str, Analyser], records: dict[Path, dict]) -> None:
    """One pass over the generated files: their clips (from frame 0) to the I3D, the pairwise scores, and the whole
    videos with their generation records to the analysers."""
    m = cfg.metrics
    for path in tqdm(side.files, desc="generated videos", unit="video"):
        if side.clips >= m.num_videos:
            break
        try:
            clip, frames = _read_clip(path, m, "first", None, whole=bool(analysers))
        except (MediaReadError, ValueError) as error:
            side.skip(path, _reason(error))
            continue
        side.clips += 1
        if extractor is not None:
            extractor.add(clip)
        if pairwise is not None and path in pairs:
            pairwise.add(clip, pairs[path], m)
        for analyser in analysers.values():
            analyser.add(path, frames, records.get(path.resolve(), {}))


def _clips(side: Side, cfg: EvaluateConfig) -> Iterator[np.ndarray]:
    """The real side's clips: a seeded random window per file (StyleGAN-V) or its first frames."""
    m = cfg.metrics
    for position, path in enumerate(tqdm(side.files, desc="real videos", unit="video")):
        if side.clips >= m.num_videos:
            return
        rng = np.random.default_rng([cfg.seed, position])
        try:
            clip, _ = _read_clip(path, m, m.real_clip_start, rng)
        except (MediaReadError, ValueError) as error:
            side.skip(path, _reason(error))
            continue
        side.clips += 1
        yield clip


def _distances(feats_gen: np.ndarray, feats_real: np.ndarray, cfg: EvaluateConfig) -> dict:
    """FVD and KVD of the two feature sets, or why not."""
    m = cfg.metrics
    if min(len(feats_gen), len(feats_real)) < 2:
        return {"fvd": None, "kvd": None, "kvd_x1000": None,
                "note": f"FVD / KVD not computed: needs at least 2 usable clips per side, got {len(feats_gen)} and "
                        f"{len(feats_real)}"}
    kvd = kernel_distance(feats_gen, feats_real, m.kvd_subsets, m.kvd_subset_size, cfg.seed)
    note = None
    if min(len(feats_gen), len(feats_real)) < 2048:
        note = "fewer than StyleGAN-V's 2048 clips per side: compare only with values from as many clips"
    return {"fvd": _finite(fvd_from_features(feats_gen, feats_real)), "kvd": _finite(kvd),
            "kvd_x1000": _finite(kvd * 1000), "feature_dim": int(feats_gen.shape[1]), "note": note}


def _protocol(m: MetricsConfig) -> dict:
    """How the clips were taken and fed to the detector (recorded beside the numbers)."""
    return {"detector": m.i3d, "detector_url": I3D_URL, "detector_kwargs": DETECTOR_KWARGS,
            "frames_per_clip": m.frames_per_clip, "frame_stride": m.frame_stride, "max_clips": m.num_videos,
            "real_clip_start": m.real_clip_start, "generated_clip_start": "first", "resolution": m.resolution}


def _pairwise_summary(pairwise: Pairwise | None, generated: Side, m: MetricsConfig) -> dict:
    """The pairwise scores, or why there are none."""
    if pairwise is not None:
        return pairwise.summary(generated.clips - pairwise.pairs)
    reason = "no file names in common" if m.pairwise else "metrics.pairwise=false"
    return {"pairs": 0, "note": f"pairwise metrics not computed: {reason}"}


# ---------------------------------------------------------------------------------------------- entry point


@torch.no_grad()
def evaluate(cfg: EvaluateConfig, log: Callable[[str], None] = print) -> dict:
    """Evaluate ``cfg.generated`` against ``cfg.real``; write ``metrics.json`` / ``metrics.md`` to ``cfg.out_dir``
    and return the metrics (the content of ``metrics.json``).

    Raises:
        UserError: a folder is missing or holds no video, ``metrics.i3d`` names a file that is not there, or
            ``metrics.analysers`` an analyser that is not installed.
    """
    m = cfg.metrics
    device = resolve_device(cfg.device)
    generated, real = _videos(cfg.generated, "generated"), _videos(cfg.real, "real")
    analysers = build_analysers(m.analysers)
    detector = load_i3d(m.i3d, device) if m.i3d is not None else None  # a bad path fails before any work
    if detector is None:
        log(f"{i3d_hint()} (FVD / KVD not computed)")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out, "evaluate.yaml")

    pairs = _pairs(generated, real) if m.pairwise else {}
    pairwise = Pairwise(device, log) if pairs else None
    records = generation_records(generated.folder) if analysers else {}
    if analysers and not records:
        log(f"no generation_*.json with prompts in {generated.folder}: the analysers see no prompt")
    extractor = FeatureExtractor(detector, m.batch_size, m.resolution, device) if detector is not None else None

    _generated_pass(generated, cfg, extractor, pairs, pairwise, analysers, records)
    if generated.clips == 0:
        raise UserError(f"generated={cfg.generated}: no usable video (each was unreadable or shorter than "
                        f"{m.frames_per_clip * m.frame_stride} frames)")
    if extractor is not None:
        feats_gen = extractor.features()
        feats_real = FeatureExtractor(detector, m.batch_size, m.resolution, device)
        for clip in _clips(real, cfg):
            feats_real.add(clip)
        distances = _distances(feats_gen, feats_real.features(), cfg)
    else:
        real.clips = None  # the real videos are read for FVD / KVD only
        distances = {"fvd": None, "kvd": None, "kvd_x1000": None, "note": f"{i3d_hint()} (FVD / KVD not computed)"}

    metrics = {
        "generated": generated.summary(), "real": real.summary(), **distances, "protocol": _protocol(m),
        "pairwise": _pairwise_summary(pairwise, generated, m),
        "analysers": {name: analyser.summary() for name, analyser in analysers.items()},
        "device": str(device), "config": config_to_dict(cfg),
    }
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "metrics.md", metrics_markdown(metrics, analysers))
    log(_headline(metrics) + f" → {out / 'metrics.json'}")
    return metrics


def _show(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _headline(metrics: dict) -> str:
    """One line: the numbers that were computed."""
    parts = [f"{metrics['generated']['clips']} generated clips"]
    if metrics["fvd"] is not None:
        parts.append(f"{metrics['real']['clips']} real; FVD {metrics['fvd']:.2f}, KVD×1000 {metrics['kvd_x1000']:.3f}")
    if metrics["pairwise"].get("pairs"):
        parts.append(f"PSNR {metrics['pairwise']['psnr']:.2f} dB, SSIM {metrics['pairwise']['ssim']:.4f}")
    if metrics["analysers"]:
        parts.append(f"analysed by {', '.join(metrics['analysers'])}")
    return "; ".join(parts)


def _side_line(side: dict, frames: int) -> str:
    """``folder: n clips of f frames (k files skipped)`` for the report."""
    if side["clips"] is None:
        return f"`{side['folder']}`: {side['files']} files (no clips taken: no FVD / KVD)"
    return f"`{side['folder']}`: {side['clips']} clips of {frames} frames ({len(side['skipped'])} files skipped)"


def metrics_markdown(metrics: dict, analysers: dict[str, Analyser]) -> str:
    """A short human-readable report of ``metrics`` (the content of ``metrics.json``), with a section per analyser
    (each writes its own)."""
    g, r, p = metrics["generated"], metrics["real"], metrics["pairwise"]
    frames = metrics["protocol"]["frames_per_clip"]
    lines = [
        "# Evaluation", "",
        f"- generated: {_side_line(g, frames)}", f"- real: {_side_line(r, frames)}", "",
        "| metric | value |", "|---|---|",
        f"| FVD (StyleGAN-V I3D) | {_show(metrics['fvd'], 2)} |",
        f"| KVD × 1000 | {_show(metrics['kvd_x1000'])} |",
    ]
    if p.get("pairs"):
        lines += [f"| PSNR (dB, {p['pairs']} pairs) | {_show(p['psnr'], 2)} |", f"| SSIM | {_show(p['ssim'], 4)} |",
                  f"| LPIPS | {_show(p['lpips'], 4)} |"]
    notes = [n for n in (metrics.get("note"), p.get("lpips_note"), p.get("note")) if n]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    for name, analyser in analysers.items():
        lines += ["", f"## Analyser `{name}`", "", *analyser.markdown(metrics["analysers"][name])]
    return "\n".join(lines) + "\n"
