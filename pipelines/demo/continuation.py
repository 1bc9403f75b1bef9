"""Continuation measured against the truth, where the truth is exact: held-out world videos rendered longer than
any training clip by the world's own motion rule, the model given their first frames (``generate``'s
``condition.video``, ``condition.frames=first``), and what it draws after them compared with what the world
draws: the given object kept (colour and shape of the *given* object, chunk by chunk), the centroid's distance from
the true one in pixels, frame by frame, and the joins."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pipelines.core.visual import save_png, tile
from pipelines.demo.config import DemoConfig
from pipelines.demo.grading import identity_summary, jumps_summary, rounded
from pipelines.media.video_io import write_video
from pipelines.stages.configs import ConditionConfig
from pipelines.stages.generate import generate
from pipelines.world.synthetic import analyse_video, centroid_track, parse_caption, render_clip, world_params

SPLIT = "continuation"  # the world's videos of this split are rendered for this measurement only


def truth_videos(cfg: DemoConfig, folder: Path) -> list[tuple[str, np.ndarray]]:
    """``continuation.videos`` world videos of ``continuation.num_frames`` frames, one per held-out caption in
    turn, written to ``folder`` as ``000.mp4``, ...; returns each caption and its exact frames
    ``uint8 [f, H, W, 3]``."""
    spec = dataclasses.replace(cfg.world.spec, num_frames=cfg.continuation.num_frames)
    combos = [tuple(parse_caption(c).values()) for c in cfg.world.held_out]
    folder.mkdir(parents=True, exist_ok=True)
    videos = []
    for index in range(cfg.continuation.videos):
        params = world_params(index, spec, cfg.world.seed, SPLIT, combos)
        frames = render_clip(params, spec)
        write_video(folder / f"{index:03d}.mp4", frames, fps=spec.fps)
        videos.append((params.caption, frames))
    return videos


def centroid_errors(generated: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``[f]``: pixels between the generated object's centroid and the true one in every frame; a frame where the
    generated object vanished counts as a full miss, the frame's diagonal."""
    error = np.linalg.norm(centroid_track(generated) - centroid_track(truth), axis=1)
    return np.where(np.isfinite(error), error, np.hypot(*truth.shape[1:3]))


def grade_continuation(frames: np.ndarray, truth: np.ndarray, caption: str, boundaries: list[int]) -> dict:
    """One continued video against its truth: the generated chunks' identity against the given object (the chunk
    of given frames left out), the centroid error by frame, and the joins (the first one: given → generated)."""
    analysis = analyse_video(frames, caption, boundaries)
    return {"chunks": analysis["chunks"][1:], "errors": centroid_errors(frames, truth), "jumps": analysis["jumps"],
            "jump_ratio": analysis["jump_ratio"], "failed_joins": analysis["failed_joins"]}


def continuation(cfg: DemoConfig, out: Path, log) -> dict | None:
    """Continue the held-out truth videos and grade them; a contact sheet of truth above generation."""
    c = cfg.continuation
    if c.videos <= 0:
        return None
    truth = truth_videos(cfg, out / "work" / "continuation_truth")
    gen = dataclasses.replace(
        cfg.generate, prompts=[caption for caption, _ in truth], num_frames=c.num_frames, batch_size=c.videos,
        condition=ConditionConfig(video=str(out / "work" / "continuation_truth"), frames="first",
                                  count=c.given_frames),
        out_dir=str(out / "continuation"), name="continuation", raw_frames=True)
    result = generate(gen, log)
    graded = [grade_continuation(np.load(out / "continuation" / s["frames"]), frames, caption, s["boundaries"])
              for s, (caption, frames) in zip(result["samples"], truth)]
    errors = np.stack([g["errors"] for g in graded])  # [videos, f]
    size = cfg.world.spec.shape_size * cfg.world.spec.size
    at = min(cfg.targets.continuation_error_frame, c.num_frames - 1)
    save_png(_sheet([f for _, f in truth], [np.load(out / "continuation" / s["frames"]) for s in result["samples"]]),
             out / "continuation.png")
    return {
        "videos": c.videos, "given_frames": c.given_frames, "num_frames": c.num_frames, "seconds": result["seconds"],
        "identity": identity_summary([g["chunks"] for g in graded]),
        "centroid_error_px": {"by_frame": [rounded(e, 2) for e in errors.mean(axis=0)], "frame": at,
                              "at_frame": rounded(errors[:, at].mean(), 2),
                              "within_object_at_frame": rounded((errors[:, at] < size).mean(), 4)},
        "object_size_px": size, "jumps": jumps_summary(graded), "files": [f"continuation/{s['file']}"
                                                                        for s in result["samples"]],
    }


def _sheet(truths: list[np.ndarray], generated: list[np.ndarray], videos: int = 4, columns: int = 8) -> np.ndarray:
    """Truth above generation for the first ``videos`` videos, ``columns`` evenly spaced frames each."""
    rows = []
    for truth, made in list(zip(truths, generated))[:videos]:
        index = np.linspace(0, len(truth) - 1, columns).round().astype(int)
        rows += [truth[index], made[index]]
    return tile(np.concatenate(rows), columns=columns)
