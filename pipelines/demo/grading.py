"""How the demo grades the videos it generates against their prompts, with the world's analyser: caption adherence
(colour, shape and direction of the whole video, the direction judged chunk by chunk through the bounces),
identity chunk by chunk (does the object stay the same object, and stay at all, from one generated chunk to the
next?) and the jumps at chunk boundaries (a join with the object missing on a side counted as failed), each as a
share or a mean over videos, and by chunk index (does it decay along a long video?); and the grader's own
accuracy on the world's videos."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipelines.core.visual import pyplot, save_figure
from pipelines.media.video_io import read_frames
from pipelines.world.synthetic import analyse_video


def rounded(value, digits: int = 4):
    """``value`` rounded for the report; None for a missing or non-finite figure."""
    return None if value is None or not np.isfinite(value) else round(float(value), digits)


def generated_frames(sample: dict, videos: Path) -> np.ndarray:
    """``uint8 [f, H, W, 3]`` of one generated video: its lossless frames when generation wrote them
    (``generate.raw_frames``), else its video file. The report grades the former: H.264 rounds a frame by the
    frames after it, so identical latents graded differently in two runs whose later chunks differed."""
    return np.load(videos / sample["frames"]) if "frames" in sample else read_frames(videos / sample["file"])


def grade(result: dict, videos: Path) -> list[dict]:
    """The analysis of every video of one :func:`pipelines.stages.generate.generate` result."""
    return [analyse_video(generated_frames(s, videos), s["prompt"], s["boundaries"]) | {
        "prompt": s["prompt"], "file": s["file"]} for s in result["samples"]]


def adherence(analyses: list[dict]) -> dict:
    """Caption adherence of whole videos: the share with colour, shape and direction all right (``adherence``),
    each apart, and ``identity`` (colour and shape right). A video's direction is right when every chunk of it
    moves as the caption and the bounces say (:func:`pipelines.world.synthetic.analyse_video`)."""
    share = lambda keys: rounded(np.mean([all(a[f"{k}_correct"] for k in keys) for a in analyses]))  # noqa: E731
    return {"adherence": share(("colour", "shape", "direction")), "colour": share(("colour",)),
            "shape": share(("shape",)), "direction": share(("direction",)), "identity": share(("colour", "shape")),
            "videos": len(analyses)}


def identity_summary(videos: list[list[dict]]) -> dict:
    """Per-chunk grades over all videos of a method: the share of chunks whose colour and shape are both right with
    the object in every frame (``identity``), colour, shape and direction each apart, ``present`` (the object in
    every frame), ``vanished`` (chunks with a frame without it), and the identity by chunk index (does it decay
    along the video?)."""
    chunks = [c for video in videos for c in video]
    by_index = [[video[k]["identity"] for video in videos if k < len(video)] for k in range(max(map(len, videos)))]
    share = lambda key: rounded(np.mean([c[key] for c in chunks])) if chunks else None  # noqa: E731
    return {"identity": share("identity"), "colour": share("colour_correct"), "shape": share("shape_correct"),
            "direction": share("direction_correct"),
            "present": rounded(np.mean([c["missing_frames"] == 0 for c in chunks])) if chunks else None,
            "vanished": sum(c["missing_frames"] > 0 for c in chunks), "chunks": len(chunks),
            "by_chunk": [rounded(np.mean(v)) for v in by_index]}


def jumps_summary(analyses: list[dict]) -> dict:
    """Boundary jumps over the videos of one method: the mean of the measured ones (each video's mean first, as the
    report always did) and at each boundary index, beside the failed joins (the object missing on a side of the
    boundary: no jump to measure, counted as failures): their count and share of all joins, per boundary index,
    and the videos with at least one. A video with a failed join fails the jump target, whatever its mean."""
    count = max((len(a["jumps"]) for a in analyses), default=0)
    at = [[a["jumps"][k] for a in analyses if k < len(a["jumps"])] for k in range(count)]
    per_video = [a["jump_ratio"] for a in analyses if np.isfinite(a["jump_ratio"])]
    joins = sum(len(a["jumps"]) for a in analyses)
    failed = sum(a["failed_joins"] for a in analyses)
    return {"mean": rounded(np.mean(per_video), 3) if per_video else None,
            "by_boundary": [rounded(np.mean([j for j in v if np.isfinite(j)]), 3) if any(np.isfinite(v)) else None
                            for v in at],
            "joins": joins, "failed_joins": failed, "failed_share": rounded(failed / joins) if joins else None,
            "failed_by_boundary": [int(np.isinf(v).sum()) for v in at],
            "videos_with_failed_join": sum(a["failed_joins"] > 0 for a in analyses), "videos": len(analyses)}


def grader_accuracy(world: Path, count: int = 96, reconstruct=None, boundaries: Sequence[int] = ()) -> dict:
    """How often the grader reads the world's own training videos right (their captions are the truth), or their
    reconstructions ``reconstruct(frames)`` by the autoencoder (the best any generated video can look): the
    grader's own accuracy, beside the figures it grades.

    The first ``count`` videos of ``world`` (a folder with ``captions.jsonl``), cut into chunks at ``boundaries``
    (the generation's; those past a video's end are ignored). Returns the share of videos with ``colour``,
    ``shape`` and ``direction`` right (direction: every chunk through its bounces), of chunks with their
    ``direction_per_chunk`` right and with ``identity_per_chunk``, and the counts.
    """
    records = [json.loads(line) for line in (world / "captions.jsonl").read_text().splitlines() if line.strip()]
    analyses = []
    for record in records[:count]:
        frames = read_frames(world / record["path"])
        shown = reconstruct(frames) if reconstruct else frames
        analyses.append(analyse_video(shown, record["caption"], boundaries))
    chunks = [c for a in analyses for c in a["chunks"]]
    share = lambda values: rounded(np.mean(list(values)))  # noqa: E731
    return {**{key: share(a[f"{key}_correct"] for a in analyses) for key in ("colour", "shape", "direction")},
            "direction_per_chunk": share(c["direction_correct"] for c in chunks),
            "identity_per_chunk": share(c["identity"] for c in chunks), "videos": len(analyses),
            "chunks": len(chunks)}


def plot_identity(curves: dict[str, dict], jumps: dict[str, dict], path: Path) -> None:
    """Identity by chunk index and boundary jump by boundary index, one line per set of videos: the picture of
    "does the video stay the same video"."""
    from matplotlib.ticker import MaxNLocator

    figure, (left, right) = pyplot().subplots(1, 2, figsize=(10, 3.4), dpi=120)
    for name, summary in curves.items():
        left.plot(range(1, len(summary["by_chunk"]) + 1), summary["by_chunk"], marker="o", markersize=3, label=name)
    left.set(xlabel="chunk", ylabel="identity (colour and shape right)", ylim=(-0.05, 1.05))
    for name, summary in jumps.items():
        values = [np.nan if v is None else v for v in summary["by_boundary"]]
        right.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=name)
    right.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    right.set(xlabel="boundary", ylabel="jump / median motion inside chunks", ylim=(0, None))
    for axis in (left, right):
        axis.legend(fontsize=7)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    save_figure(figure, path)


def plot_sweep(sweep: dict, path: Path) -> None:
    """Caption adherence and its parts against the guidance weight w, held-out and training captions apart."""
    rows = sorted(sweep["by_w"].values(), key=lambda r: r["w"])
    weights = [r["w"] for r in rows]
    figure, axes = pyplot().subplots(1, 2, figsize=(10, 3.4), dpi=120, sharey=True)
    for axis, (group, title) in zip(axes, (("held_out", "held-out"), ("seen", "training"))):
        for key in ("adherence", "colour", "shape", "direction"):
            axis.plot(weights, [r[group][key] for r in rows], marker="o", label=key)
        axis.set(title=f"{title} captions ({rows[0][group]['videos']} prompts)",
                 xlabel="guidance weight w", ylim=(-0.05, 1.05))
        axis.axvline(sweep["default"], color="grey", linewidth=0.8, linestyle=":")
    axes[0].set_ylabel("share of videos right")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)
