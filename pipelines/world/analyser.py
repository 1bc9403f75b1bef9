"""The demo world's analyser as a plug-in of the evaluation command (``metrics.analysers=[world]``): every generated
video against the world prompt its generation recorded, with :func:`pipelines.world.synthetic.analyse_video`:
colour, shape and direction (chunk by chunk through the bounces), identity per chunk, and the jumps at chunk joins
with the failed ones (the object missing on a side) counted apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.world.synthetic import analyse_video, parse_caption

KEYS = ("colour", "shape", "direction")


def _share(flags: list[bool]) -> float | None:
    """The share of true ``flags``, None when there are none."""
    return sum(flags) / len(flags) if flags else None


class WorldAnalyser:
    """Grades generated videos whose recorded prompt is a world caption; counts the others apart."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.not_world: list[str] = []  # files without a world prompt

    def add(self, path: Path, frames: np.ndarray, record: dict) -> None:
        """Analyse one whole video ``uint8 [f, H, W, 3]`` against ``record["prompt"]`` and its chunk boundaries."""
        prompt = record.get("prompt")
        try:
            parse_caption(prompt)
        except (ValueError, AttributeError):  # not a world caption, or no prompt recorded
            self.not_world.append(path.name)
            return
        result = analyse_video(frames, prompt, record.get("boundaries", []))
        row = {"file": path.name, "prompt": prompt, **{k: result[k] for k in KEYS}}
        row |= {f"{k}_correct": bool(result[f"{k}_correct"]) for k in KEYS}
        row["jump_ratio"] = float(result["jump_ratio"]) if np.isfinite(result["jump_ratio"]) else None
        row["failed_joins"] = result["failed_joins"]
        row["chunks"] = [{k: c[k] for k in ("colour", "shape", "direction", "direction_correct", "missing_frames",
                                            "identity")} for c in result["chunks"]]
        self.rows.append(row)

    def summary(self) -> dict:
        """Accuracies over videos and chunks, the mean measured jump beside the failed joins, each video's row."""
        rows, chunks = self.rows, [c for r in self.rows for c in r["chunks"]]
        jumps = [r["jump_ratio"] for r in rows if r["jump_ratio"] is not None]
        return {
            "videos": len(rows), **{f"{k}_accuracy": _share([r[f"{k}_correct"] for r in rows]) for k in KEYS},
            "all_correct": _share([all(r[f"{k}_correct"] for k in KEYS) for r in rows]),
            "identity_per_chunk": _share([c["identity"] for c in chunks]),
            "direction_per_chunk": _share([c["direction_correct"] for c in chunks]),
            "chunks": len(chunks), "vanished_chunks": sum(c["missing_frames"] > 0 for c in chunks),
            "jump_ratio_mean": float(np.mean(jumps)) if jumps else None,
            "failed_joins": sum(r["failed_joins"] for r in rows),
            "videos_with_failed_join": sum(r["failed_joins"] > 0 for r in rows),
            "not_world_prompts": self.not_world, "per_video": rows,
        }

    def markdown(self, summary: dict) -> list[str]:
        """A table of the figures, or the line that says why there are none."""
        if not summary["videos"]:
            return ["No video with a world prompt: the analyser reads the prompts a `generation_*.json` of "
                    "`scripts/generate.py` records in the generated folder."]
        show = lambda value: "—" if value is None else f"{value:.2f}"  # noqa: E731
        n = summary["videos"]
        return [
            "| metric | value |", "|---|---|",
            f"| colour accuracy ({n} videos) | {show(summary['colour_accuracy'])} |",
            f"| shape accuracy | {show(summary['shape_accuracy'])} |",
            f"| direction accuracy (every chunk through its bounces) | {show(summary['direction_accuracy'])} |",
            f"| all correct | {show(summary['all_correct'])} |",
            f"| identity per chunk ({summary['chunks']} chunks: colour and shape right, the object in every frame; "
            f"{summary['vanished_chunks']} with it missing) | {show(summary['identity_per_chunk'])} |",
            f"| direction per chunk | {show(summary['direction_per_chunk'])} |",
            f"| jump ratio at chunk joins (the measured ones) | {show(summary['jump_ratio_mean'])} |",
            f"| failed joins (the object missing beside a boundary) | {summary['failed_joins']} in "
            f"{summary['videos_with_failed_join']} videos |",
        ]
