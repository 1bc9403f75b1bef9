#!/usr/bin/env python
"""First chunks of a trained demo model: does it draw the caption's object, and the same object in every frame?
A measurement, not a test: it prints a table and writes JSON.

One 16-frame chunk per prompt and seed, for the demo's generation prompts and the guidance sweep's (held-out and
training captions), sampled with the demo's own generation settings. For each chunk: identity (colour and shape
of the whole chunk both right, as the report grades a chunk) and, frame by frame, how often a single frame shows
the wrong colour or the wrong shape (an object that flickers between shapes is right as a chunk and wrong in
some of its frames). The wrong chunks are listed as ``caption -> what was drawn``.

    make demo                                                       # trains the model this measures
    python -m benchmarks.demo.first_chunks --config outputs/demo/demo_config.yaml --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path


def grade_chunk(frames, caption: str) -> dict:
    """Identity of one chunk ``uint8 [f, H, W, 3]`` against its caption, and its wrong frames counted apart."""
    from pipelines.world.synthetic import chunk_identity, shape_features  # noqa: PLC0415

    features = shape_features(frames.max(axis=-1))  # the brightest channel, as the analyser reads it
    whole = chunk_identity(frames, caption, (), features)[0]
    per_frame = chunk_identity(frames, caption, range(1, len(frames)), features)  # every frame a "chunk"
    return {"caption": caption, "colour": whole["colour"], "shape": whole["shape"], "identity": whole["identity"],
            "frames": len(frames),
            "wrong_colour_frames": sum(not f["colour_correct"] for f in per_frame),
            "wrong_shape_frames": sum(not f["shape_correct"] for f in per_frame)}


def summarise(chunks: list[dict], held_out: set[str]) -> dict:
    """Identity over all chunks and over the held-out captions' chunks, per-frame error rates, the wrong ones."""
    frames = sum(c["frames"] for c in chunks)
    held = [c["identity"] for c in chunks if c["caption"] in held_out]
    wrong = collections.Counter(f"{c['caption'][2:]} -> {c['colour']} {c['shape']}"
                                for c in chunks if not c["identity"])
    return {"chunks": len(chunks), "identity": round(sum(c["identity"] for c in chunks) / len(chunks), 4),
            "held_out_identity": round(sum(held) / len(held), 4) if held else None,
            "wrong_colour_frames": round(sum(c["wrong_colour_frames"] for c in chunks) / frames, 4),
            "wrong_shape_frames": round(sum(c["wrong_shape_frames"] for c in chunks) / frames, 4),
            "wrong": dict(wrong.most_common())}


def measure(cfg, seeds, work: Path) -> dict:
    """Every prompt's first chunk under every seed, graded and summarised."""
    from pipelines.demo.grading import generated_frames  # noqa: PLC0415
    from pipelines.demo.run import first_chunk_config, sweep_prompts  # noqa: PLC0415
    from pipelines.stages.generate import generate  # noqa: PLC0415

    held_out, seen = sweep_prompts(cfg)
    prompts = list(dict.fromkeys([*cfg.generate.prompts, *held_out, *seen]))
    chunks = []
    for seed in seeds:
        result = generate(first_chunk_config(cfg, prompts, work, f"seed{seed}", seed=seed), lambda *a, **k: None)
        chunks += [grade_chunk(generated_frames(s, work), s["prompt"]) for s in result["samples"]]
    return summarise(chunks, set(held_out)) | {"prompts": len(prompts), "seeds": list(seeds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="outputs/demo/demo_config.yaml",
                        help="the resolved config of the demo run whose model this samples")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="sampling seeds")
    parser.add_argument("--out", default="outputs/benchmarks/first_chunks.json")
    args = parser.parse_args()

    from pipelines.core.config import load_config  # noqa: PLC0415
    from pipelines.demo.config import DemoConfig  # noqa: PLC0415
    from pipelines.demo.run import wire  # noqa: PLC0415

    if not Path(args.config).is_file():
        raise SystemExit(f"no demo run config at {args.config}: run `make demo` first (or pass --config)")
    cfg = wire(load_config(DemoConfig, args.config, []))
    out = Path(args.out)
    began = time.perf_counter()
    row = measure(cfg, args.seeds, out.parent / "first_chunks")
    print(f"{row['chunks']} first chunks ({row['prompts']} prompts × {len(args.seeds)} seeds), "
          f"{time.perf_counter() - began:.0f} s")
    print("| identity | held-out identity | frames of the wrong colour | frames of the wrong shape |")
    print("|---|---|---|---|")
    print(f"| {row['identity']} | {row['held_out_identity']} | {row['wrong_colour_frames']} | "
          f"{row['wrong_shape_frames']} |")
    print("wrong chunks:", ", ".join(f"{k} ({n})" for k, n in row["wrong"].items()) or "none")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config} | row, indent=2))
    print(f"\n→ {out}")


if __name__ == "__main__":
    main()
