#!/usr/bin/env python
"""Classifier-free guidance weight × noise interval on a trained demo model: caption adherence
(colour, shape, direction) of one chunk per prompt, the demo sweep's prompts (held-out and training captions),
pooled over seeds. A measurement, not a test: it prints a table and writes JSON.

Each setting is ``w:lo:hi``: guidance weight ``w`` applied only where the log-SNR λ lies in ``[lo, hi]``
(Kynkäänniemi et al. 2024; elsewhere the conditional prediction alone).

    make demo                                                     # trains the model this measures
    python -m benchmarks.demo.guidance_intervals --settings 0:-20:-4 1:-20:-4 1:-20:0 1:-6:2 --seeds 0 1 2 3 4 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def parse_setting(text: str) -> tuple[float, float, float]:
    """``w:lo:hi`` → ``(w, lo, hi)``."""
    parts = [float(p) for p in text.split(":")]
    if len(parts) != 3 or parts[1] > parts[2]:
        raise argparse.ArgumentTypeError(f"a setting is w:lo:hi with lo <= hi, got {text!r}")
    return tuple(parts)


def measure(cfg, settings, seeds, work: Path, log=print) -> list[dict]:
    """Adherence per setting over ``seeds`` × the sweep's prompts, all of them and the held-out ones apart."""
    from pipelines.demo.grading import adherence, grade  # noqa: PLC0415
    from pipelines.demo.run import first_chunk_config, sweep_prompts  # noqa: PLC0415
    from pipelines.stages.generate import generate  # noqa: PLC0415

    held_out, seen = sweep_prompts(cfg)
    prompts, rows = held_out + seen, []
    for w, lo, hi in settings:
        began, graded = time.perf_counter(), []
        for seed in seeds:
            sampling = dataclasses.replace(cfg.generate.sampling, guidance=w, guidance_interval=[lo, hi])
            gen = first_chunk_config(cfg, prompts, work, f"w{w:g}_{lo:g}_{hi:g}_seed{seed}", seed=seed,
                                     sampling=sampling)
            graded += grade(generate(gen, lambda *a, **k: None), work)
        held = [g for i, g in enumerate(graded) if i % len(prompts) < len(held_out)]
        row = {"w": w, "interval": [lo, hi], "samples": len(graded), "all": adherence(graded),
               "held_out": adherence(held), "seconds": round(time.perf_counter() - began, 1)}
        rows.append(row)
        a = row["all"]
        log(f"| {w:g} | [{lo:g}, {hi:g}] | {a['adherence']:.3f} | {a['colour']:.3f} | {a['shape']:.3f} | "
            f"{a['direction']:.3f} | {row['held_out']['adherence']:.3f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="outputs/demo/demo_config.yaml",
                        help="the resolved config of the demo run whose model this samples")
    parser.add_argument("--settings", nargs="+", type=parse_setting, required=True, help="w:lo:hi each")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds, pooled per setting")
    parser.add_argument("--out", default="outputs/benchmarks/guidance_intervals.json")
    args = parser.parse_args()

    from pipelines.core.config import load_config  # noqa: PLC0415
    from pipelines.demo.config import DemoConfig  # noqa: PLC0415
    from pipelines.demo.run import wire  # noqa: PLC0415

    if not Path(args.config).is_file():
        raise SystemExit(f"no demo run config at {args.config}: run `make demo` first (or pass --config)")
    cfg = wire(load_config(DemoConfig, args.config, []))
    out = Path(args.out)
    print(f"{len(args.seeds)} seeds; adherence = colour, shape and direction all right\n")
    print("| w | λ interval | adherence | colour | shape | direction | held-out adherence |")
    print("|---|---|---|---|---|---|---|")
    rows = measure(cfg, args.settings, args.seeds, out.parent / "guidance_intervals")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "seeds": args.seeds, "rows": rows}, indent=2))
    print(f"\n→ {out}")


if __name__ == "__main__":
    main()
